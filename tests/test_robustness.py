"""Hostile and heavy use of the real Cog server: generated requests, unicode, concurrency, memory."""

import json
import threading

import psutil
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import cog_server, submit

UNICODE_PROMPTS = ["Translate: 東京は日本の首都です", "Explain 🦙🦙 in one word", "tab\tand\x07bell\x1b[31m", "e\u0301\u200b\ufeff"]


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir, tmp_path_factory):
    """Cog's server on a tiny random model: the API under test is the same, predictions take milliseconds."""
    with cog_server(tmp_path_factory.mktemp("fuzz"), env={"ALPACA_COG_BASE_WEIGHTS": str(tiny_model_dir)}) as url:
        yield url


def post(url, inputs):
    return submit(f"{url}/predictions", inputs)


# Any JSON value: JSON has no NaN or infinity (json.dumps would refuse them before the server saw them).
anything = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=False, allow_infinity=False),
                     st.text(max_size=30), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))  # fmt: skip
# Kept short for speed; the rest of each range is generated as the schema says.
SPEED_CAPS = {"max_tokens": 3, "beams": 2, "prompt": 100}  # prompt: characters, within the tiny model's 1024 positions


def strategy_for(name: str, prop: dict, enums: dict):
    """Valid values of one input, read from the schema Cog serves."""
    if "allOf" in prop:
        return st.sampled_from(enums[prop["allOf"][0]["$ref"].rsplit("/", 1)[1]]["enum"])
    low, high = prop.get("minimum"), prop.get("maximum")
    if prop["type"] == "integer":
        return st.integers(int(low), min(int(high), SPEED_CAPS.get(name, int(high))))
    if prop["type"] == "number":
        return st.floats(low, high)
    return st.text(min_size=prop.get("minLength", 0), max_size=SPEED_CAPS.get(name, 100)).filter(str.strip)


@pytest.fixture(scope="module")
def inputs_schema(tiny_server):
    schemas = requests.get(f"{tiny_server}/openapi.json", timeout=30).json()["components"]["schemas"]
    return schemas["Input"], schemas


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), value=anything, corrupt=st.booleans())
def test_generated_requests_never_5xx_and_invalid_ones_name_the_field(tiny_server, inputs_schema, data, value, corrupt):
    schema, components = inputs_schema
    props = schema["properties"]
    required = {k: strategy_for(k, props[k], components) for k in schema["required"]}
    optional = {k: strategy_for(k, p, components) for k, p in props.items() if k not in schema["required"]}
    base = data.draw(st.fixed_dictionaries(required, optional=optional))
    field = data.draw(st.sampled_from(sorted(props)))
    body = dict(base, **{field: value}) if corrupt else base
    response = post(tiny_server, body)
    assert response.status_code in (200, 422), response.text
    if response.status_code == 422:
        assert corrupt
        assert {tuple(d["loc"]) for d in response.json()["detail"]} == {("body", "input", field)}
    elif body.get("lora_weights"):  # a well-typed adapter location that names no adapter: that request fails, clearly
        assert response.json()["status"] == "failed" and "lora_weights: " in response.json()["error"], response.json()
    else:
        assert response.json()["status"] == "succeeded", response.json()


def test_server_still_answers_after_fuzzing_and_malformed_bodies(tiny_server):
    for raw in [b"", b"{", b'{"input": 3}', b"[]", b'{"input": {"prompt": "hi"}, "id": 5}']:
        r = requests.post(f"{tiny_server}/predictions", data=raw, headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code < 500, (raw, r.status_code, r.text)
    assert post(tiny_server, {"prompt": "hi", "max_tokens": 2}).json()["status"] == "succeeded"


@pytest.mark.parametrize("prompt", UNICODE_PROMPTS, ids=["cjk", "emoji", "control", "combining"])
def test_unicode_prompts_are_answered(tiny_server, prompt):
    body = post(tiny_server, {"prompt": prompt, "max_tokens": 3, "temperature": 0}).json()
    assert body["status"] == "succeeded"
    json.dumps(body)  # valid JSON text all the way


def test_prompt_beyond_the_context_is_a_clear_failure(tiny_server):
    body = post(tiny_server, {"prompt": "word " * 1100, "max_tokens": 3}).json()  # tiny model: 1024 positions
    assert body["status"] == "failed" and "prompt:" in body["error"] and "context holds 1024" in body["error"]


def test_concurrent_clients_get_an_answer_or_409(tiny_server):
    results: list[int] = []

    def client():
        for _ in range(5):
            r = requests.post(f"{tiny_server}/predictions", json={"input": {"prompt": "hi", "max_tokens": 3}}, timeout=120)
            results.append(r.status_code)
            if r.status_code == 200:
                assert r.json()["status"] == "succeeded"

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results) <= {200, 409} and 200 in results and len(results) == 40


def _worker_rss(url) -> int:
    port = int(url.rsplit(":", 1)[1])
    server = next(c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port and c.status == "LISTEN")
    return sum(p.memory_info().rss for p in psutil.Process(server).children(recursive=True))


def test_worker_memory_is_flat_over_200_requests(tiny_server):
    for _ in range(20):  # warm-up: allocator pools and caches reach their working size
        post(tiny_server, {"prompt": "Tell me a story.", "max_tokens": 16, "temperature": 0.7})
    before = _worker_rss(tiny_server)
    for i in range(200):
        assert post(tiny_server, {"prompt": f"Tell me story {i}.", "max_tokens": 16, "temperature": 0.7}).status_code == 200
    growth = _worker_rss(tiny_server) - before
    assert growth < 20 * 2**20, f"worker RSS grew by {growth / 2**20:.1f} MiB over 200 requests"
