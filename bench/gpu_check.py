"""GPU checks, run as one short script on a lent GPU machine (see docs/performance.md, "GPU checks").

No model weights travel (the lending machine has no network and a small upload limit), so the
models are random-weight LLaMAs of real shapes: SmolLM2-135M's (with its real tokenizer) for the
predictor, the Cog server and 8/4-bit training; LLaMA-7B's for decoding speed against the
memory-bandwidth bound. Prints one JSON object and writes it to $OUT/gpu_check.json.

    python bench/gpu_check.py --tokenizer_dir .gpu --out $OUT [--smoke]   # --smoke: tiny shapes, CPU ok
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from alpaca_cog.finetune import finetune  # noqa: E402
from alpaca_cog.engine import Engine, Request, serving_engine  # noqa: E402
from alpaca_cog.generate import GenerationParams, complete, use_compiled_decoding  # noqa: E402
from alpaca_cog.model import load_model, load_tokenizer  # noqa: E402
from alpaca_cog.prompts import encode_prompt  # noqa: E402

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048)  # fmt: skip


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def random_model_dir(tokenizer_dir: Path, out: Path, smoke: bool) -> Path:
    """SmolLM2's config and tokenizer with random weights (the real weights cannot travel)."""
    config = AutoConfig.from_pretrained(tokenizer_dir)
    if smoke:
        config.num_hidden_layers, config.hidden_size, config.intermediate_size = 2, 64, 128
        config.num_attention_heads, config.num_key_value_heads, config.head_dim = 4, 2, 16
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    load_tokenizer(tokenizer_dir).save_pretrained(out)
    return out


def copy_bandwidth_gbs() -> float:
    """Achievable memory bandwidth, from a device-to-device copy (bytes read + written)."""
    if not torch.cuda.is_available():
        return float("nan")
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync()
    start = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    sync()
    return 2 * x.numel() * 20 / (time.perf_counter() - start) / 1e9


def decode_tokens_per_s(model, tokenizer, n: int, **generate_kwargs) -> float:
    ids = torch.tensor([encode_prompt(tokenizer, "alpaca", "Tell me about alpacas.")], device=model.device)
    kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **generate_kwargs)
    model.generate(ids, **kwargs)  # warm-up, identical shapes: compiles once, outside the timing
    sync()
    start = time.perf_counter()
    model.generate(ids, **kwargs)
    sync()
    return n / (time.perf_counter() - start)


def engine_throughput(engine, requests: list) -> dict:
    """Aggregate tokens/s and per-request time to first token for `requests` decoded together."""
    sync()
    start = time.perf_counter()
    results = engine.complete(requests)
    sync()
    seconds = time.perf_counter() - start
    tokens = sum(r.output_tokens for r in results)
    return dict(clients=len(requests), tokens=tokens, tokens_per_s=round(tokens / seconds, 1),
                max_ttft_s=round(max(r.time_to_first_token or 0 for r in results), 3), backends=sorted({r.backend for r in results}))  # fmt: skip


def check_predictor(model_dir: Path, report: dict) -> None:
    """The engine on the GPU: batched greedy answers equal generate()'s alone, and what batching gains."""
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    engine = Engine(model, tokenizer, max_batch=8)
    prompts = [encode_prompt(tokenizer, "alpaca", f"Question {i}: tell me about alpacas, {'please ' * i}") for i in range(8)]
    greedy = GenerationParams(temperature=0, max_tokens=32)
    alone = [complete(model, tokenizer, ids, greedy) for ids in prompts]
    batched = [r.text for r in engine.complete([Request(ids, greedy) for ids in prompts])]
    tokens = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"][:16]  # noqa: E731
    report["predictor"] = dict(device=str(model.device), dtype=str(model.dtype),
                               batched_equals_alone=sum(a == b for a, b in zip(alone, batched)),
                               first_16_tokens_equal=sum(tokens(a) == tokens(b) for a, b in zip(alone, batched)))  # fmt: skip
    long = GenerationParams(temperature=0, max_tokens=128)
    report["predictor"]["engine_1"] = engine_throughput(engine, [Request(prompts[0], long)])
    report["predictor"]["engine_8"] = engine_throughput(engine, [Request(ids, long) for ids in prompts])


def check_cog_server(model_dir: Path, report: dict) -> None:
    import requests

    subprocess.run([sys.executable, "-m", "alpaca_cog.cog_schema"], cwd=ROOT, check=True)
    from alpaca_cog.cog_schema import max_concurrency

    env = {**os.environ, "PORT": "5123", "COG_PREDICT_TYPE_STUB": "predict.py:Predictor", "ALPACA_COG_BASE_WEIGHTS": str(model_dir),
           "COG_MAX_CONCURRENCY": str(max_concurrency("predict.py:Predictor")),  # as `cog build` bakes it
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # fmt: skip
    server = subprocess.Popen([sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        for _ in range(240):
            try:
                if requests.get("http://127.0.0.1:5123/health-check", timeout=2).json()["status"] == "READY":
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        from concurrent.futures import ThreadPoolExecutor

        r = requests.post("http://127.0.0.1:5123/predictions", json={"input": {"prompt": "Hi", "max_tokens": 8, "temperature": 0}}, timeout=120)
        body = r.json()
        with ThreadPoolExecutor(8) as pool:
            concurrent = list(pool.map(lambda i: requests.post("http://127.0.0.1:5123/predictions", timeout=300,
                                                                json={"input": {"prompt": f"Hi {i}", "max_tokens": 64, "seed": i}}).json(), range(8)))  # fmt: skip
        report["cog_server_concurrent"] = [c.get("status") for c in concurrent]
        bad = requests.post("http://127.0.0.1:5123/predictions", json={"input": {"prompt": "Hi", "beams": 0}}, timeout=30)
        report["cog_server"] = dict(status_code=r.status_code, status=body.get("status"), output_tokens=body.get("metrics", {}).get("output_tokens"),
                                    logs=body.get("logs", "")[-300:], invalid_status_code=bad.status_code)  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=30)


def check_training(model_dir: Path, data: Path, tmp: Path, report: dict) -> None:
    import tarfile

    from alpaca_cog.cli import defaults
    from train import train

    report["training"] = {}
    import importlib.util

    for quantization in ["none"] + (["8bit", "4bit"] if importlib.util.find_spec("bitsandbytes") else []):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        archive = finetune(**defaults(train) | dict(train_data=data, max_steps=4, batch_size=8, micro_batch_size=4, val_set_size=8,
                                            logging_steps=1, eval_steps=4, checkpoint_steps=2, quantization=quantization),
                           base_weights=model_dir, output_path=tmp / f"{quantization}.tar", checkpoint_dir=tmp / f"ckpt-{quantization}")  # fmt: skip
        metrics = json.load(tarfile.open(archive).extractfile("metrics.json"))
        report["training"][quantization] = dict(
            seconds=time.perf_counter() - start, tokens_per_s=metrics["tokens_per_s"], device=metrics["device"],
            losses=[round(h["loss"], 4) for h in metrics["history"]["train"]], final_val_loss=metrics["final_val_loss"], precision=metrics["precision"],
            peak_cuda_mb=torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        )  # fmt: skip


def check_decoding_7b(tokenizer_dir: Path, report: dict, smoke: bool) -> None:
    config = LlamaConfig(**(LLAMA_7B if not smoke else dict(LLAMA_7B, num_hidden_layers=1, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4)))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    tokenizer = load_tokenizer(tokenizer_dir)
    tokenizer_vocab_ok = len(tokenizer) <= config.vocab_size  # SmolLM2's ids (49152) exceed LLaMA's 32000
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth_gbs()
    result = dict(weight_gb=weight_bytes / 1e9, copy_bandwidth_gbs=bandwidth, bound_tokens_per_s=bandwidth * 1e9 / weight_bytes)

    enc = tokenizer if tokenizer_vocab_ok else _ModTokenizer(tokenizer, config.vocab_size)
    n = 128 if not smoke else 8
    result["eager_tokens_per_s"] = decode_tokens_per_s(model, enc, n)
    ids = enc("Tell me about alpacas.")["input_ids"]
    for name, engine in [("engine", serving_engine(model, enc, 8))]:  # as the servers start it
        engine_throughput(engine, [Request(ids, GenerationParams(temperature=0, max_tokens=8))])  # warm-up
        for clients in [1, 8]:
            result[f"{name}_{clients}"] = engine_throughput(engine, [Request(list(ids), GenerationParams(temperature=0, max_tokens=n)) for _ in range(clients)])
        engine.close()
    if device == "cuda":
        try:  # the predictor's compiled decoding: a static KV cache, and generate() compiles the forward (CUDA graphs)
            if not use_compiled_decoding(model, enc):
                raise RuntimeError("use_compiled_decoding fell back to eager (its message is in the log)")
            result["static_compiled_tokens_per_s"] = decode_tokens_per_s(model, enc, n)
        except Exception as e:  # report, don't lose the rest of the run
            result["static_compiled_error"] = f"{type(e).__name__}: {e}"[:500]
    for key in ["eager_tokens_per_s", "static_compiled_tokens_per_s"]:
        if key in result:
            result[key.replace("tokens_per_s", "fraction_of_bound")] = result[key] / result["bound_tokens_per_s"]
    report["decode"] = result  # LLaMA-7B shape, bf16


class _ModTokenizer:
    """SmolLM2's tokenizer with ids folded into LLaMA's 32000 (random weights: only the shape matters)."""

    def __init__(self, tokenizer, vocab):
        self.tokenizer, self.vocab = tokenizer, vocab
        self.chat_template = None

    def __call__(self, text, **kwargs):
        out = self.tokenizer(text, **kwargs)
        out["input_ids"] = [i % self.vocab for i in out["input_ids"]]
        return out

    def __getattr__(self, name):  # decoding, special tokens: the wrapped tokenizer's
        return getattr(self.tokenizer, name)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer_dir", type=Path, required=True, help="SmolLM2 config + tokenizer files")
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--skip", nargs="*", default=[])
    args = parser.parse_args()
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "gpu_check"
    tmp.mkdir(parents=True, exist_ok=True)
    report: dict = dict(torch=torch.__version__, cuda=torch.cuda.is_available(),
                        device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")  # fmt: skip
    model_dir = random_model_dir(args.tokenizer_dir, tmp / "smollm2-random", args.smoke)
    checks = [("predictor", lambda: check_predictor(model_dir, report)),
              ("cog_server", lambda: check_cog_server(model_dir, report)),
              ("training", lambda: check_training(model_dir, ROOT / "tests" / "fixtures" / "gsm8k_64.json", tmp, report)),
              ("decode", lambda: check_decoding_7b(args.tokenizer_dir, report, args.smoke))]  # fmt: skip
    for name, check in checks:
        if name in args.skip:
            continue
        start = time.perf_counter()
        try:
            check()
        except Exception as e:
            report[f"{name}_error"] = f"{type(e).__name__}: {e}"[:1000]
        report[f"{name}_seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps({k: v for k, v in report.items() if k.startswith(name)}, default=str), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
