"""/v1/completions through OpenAI's own Python client, against a live uvicorn server on loopback."""

import pytest

openai = pytest.importorskip("openai")
from moe_lightning.inference import generate  # noqa: E402
from moe_lightning.serving.tokenizer import ByteTokenizer  # noqa: E402
from tests.unit.serving.conftest import API_KEY, alone  # noqa: E402

pytestmark = pytest.mark.slow
decode = ByteTokenizer().decode


@pytest.fixture(scope="module")
def client(live_url):
    with openai.OpenAI(base_url=f"{live_url}/v1", api_key=API_KEY, max_retries=0, timeout=60) as client:
        yield client


def test_completions_equal_generate_whole_and_streamed(client, model):
    expected = alone(model, list(b"Hello"), 8)
    completion = client.completions.create(model="moe-lightning", prompt="Hello", max_tokens=8, temperature=0)
    (choice,) = completion.choices
    assert choice.text == decode(expected) and choice.finish_reason == "length"
    assert choice.model_extra["token_ids"] == expected
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (5, 8)

    chunks = list(client.completions.create(model="moe-lightning", prompt="Hello", max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == decode(expected)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_token_prompts_get_one_choice_each_and_a_seed_reproduces(client, model):
    prompts = [[1, 2, 3], [40, 41]]
    completion = client.completions.create(model="moe-lightning", prompt=prompts, max_tokens=5, temperature=0.7,
                                           seed=11)
    expected = generate(model, prompts, 5, temperature=0.7, seed=11)
    assert [choice.model_extra["token_ids"] for choice in completion.choices] == expected
    assert [choice.index for choice in completion.choices] == [0, 1]


def test_stop_strings_cut_the_text_and_one_byte_ones_stop_the_model(client, model):
    expected = decode(alone(model, [1, 2, 3], 24))
    stop = expected[3:5]
    for stream in (False, True):
        response = client.completions.create(model="moe-lightning", prompt=[1, 2, 3], max_tokens=24, temperature=0,
                                             stop=[stop, "\x00never"], stream=stream)
        choices = [c.choices[0] for c in response if c.choices] if stream else response.choices
        assert "".join(choice.text for choice in choices) == expected[:expected.index(stop)]
        assert choices[-1].finish_reason == "stop"
    tokens = alone(model, [1, 2, 3], 24)
    ascii_token = next(token for token in tokens if token < 128)
    completion = client.completions.create(model="moe-lightning", prompt=[1, 2, 3], max_tokens=24, temperature=0,
                                           stop=chr(ascii_token))
    assert completion.choices[0].model_extra["token_ids"] == tokens[:tokens.index(ascii_token) + 1]
    assert completion.choices[0].text == decode(tokens[:tokens.index(ascii_token)])


@pytest.mark.parametrize(
    ("kwargs", "error", "param"),
    [
        ({"n": 2}, openai.BadRequestError, "n"),
        ({"model": "gpt-4"}, openai.NotFoundError, "model"),
        ({"max_tokens": 33}, openai.UnprocessableEntityError, "max_tokens"),
        ({"echo": True}, openai.BadRequestError, "echo"),
        ({"stop": ["a", "b", "c", "d", "e"]}, openai.UnprocessableEntityError, "stop"),
    ],
)
def test_errors_come_in_openai_shape(client, kwargs, error, param):
    with pytest.raises(error) as raised:
        client.completions.create(**{"model": "moe-lightning", "prompt": "Hi", **kwargs})
    assert raised.value.body["param"] == param and raised.value.body["type"] == "invalid_request_error"


def test_a_wrong_key_is_refused_and_the_model_is_listed(client, live_url):
    with openai.OpenAI(base_url=f"{live_url}/v1", api_key="wrong", max_retries=0) as intruder:
        with pytest.raises(openai.AuthenticationError):
            intruder.models.list()
    assert [m.id for m in client.models.list()] == ["moe-lightning"]
