"""Concurrent predictions and per-request adapters through Cog's real server, on a tiny model (fast)."""

import hashlib
import json
import http.server
import io
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pytest
import requests

from conftest import cog_server, run_finetune, submit

MAX = 8  # predict.py's @cog.concurrent(max=8)
PROMPTS = ["Name three primary colors.", "What is 2 + 2?", "Say hello.", "Tell me about alpacas.",
           "Write a haiku.", "List two fruits.", "Why is the sky blue?", "Translate 'cat' to French."]  # fmt: skip


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """Two adapters trained on different data: GSM8K, and a few hand-written records."""
    tmp = tmp_path_factory.mktemp("adapters")
    other = tmp / "colors.json"
    other.write_text('[' + ",".join(['{"instruction": "Name a color.", "input": "", "output": "Blue, always blue."}'] * 16) + ']')
    a = run_finetune(tiny_model_dir, tmp / "a", max_steps=6)
    b = run_finetune(tiny_model_dir, tmp / "b", max_steps=6, train_data=other, val_set_size=2, seed=3)
    return a, b


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A loopback HTTP server for adapter URLs (404s included)."""
    root = tmp_path_factory.mktemp("www")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    # The batching engine alone: with auto, a lone request would be llama.cpp's, whose f16 rounding flips a random
    # model's near-ties (test_llamacpp.py compares the two backends on SmolLM2).
    env = {"ALPACA_COG_BASE_WEIGHTS": str(tiny_model_dir), "ALPACA_COG_BACKEND": "transformers"}
    with cog_server(tmp_path_factory.mktemp("concurrent"), env=env) as url:
        yield url


def predict(server, **inputs) -> dict:
    response = submit(f"{server}/predictions", inputs)
    assert response.status_code == 200, response.text
    return response.json()


def wait_for_free_slots() -> None:
    """Before MAX predictions at once: Cog frees a finished prediction's slot just after answering it, and a burst
    right after an answer got a 409 (twice in fresh-clone runs)."""
    time.sleep(1)


def stream(server, inputs: dict, chunks: list | None = None, prediction_id: str | None = None) -> dict:
    """A streaming client: output events into `chunks`, returns the final event's data."""
    body = {"input": inputs} | ({"id": prediction_id} if prediction_id else {})
    final: dict = {}
    with requests.post(f"{server}/predictions", json=body, headers={"Accept": "text/event-stream"}, stream=True, timeout=300) as r:
        if r.status_code != 200:
            return {"status_code": r.status_code}
        r.encoding = "utf-8"  # server-sent events are UTF-8; requests would guess Latin-1
        event = None
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                if event == "output" and chunks is not None:
                    chunks.append(data["chunk"])
                elif event in ("completed", "failed", "canceled"):
                    final = data
    return final


def test_eight_concurrent_streaming_clients_answer_as_each_alone(server):
    requests_ = [dict(prompt=p, temperature=0, max_tokens=24 + 4 * i) for i, p in enumerate(PROMPTS)]
    requests_[1] |= dict(temperature=0.8, top_p=0.9, top_k=20, seed=5)  # a sampled neighbour changes nothing
    alone = ["".join(predict(server, **r)["output"]) for r in requests_]
    wait_for_free_slots()
    with ThreadPoolExecutor(MAX) as pool:
        together = list(pool.map(lambda r: stream(server, r, chunks := []) | {"chunks": chunks}, requests_))
    for i, (single, final) in enumerate(zip(alone, together)):
        assert final.get("status") == "succeeded", final
        assert "".join(final["chunks"]) == "".join(final["output"])
        if requests_[i]["temperature"] == 0:
            assert "".join(final["output"]) == single, i
    assert all(f["metrics"]["output_tokens"] <= 24 + 4 * i for i, f in enumerate(together))


def test_a_ninth_concurrent_prediction_gets_409_and_a_cancelled_one_leaves_the_others_unchanged(server):
    long = dict(prompt="Write a long story about alpacas.", temperature=0.7, max_tokens=250, seed=1)
    short = dict(prompt=PROMPTS[0], temperature=0, max_tokens=20)
    expected_short = "".join(predict(server, **short)["output"])
    wait_for_free_slots()
    finals: dict[int, dict] = {}
    chunks: dict[int, list] = {i: [] for i in range(MAX)}

    def client(i: int) -> None:
        finals[i] = stream(server, short if i == 0 else long, chunks[i], prediction_id=f"p-{i}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(MAX)]
    # The short one starts last, once the long ones stream, so that all eight are decoding when the ninth comes
    # (started first, it ended before the ninth on a fresh clone's run).
    for i in [*range(1, MAX), 0]:
        threads[i].start()
        while not chunks[i]:  # it streams (the long ones keep streaming while the next start)
            assert all(t.is_alive() for t in threads[1:] if t.ident), finals
            time.sleep(0.01)
    busy = requests.post(f"{server}/predictions", json={"input": {"prompt": "Say hi.", "max_tokens": 4}}, timeout=30)
    assert busy.status_code == 409, busy.text
    assert requests.post(f"{server}/predictions/p-1/cancel", timeout=30).status_code == 200
    for t in threads:
        t.join(timeout=300)
    assert finals[0]["status"] == "succeeded" and "".join(finals[0]["output"]) == expected_short
    assert finals[1]["status"] == "canceled", finals[1]
    assert all(finals[i]["status"] == "succeeded" for i in range(2, MAX)), finals
    assert predict(server, prompt="Say hi.", max_tokens=4, temperature=0)["status"] == "succeeded"


def test_two_adapters_in_one_batch_answer_differently_and_as_each_alone(server, adapters, files):
    root, base_url = files
    a, b = adapters
    (root / "b.tar").write_bytes(b.read_bytes())
    digest = hashlib.sha256(b.read_bytes()).hexdigest()
    specs = [str(a), f"{base_url}/b.tar#sha256={digest}"]
    question = dict(prompt="Name a color.", temperature=0, max_tokens=16)
    alone = [predict(server, **question, lora_weights=s) for s in specs]
    assert [r["status"] for r in alone] == ["succeeded"] * 2, alone
    assert alone[0]["metrics"]["adapter_cache_hit"] is False
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda s: predict(server, **question, lora_weights=s), specs * 2))
    assert ["".join(r["output"]) for r in together] == ["".join(r["output"]) for r in alone] * 2
    assert all(r["metrics"]["adapter_cache_hit"] for r in together)
    assert "".join(alone[0]["output"]) != "".join(alone[1]["output"])
    base = predict(server, **question)
    assert "".join(base["output"]) not in {"".join(r["output"]) for r in alone}


def _tar(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize(
    "case, message",
    [
        ("404", "(HTTP 404"),
        ("sha256", "not the pinned"),
        ("not-a-tar", "not a readable tar archive"),
        ("pickle", "adapter_model.bin is pickle"),
        ("traversal", "points outside the archive"),
    ],
)
def test_bad_lora_weights_fail_that_request_alone_and_the_server_keeps_serving(server, adapters, files, case, message):
    root, base_url = files
    payloads = {
        "not-a-tar": b"this is not a tar file",
        "pickle": _tar({"adapter_config.json": b"{}", "adapter_model.bin": b"\x80\x04pickle"}),
        "traversal": _tar({"../evil.json": b"{}", "adapter_config.json": b"{}"}),
    }
    spec = f"{base_url}/missing.tar"
    if case == "sha256":
        (root / "a.tar").write_bytes(adapters[0].read_bytes())
        spec = f"{base_url}/a.tar#sha256={'0' * 64}"
    elif case in payloads:
        (root / f"{case}.tar").write_bytes(payloads[case])
        spec = f"{base_url}/{case}.tar"
    body = predict(server, prompt="Say hi.", max_tokens=4, lora_weights=spec)
    assert body["status"] == "failed" and "lora_weights: " in body["error"] and message in body["error"], body
    assert predict(server, prompt="Say hi.", max_tokens=4, temperature=0)["status"] == "succeeded"
