"""GPU checks, run as one short script on a lent GPU machine (see README, "GPU checks").

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
from alpaca_cog.generate import GenerationParams, stream, use_compiled_decoding  # noqa: E402
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


def check_predictor(model_dir: Path, report: dict) -> None:
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    report["predictor"] = dict(device=str(model.device), dtype=str(model.dtype))
    stats: dict = {}
    start = time.perf_counter()
    pieces = list(stream(model, tokenizer, encode_prompt(tokenizer, "alpaca", "Hi"), GenerationParams(temperature=0, max_tokens=32), stats))
    report["predictor"] |= dict(pieces=len(pieces), seconds=time.perf_counter() - start, **stats)


def check_cog_server(model_dir: Path, report: dict) -> None:
    import requests

    subprocess.run([sys.executable, "-m", "alpaca_cog.cog_schema"], cwd=ROOT, check=True)
    env = {**os.environ, "PORT": "5123", "COG_PREDICT_TYPE_STUB": "predict.py:Predictor", "ALPACA_COG_BASE_WEIGHTS": str(model_dir),
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
        r = requests.post("http://127.0.0.1:5123/predictions", json={"input": {"prompt": "Hi", "max_tokens": 8, "temperature": 0}}, timeout=120)
        body = r.json()
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
    for quantization in ["none", "8bit", "4bit"]:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        archive = finetune(**defaults(train) | dict(train_data=data, max_steps=4, batch_size=8, micro_batch_size=4, val_set_size=8,
                                            logging_steps=1, eval_steps=4, checkpoint_steps=2, quantization=quantization),
                           base_weights=model_dir, output_path=tmp / f"{quantization}.tar", checkpoint_dir=tmp / f"ckpt-{quantization}")  # fmt: skip
        metrics = json.load(tarfile.open(archive).extractfile("metrics.json"))
        report["training"][quantization] = dict(
            seconds=time.perf_counter() - start, tokens_per_s=metrics["tokens_per_s"], device=metrics["device"],
            losses=[round(h["loss"], 4) for h in metrics["history"]["train"]], final_val_loss=metrics["final_val_loss"],
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
    report["decode_7b_bf16"] = result


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
        print(json.dumps({name: report.get(name, report.get(f"{name}_error"))}, default=str), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
