"""Property-based requests generated from the app's own OpenAPI schema: no input may produce a server error.

The schema is loaded when the module is collected (``schemathesis.pytest.from_fixture`` fails under pytest 9), which
starts the app's lifespan in schemathesis' event-loop thread until the process exits.
"""

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck  # noqa: E402
from hypothesis import settings as hypothesis_settings  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

from moe_lightning.inference import InferenceEngine  # noqa: E402
from moe_lightning.serving.app import create_app  # noqa: E402
from tests.unit.serving.conftest import AUTH, settings, tiny_model  # noqa: E402

# Small limits keep every generated request quick; the schema's own bounds are what schemathesis explores.
app = create_app(InferenceEngine(tiny_model()), settings(max_new_tokens=4, max_prompt_tokens=32, max_queue_size=64))
schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=AUTH)


@pytest.mark.slow
@schema.parametrize()
@hypothesis_settings(max_examples=30, derandomize=True, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_no_request_gets_a_server_error(case):
    # Every check but positive-data acceptance: the server's limits (max_new_tokens, prompt tokens within the model's
    # context, token ids within the vocab) depend on its settings and model, so a schema-valid request may get 4xx.
    case.call_and_validate(headers=AUTH, excluded_checks=[positive_data_acceptance])
