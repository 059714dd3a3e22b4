import base64
import json
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import torch
from transformers import LlamaConfig, LlamaForCausalLM

# torch.compile's kernel cache in a fresh folder per run: a cache left by a run under another CPU capability
# (ATEN_CPU_CAPABILITY=avx2 on an AVX512 machine, say) aborted the process here when reused. Servers the tests
# start inherit it.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="alpaca-cog-inductor-"))
# llama.cpp's GGUF exports (engine.serving_engine) in one folder per run, shared by the servers the tests start.
os.environ.setdefault("ALPACA_COG_GGUF_CACHE", tempfile.mkdtemp(prefix="alpaca-cog-gguf-"))

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = ROOT / "weights"
DATA = ROOT.parent / "shared" / "data"
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def weights_dir() -> Path:
    if not (WEIGHTS / "config.json").exists():
        pytest.fail("weights/ is empty: run `make weights` (make test does it for you)")
    return WEIGHTS


def tiny_llama(vocab_size: int = 64, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A random LLaMA small enough to run a forward pass in milliseconds."""
    torch.manual_seed(seed)
    config = LlamaConfig(**dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2, pad_token_id=2) | overrides,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_uri(records: list, mime: str = "application/json") -> str:
    """Records as a data: URI, the way a client sends a file input to Cog's server."""
    return f"data:{mime};base64,{base64.b64encode(json.dumps(records).encode()).decode()}"


def submit(url: str, inputs: dict, method: str = "POST", timeout: float = 300, **kwargs) -> requests.Response:
    """Send inputs to a Cog endpoint (.../predictions, .../trainings). Cog frees its one slot a moment
    after answering, so a 409 right after the previous job finished is retried."""
    for _ in range(50):
        response = requests.request(method, url, json={"input": inputs}, timeout=timeout, **kwargs)
        if response.status_code != 409:
            break
        time.sleep(0.1)
    return response


@contextmanager
def cog_server(tmp_path: Path, train: bool = False, env: dict | None = None, ready_timeout: float = 300, cwd: Path = ROOT):
    """Cog's own HTTP server (coglet) on a free port, as Replicate runs the built image of the project in `cwd`."""
    from alpaca_cog.cog_schema import max_concurrency

    python_path = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # alpaca_cog, from any cwd
    subprocess.run([sys.executable, "-m", "alpaca_cog.cog_schema"], cwd=cwd, env={**os.environ, **python_path}, check=True, capture_output=True)
    port = free_port()
    server_env = {
        **os.environ,
        **python_path,
        # The worker is started as plain `python`: the venv must come first on PATH.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PORT": str(port),
        "COG_PREDICT_TYPE_STUB": "predict.py:Predictor",
        "COG_TRAIN_TYPE_STUB": "train.py:train",
        **({} if train else {"COG_MAX_CONCURRENCY": str(max_concurrency(f"{cwd}/predict.py:Predictor"))}),  # as `cog build` bakes it
        **(env or {}),
    }
    args = [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"] + (["--x-mode", "train"] if train else [])
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        health = requests.get(f"{url}/health-check", timeout=5).json()
        assert health["status"] != "SETUP_FAILED", json.dumps(health)[-3000:]
        return health["status"] == "READY"

    with running(args, tmp_path / f"cog-server-{port}.log", ready, cwd=cwd, env=server_env, ready_timeout=ready_timeout):
        yield url


@contextmanager
def running(args: list[str], log: Path, ready, cwd: Path = ROOT, env: dict | None = None, ready_timeout: float = 300):
    """A server process started as a user starts it, its output in `log`; yields it once ready() is true."""
    with open(log, "w") as out:
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            assert proc.poll() is None, f"{args[1:3]} exited: {log.read_text()[-3000:]}"
            try:
                if ready():
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, f"{args[1:3]} not ready in time"
            time.sleep(0.3)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def log_lines(self, needle: str) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if needle in line]


@contextmanager
def serve_py(tmp_path: Path, *args: str, ready_timeout: float = 300):
    """`python serve.py` on a free port, as a user starts it; yields once /health answers."""
    port = free_port()
    url, log = f"http://127.0.0.1:{port}", tmp_path / f"serve-{port}.log"
    ready = lambda: requests.get(f"{url}/health", timeout=5).status_code == 200  # noqa: E731
    with running([sys.executable, "serve.py", "--port", str(port), *args], log, ready, ready_timeout=ready_timeout) as proc:
        yield Server(url, proc, log)


def _save_tiny_llama(weights_dir: Path, path: Path, **overrides) -> Path:
    """A random tiny LLaMA with SmolLM2's real tokenizer, saved as a Hugging Face folder."""
    from alpaca_cog.model import load_tokenizer

    tokenizer = load_tokenizer(weights_dir)
    # Larger initial weights than LLaMA's 0.02, so that a LoRA on it learns visibly within 20 steps.
    tiny_llama(**dict(vocab_size=len(tokenizer), tie_word_embeddings=False, initializer_range=0.2,
                      max_position_embeddings=1024) | overrides).save_pretrained(path)  # fmt: skip
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(weights_dir, tmp_path_factory) -> Path:
    """A random tiny LLaMA with SmolLM2's real tokenizer, saved as a Hugging Face folder."""
    return _save_tiny_llama(weights_dir, tmp_path_factory.mktemp("tiny-llama"))


# The smallest LLaMA whose every quantized layer takes both of bitsandbytes' CPU 4-bit paths: in_features whole
# 64-wide quantization blocks and out_features whole 32-row packing blocks (alpaca_cog.model.cpu_packable), so that
# on CPUs with AVX512-BF16 it runs the packed bf16 inference kernel too. tiny_llama's 32-wide layers cannot.
QUANTIZABLE_TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="session")
def quantizable_model_dir(weights_dir, tmp_path_factory) -> Path:
    """tiny_model_dir, QUANTIZABLE_TINY wide."""
    return _save_tiny_llama(weights_dir, tmp_path_factory.mktemp("tiny-llama-64"), **QUANTIZABLE_TINY)


# A training run of seconds on the tiny model: every layer adapted, a high learning rate, nothing saved.
TINY_RUN = dict(train_data=FIXTURES / "gsm8k_64.json", batch_size=8, micro_batch_size=4, val_set_size=8, logging_steps=1,
                eval_steps=5, cutoff_len=128, lora_target_modules="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                learning_rate=1e-2, checkpoint_steps=0, precision="fp32")  # fmt: skip  # the same numbers on every CPU kind


def metrics_of(archive: Path) -> dict:
    with tarfile.open(archive) as tar:
        return json.load(tar.extractfile("metrics.json"))


def train_defaults(**overrides) -> dict:
    """train.py's Cog defaults, as the server and the CLI use them."""
    from alpaca_cog.cli import defaults
    from train import train

    return defaults(train) | overrides


def run_finetune(base: Path, out: Path, **overrides) -> Path:
    """finetune() with train.py's defaults and TINY_RUN, writing out/out.tar and checkpoints to out/ckpt."""
    from alpaca_cog.finetune import finetune

    args = train_defaults(**TINY_RUN) | overrides
    return finetune(**args, base_weights=base, output_path=out / "out.tar", checkpoint_dir=out / "ckpt")
