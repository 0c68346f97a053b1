"""Property-based requests generated from the app's own OpenAPI schema, valid and invalid (more than 1000 cases in
all, with the API key set): no input may produce a server error, and every answer must match the schema.

The schema is loaded when the module is collected (``schemathesis.pytest.from_fixture`` fails under pytest 9), which
starts the app's lifespan in schemathesis' event-loop thread until the process exits.
"""

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given  # noqa: E402
from hypothesis import settings as hypothesis_settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

from moe_lightning.inference import InferenceEngine  # noqa: E402
from moe_lightning.serving.app import create_app  # noqa: E402
from tests.unit.serving.conftest import AUTH, settings, tiny_model  # noqa: E402

MIN_CASES = 1000
EXAMPLES_PER_OPERATION_AND_MODE = 150
# Small limits keep every generated request quick; the schema's own bounds are what schemathesis explores.
app = create_app(InferenceEngine(tiny_model()), settings(max_new_tokens=4, max_prompt_tokens=32, max_queue_size=64))
schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=AUTH)


@pytest.mark.slow
def test_no_generated_request_gets_a_server_error():
    cases = 0

    def check(case) -> None:
        nonlocal cases
        cases += 1
        # Every check but positive-data acceptance: the server's limits (max_new_tokens, prompt tokens within the
        # model's context, token ids within the vocab) depend on its settings and model, so a schema-valid request
        # may get 4xx. not_a_server_error is among them: no 5xx.
        case.call_and_validate(headers=AUTH, excluded_checks=[positive_data_acceptance])

    for result in schema.get_all_operations():
        operation = result.ok()
        # An operation without a body or parameters has no invalid input to generate.
        modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE] if len(operation.body) else [GenerationMode.POSITIVE]
        for mode in modes:
            run = hypothesis_settings(
                max_examples=EXAMPLES_PER_OPERATION_AND_MODE, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck),
            )(given(operation.as_strategy(generation_mode=mode))(check))
            run()
    print(f"\nschemathesis: {cases} generated requests, none answered 5xx")
    assert cases >= MIN_CASES
