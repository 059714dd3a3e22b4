"""Concurrent streaming clients through Cog's real server: the sequential predictor (one prediction at a
time, as before the batching engine) against today's predict.py, on the model in weights/.

Prints one JSON object and writes it to bench/results/concurrency-<date>.json:
aggregate tokens/s and p50/p95 time to first token at 1, 4 and 8 clients, and the cost of a per-request
adapter (cold load, cache hit). The sequential side answers a busy server's 409 by retrying, as a client must.

    .venv/bin/python bench/concurrency.py [--tokens 64]      # ~5 min on 2 CPU cores
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import cog_server  # noqa: E402
from machine import machine  # noqa: E402

PROMPTS = ["Tell me about alpacas.", "Name three primary colors.", "Explain photosynthesis briefly.", "Write a haiku about rain.",
           "What is the capital of France?", "Give two tips for sleeping well.", "Why is the sky blue?", "Describe a cat."]  # fmt: skip


def stream_one(url: str, inputs: dict) -> dict:
    """One streaming prediction; retries Cog's 409 (busy) like a client of a one-slot server must."""
    started = time.perf_counter()
    while True:
        with requests.post(f"{url}/predictions", json={"input": inputs}, headers={"Accept": "text/event-stream"}, stream=True, timeout=600) as r:
            if r.status_code == 409:
                time.sleep(0.05)
                continue
            first, final, event = None, {}, None
            for line in r.iter_lines(decode_unicode=True):
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    if event == "output" and first is None:
                        first = time.perf_counter() - started
                    elif event in ("completed", "failed", "canceled"):
                        final = json.loads(line[6:])
            assert final.get("status") == "succeeded", final
            return dict(ttft=first, tokens=final["metrics"]["output_tokens"])


def load(url: str, clients: int, tokens: int) -> dict:
    inputs = [dict(prompt=PROMPTS[i % len(PROMPTS)], temperature=0, max_tokens=tokens) for i in range(clients)]
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: stream_one(url, i), inputs))
    seconds = time.perf_counter() - started
    ttfts = sorted(r["ttft"] for r in results)
    return dict(clients=clients, tokens=sum(r["tokens"] for r in results), seconds=round(seconds, 2),
                tokens_per_s=round(sum(r["tokens"] for r in results) / seconds, 2),
                ttft_p50_s=round(statistics.median(ttfts), 3), ttft_p95_s=round(ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], 3))  # fmt: skip


def sequential_project(tmp: Path) -> Path:
    """The predictor before the batching engine (git 46e9761's predict.py), served from its own folder."""
    folder = tmp / "sequential"
    folder.mkdir()
    (folder / "predict.py").write_text(subprocess.run(["git", "show", "46e9761:predict.py"], cwd=ROOT, check=True, capture_output=True, text=True).stdout)
    (folder / "cog.yaml").write_text('build:\n  python_version: "3.11"\nrun: "predict.py:Predictor"\n')
    (folder / "weights").symlink_to(ROOT / "weights")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "alpaca_cog.cog_schema"], cwd=folder, env=env, check=True, capture_output=True)
    return folder


def random_adapter(tmp: Path) -> Path:
    """A LoRA of train.py's shape on the base in weights/ (random, non-zero), as a weights archive."""
    import torch
    from peft import LoraConfig, get_peft_model

    from alpaca_cog.model import load_model

    torch.manual_seed(0)
    model = get_peft_model(load_model(ROOT / "weights"), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp / "adapter")
    archive = tmp / "adapter.tar"
    with tarfile.open(archive, "w") as tar:
        for name in ["adapter_model.safetensors", "adapter_config.json"]:
            tar.add(tmp / "adapter" / name, arcname=name)
    return archive


def adapter_costs(url: str, archive: Path) -> dict:
    def metrics() -> dict:
        body = requests.post(f"{url}/predictions", json={"input": dict(prompt="Hi", max_tokens=1, lora_weights=str(archive))}, timeout=300).json()
        assert body["status"] == "succeeded", body
        return body["metrics"]

    cold, hit = metrics(), metrics()
    assert not cold["adapter_cache_hit"] and hit["adapter_cache_hit"]
    return dict(cold_load_ms=cold["adapter_load_ms"], cache_hit_ms=hit["adapter_load_ms"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    args = parser.parse_args()
    report: dict = dict(date=str(datetime.date.today()), machine=machine(), model="weights/ (SmolLM2-135M-Instruct, fp32)", tokens=args.tokens)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = sequential_project(tmp)
        with cog_server(tmp, cwd=folder) as url:
            report["baseline"] = [load(url, n, args.tokens) for n in args.clients]
            print(json.dumps({"baseline": report["baseline"]}), flush=True)
        archive = random_adapter(tmp)
        # ours as predict.py runs by default here (ALPACA_COG_BACKEND=auto: on a CPU llama.cpp's batch), and
        # transformers' batch alone (what auto is on a GPU)
        for side, backend in [("ours", "auto"), ("ours_transformers", "transformers")]:
            with cog_server(tmp, env={"ALPACA_COG_BACKEND": backend}) as url:
                report[side] = [load(url, n, args.tokens) for n in args.clients]
                print(json.dumps({side: report[side]}), flush=True)
                if side == "ours":
                    report["adapter"] = adapter_costs(url, archive)
    report["speedup"] = {side: {str(b["clients"]): round(o["tokens_per_s"] / b["tokens_per_s"], 2) for b, o in zip(report["baseline"], report[side])}
                         for side in ["ours", "ours_transformers"]}  # fmt: skip
    out = ROOT / "bench" / "results" / f"concurrency-{report['date']}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
