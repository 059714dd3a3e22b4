"""llama.cpp as a batch of the engine on CPUs: a GGUF export of the default model (base plus the setup adapters,
merged), made once and cached by content, run through llama-cpp-python's bindings of llama.cpp's C API.

On a CPU llama.cpp computes a step several times faster than transformers (f16 matrices, fused kernels, no Python
per op: docs/performance.md). The engine sends it what it can serve exactly (the default model, no beams, no
logprobs) and everything else to transformers' batch; see Engine._batch_for. llama.cpp only computes logits:
prompts arrive as token ids from our tokenizer, and the engine samples and decodes text, so llama.cpp's tokenizer
and sampler never matter.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

FORMAT = "f16"  # greedy answers equal fp32 transformers' on the test prompts; q8_0 is faster, and drifts sooner
DEFAULT_CACHE = str(Path.home() / ".cache" / "alpaca-cog" / "gguf")
_VERSION = "2"  # of the export: bump when export_gguf changes what it writes
_CHUNK = 512  # tokens per llama_decode call while prefilling (llama.cpp's n_batch)


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def _files_key(folder: Path, content: bool) -> list[str]:
    """Each file of `folder`, by content hash (adapters: small) or by name, size and modification time (a base
    model: hashing gigabytes at every start would cost more than the export it saves)."""
    from .adapters import sha256_of

    key = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        stat = path.stat()
        key.append(f"{path.relative_to(folder)}:{sha256_of(path) if content else f'{stat.st_size}:{stat.st_mtime_ns}'}")
    return key


def cached_gguf(base_dir: str | Path, adapter_dirs: list[Path], cache_dir: str | Path) -> Path:
    """The f16 GGUF of base_dir with adapter_dirs merged in order: from cache_dir when it is there, else exported."""
    parts = [_VERSION, FORMAT, *_files_key(Path(base_dir), content=False)]
    for folder in adapter_dirs:
        parts += ["adapter", *_files_key(folder, content=True)]
    path = Path(cache_dir) / f"{hashlib.sha256(chr(10).join(parts).encode()).hexdigest()[:24]}.{FORMAT}.gguf"
    if not path.is_file():
        print(f"llama.cpp: exporting the model to {path} (once; cached by content)", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        _export_in_child(base_dir, path, ",".join(str(f) for f in adapter_dirs) or None)
    return path


def _export_in_child(base_dir, path: Path, adapters: str | None) -> None:
    """export_gguf in a child process: its memory (a second fp32 copy of the model) is returned at its exit, and with
    a llama.cpp built with OpenMP, the export's torch work in this process left llama.cpp decoding at 45 tokens/s
    against 78 after an export elsewhere (AVX512-BF16 EPYC, 2 cores: ggml and torch then share one libgomp runtime)."""
    root = str(Path(__file__).resolve().parent.parent)
    code = "import sys, json; from alpaca_cog.convert import export_gguf; export_gguf(**json.loads(sys.argv[1]))"
    arguments = json.dumps(dict(model_dir=str(base_dir), output_path=str(path), adapter=adapters, outtype=FORMAT, force=True))
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    if subprocess.run([sys.executable, "-c", code, arguments], env=env).returncode != 0:
        raise RuntimeError(f"the GGUF export of {base_dir} failed (its error is above)")


class LlamaCppBatch:
    """A running batch on llama.cpp: each sequence decodes under its own sequence id in one llama.cpp context, all
    of them in one llama_decode per step (llama.cpp batches them itself); the engine samples from the logits, as
    it does for transformers' batch. The interface is engine._TransformersBatch's."""

    name = "llama.cpp"

    def __init__(self, gguf_path: Path, context: int, max_batch: int, threads: int | None = None):
        import llama_cpp
        from llama_cpp._logger import set_verbose

        self._lib = llama_cpp  # its C API, imported here: llama-cpp-python is optional where this class is not used
        set_verbose(False)  # llama.cpp logs every tensor it loads
        if "OPENMP = 1" in llama_cpp.llama_print_system_info().decode():
            print("llama.cpp: this llama-cpp-python uses OpenMP, whose runtime torch shares (decoding slowed by a third "
                  "after torch work in another thread); rebuild it with the Makefile's CMAKE_ARGS", flush=True)  # fmt: skip
        self.path, self.threads = Path(gguf_path), threads or len(os.sched_getaffinity(0))
        self.cells = context  # KV cache cells, shared by all sequences; can_take keeps a request's whole length there
        self.running, self._reserved, self._free_ids = [], 0, list(range(max_batch))
        llama_cpp.llama_backend_init()
        self._model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(), llama_cpp.llama_model_default_params())
        if not self._model:
            raise ValueError(f"llama.cpp could not load {gguf_path}")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = self.cells, _CHUNK, _CHUNK
        params.n_seq_max, params.kv_unified = max_batch, True
        params.n_threads = params.n_threads_batch = self.threads
        self._ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise ValueError(f"llama.cpp could not make a context of {self.cells} tokens for {gguf_path}")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(_CHUNK, 0, 1)
        self._vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model))

    @staticmethod
    def _need(request) -> int:
        return len(request.prompt_ids) + request.params.max_tokens

    def can_take(self, request) -> bool:
        return bool(self._free_ids) and self._reserved + self._need(request) <= self.cells

    def prefill(self, seq) -> torch.Tensor:
        seq.state = self._free_ids.pop()
        self._reserved += self._need(seq.handle.request)
        prompt = seq.handle.request.prompt_ids
        for start in range(0, len(prompt), _CHUNK):
            chunk = prompt[start : start + _CHUNK]
            self._decode([(token, start + i, seq.state) for i, token in enumerate(chunk)], last_only=True)
        return self._logits(1)[0]

    def join(self, seq) -> None:
        self.running.append(seq)

    def drop(self, seq) -> None:
        """Forget a sequence: its cache cells, id and reservation."""
        if seq.state is not None:
            self._lib.llama_memory_seq_rm(self._memory, seq.state, -1, -1)
            self._free_ids.append(seq.state)
            self._reserved -= self._need(seq.handle.request)
            seq.state = None

    def step(self) -> torch.Tensor:
        self._decode([(s.ids[-1], s.length, s.state) for s in self.running], last_only=False)
        return self._logits(len(self.running))

    def shrink(self, keep: list[int]) -> None:
        kept = set(keep)
        for i, seq in enumerate(self.running):
            if i not in kept:
                self.drop(seq)
        self.running = [self.running[i] for i in keep]

    def clear(self) -> None:
        self.shrink([])

    def _decode(self, tokens: list[tuple[int, int, int]], last_only: bool) -> None:
        """tokens: (token, position, sequence id) each; logits for every token, or only for the last one."""
        batch = self._batch
        batch.n_tokens = len(tokens)
        for i, (token, position, seq_id) in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, position, 1
            batch.seq_id[i][0] = seq_id
            batch.logits[i] = not last_only or i == len(tokens) - 1
        if (code := self._lib.llama_decode(self._ctx, batch)) != 0:
            raise RuntimeError(f"llama.cpp: llama_decode returned {code}")

    def _logits(self, rows: int) -> torch.Tensor:
        """The last decode's logits, (rows, vocab) fp32, in llama.cpp's buffer: used before the next decode."""
        return torch.from_numpy(np.ctypeslib.as_array(self._lib.llama_get_logits(self._ctx), shape=(rows, self._vocab)))

    def close(self) -> None:
        """Free the model now: left to interpreter exit, llama.cpp's memory would outlive what frees it."""
        if self._ctx:
            self._lib.llama_batch_free(self._batch)
            self._lib.llama_free(self._ctx)
            self._lib.llama_model_free(self._model)
            self._ctx = None

    def __str__(self) -> str:
        return f"llama.cpp on {self.path.name} ({self.threads} threads)"

