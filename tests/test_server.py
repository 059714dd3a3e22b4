"""predict.py through Cog's real HTTP server, as Replicate calls it."""

import json
import threading
import time

import pytest
import requests

from conftest import cog_server, submit

DOCUMENTED_INPUTS = {
    "prompt": None,
    "prompt_template": None,
    "max_tokens": (1, 4096),
    "temperature": (0, 5),
    "top_p": (0.01, 1),
    "top_k": (0, 1000),
    "beams": (1, 8),
    "stop_sequences": None,
    "lora_weights": None,
    "seed": (0, 2**31 - 1),
}


@pytest.fixture(scope="module")
def server(weights_dir, tmp_path_factory):
    with cog_server(tmp_path_factory.mktemp("predict")) as url:
        yield url


def predict(server, **inputs) -> requests.Response:
    return submit(f"{server}/predictions", inputs)


def test_health_check_ready(server):
    assert requests.get(f"{server}/health-check").json()["status"] == "READY"


def test_greedy_prediction_is_deterministic_and_answers(server):
    first = predict(server, prompt="Name three primary colors.", temperature=0, max_tokens=24)
    second = predict(server, prompt="Name three primary colors.", temperature=0, max_tokens=24)
    assert first.status_code == second.status_code == 200
    a, b = first.json(), second.json()
    assert a["status"] == "succeeded", a
    text = "".join(a["output"])
    assert text == "".join(b["output"])
    assert "red" in text.lower() and "blue" in text.lower()
    assert "### Instruction" not in text and "Name three primary colors" not in text  # response only


def test_a_lone_prediction_is_llama_cpps_and_starts_as_fp32_transformers_answers(server, weights_dir):
    from alpaca_cog.generate import GenerationParams, complete
    from alpaca_cog.model import load_model, load_tokenizer
    from alpaca_cog.prompts import encode_prompt

    body = predict(server, prompt="Tell me about alpacas.", prompt_template="alpaca", temperature=0, max_tokens=16).json()
    assert body["status"] == "succeeded" and body["metrics"]["backend"] == "llama.cpp", body
    tokenizer = load_tokenizer(weights_dir)
    ids = encode_prompt(tokenizer, "alpaca", "Tell me about alpacas.")
    assert "".join(body["output"]) == complete(load_model(weights_dir, device="cpu"), tokenizer, ids, GenerationParams(temperature=0, max_tokens=16))


def test_max_tokens_bounds_the_output(server):
    body = predict(server, prompt="Tell me about alpacas.", max_tokens=5, temperature=0.7, seed=1).json()
    assert body["status"] == "succeeded"
    assert 1 <= body["metrics"]["output_tokens"] <= 5


def test_same_seed_same_sample(server):
    a = predict(server, prompt="Write a short poem.", temperature=1.0, max_tokens=12, seed=42).json()
    b = predict(server, prompt="Write a short poem.", temperature=1.0, max_tokens=12, seed=42).json()
    assert a["output"] == b["output"]


def test_beam_search_returns_whole_answer(server):
    body = predict(server, prompt="Name three primary colors.", beams=2, max_tokens=16).json()
    assert body["status"] == "succeeded" and len(body["output"]) == 1 and body["output"][0].strip()


@pytest.mark.parametrize(
    "inputs, field",
    [
        ({"prompt": "hi", "temperature": -1}, "temperature"),
        ({"prompt": "hi", "beams": 0}, "beams"),
        ({"prompt": "hi", "top_p": 2}, "top_p"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "  \n "}, "prompt"),
        ({"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "prompt_template": "vicuna"}, "prompt_template"),
        ({}, "prompt"),
    ],
)
def test_invalid_input_is_422_naming_the_field(server, inputs, field):
    response = requests.post(f"{server}/predictions", json={"input": inputs}, timeout=30)
    assert response.status_code == 422, response.text
    assert {tuple(d["loc"]) for d in response.json()["detail"]} == {("body", "input", field)}


def test_unknown_fields_are_stripped(server):
    body = predict(server, prompt="Say hi.", max_tokens=3, temperature=0, not_an_input=1).json()
    assert body["status"] == "succeeded"


def test_openapi_lists_exactly_the_documented_inputs(server):
    schema = requests.get(f"{server}/openapi.json").json()
    props = schema["components"]["schemas"]["Input"]["properties"]
    assert set(props) == set(DOCUMENTED_INPUTS)
    for name, bounds in DOCUMENTED_INPUTS.items():
        assert props[name]["description"]
        if bounds:
            assert (props[name]["minimum"], props[name]["maximum"]) == bounds
    assert schema["components"]["schemas"]["Input"]["required"] == ["prompt"]
    assert schema["components"]["schemas"]["prompt_template"]["enum"] == ["alpaca", "chat", "none"]
    assert schema["paths"]["/predictions"]["post"]["x-cog-streaming"] is True


def _events(response):
    event = None
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            yield event, json.loads(line[6:])


def test_streaming_yields_several_output_events_before_completed(server):
    with requests.post(
        f"{server}/predictions",
        json={"input": {"prompt": "Tell me about alpacas.", "temperature": 0, "max_tokens": 16}},
        headers={"Accept": "text/event-stream"},
        stream=True,
        timeout=300,
    ) as response:
        assert response.status_code == 200
        events = list(_events(response))
    kinds = [e for e, _ in events]
    assert kinds.count("output") >= 3
    assert kinds[-1] == "completed" and kinds.index("completed") > max(i for i, k in enumerate(kinds) if k == "output")
    chunks = "".join(d["chunk"] for e, d in events if e == "output")
    assert chunks == "".join(events[-1][1]["output"])


def test_cancelled_stream_is_reported_canceled_and_the_next_request_is_served(server):
    """Cog 0.23.1 cancels an async run()'s coroutine only: once its generator streams, the prediction is
    reported canceled while its tokens run on to max_tokens (docs/internals.md, "Cancelling"). Short, so the test is too."""
    prediction_id = "cancel-me"
    outputs: list[str] = []
    final: dict = {}

    def consume():
        with requests.post(
            f"{server}/predictions",
            json={"id": prediction_id, "input": {"prompt": "Write a long story about alpacas.", "max_tokens": 48, "temperature": 0.7, "seed": 3}},
            headers={"Accept": "text/event-stream"},
            stream=True,
            timeout=300,
        ) as response:
            for event, data in _events(response):
                if event == "output":
                    outputs.append(data["chunk"])
                elif event in ("completed", "canceled", "failed"):
                    final.update(event=event, **data)

    reader = threading.Thread(target=consume)
    reader.start()
    while len(outputs) < 3:
        assert reader.is_alive() or final, "stream ended before cancelling"
        time.sleep(0.05)
    assert requests.post(f"{server}/predictions/{prediction_id}/cancel", timeout=30).status_code == 200
    reader.join(timeout=120)
    assert not reader.is_alive()
    assert final["status"] == "canceled", final
    body = predict(server, prompt="Say hi.", max_tokens=4, temperature=0).json()
    assert body["status"] == "succeeded"


def test_stop_sequences_end_the_answer_and_are_never_returned(server):
    inputs = dict(prompt="Name three primary colors.", temperature=0, max_tokens=24)
    full = "".join(predict(server, **inputs).json()["output"])
    word = full.split()[3]
    cut = "".join(predict(server, **inputs, stop_sequences=f"zzz,{word}").json()["output"])
    assert cut == full[: full.index(word)]


def test_compiled_decoding_served_by_cog_answers_as_eager_decoding(tiny_model_dir, tmp_path):
    """Compiled decoding (opt-in, ALPACA_COG_COMPILE=1) through Cog: setup() compiles, and the worker streams the eager text."""
    from alpaca_cog.generate import GenerationParams, complete
    from alpaca_cog.model import load_model, load_tokenizer
    from alpaca_cog.prompts import encode_prompt

    tokenizer, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir)
    prompt = "Name three primary colors."
    expected = complete(model, tokenizer, encode_prompt(tokenizer, "alpaca", prompt), GenerationParams(temperature=0, max_tokens=16))
    assert expected  # precondition: something to compare
    env = {"ALPACA_COG_BASE_WEIGHTS": str(tiny_model_dir), "ALPACA_COG_COMPILE": "1"}
    with cog_server(tmp_path, env=env) as url:
        body = submit(f"{url}/predictions", dict(prompt=prompt, temperature=0, max_tokens=16)).json()
    assert body["status"] == "succeeded", body
    assert "".join(body["output"]) == expected
    assert "float32, compiled decoding" in "".join(p.read_text() for p in tmp_path.glob("cog-server-*.log"))  # not the fallback
