"""llama.cpp as the engine's single-stream decoder on CPUs: a GGUF export of the default model (base plus the
setup adapters, merged), made once and cached by content, decoded by llama-cpp-python.

On a CPU llama.cpp decodes one sequence several times faster than transformers (f16 matrices, fused kernels, no
Python per op: docs/performance.md). The engine sends it what it can serve exactly (the default model, no beams, no
logprobs) and batches everything else; see Engine.submit for the routing. Prompts arrive as token ids from our own
tokenizer and answers are decoded by it too, so llama.cpp's tokenizer (and its pre-tokenizer) never matters.
"""

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from .generate import MIN_SAMPLING_TEMPERATURE

FORMAT = "f16"  # greedy answers equal fp32 transformers' on the test prompts; q8_0 is faster, and drifts sooner
DEFAULT_CACHE = str(Path.home() / ".cache" / "alpaca-cog" / "gguf")
_VERSION = "1"  # of the export: bump when export_gguf changes what it writes


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
    """export_gguf in a child process. In this one, the export's torch work left llama.cpp decoding at 45 tokens/s
    against 78 after an export elsewhere (AVX512-BF16 EPYC, 2 cores: ggml and torch share one libgomp runtime, whose
    thread teams then contend), and the child's memory (a second fp32 copy of the model) is returned at its exit."""
    root = str(Path(__file__).resolve().parent.parent)
    code = "import sys, json; from alpaca_cog.convert import export_gguf; export_gguf(**json.loads(sys.argv[1]))"
    arguments = json.dumps(dict(model_dir=str(base_dir), output_path=str(path), adapter=adapters, outtype=FORMAT, force=True))
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    if subprocess.run([sys.executable, "-c", code, arguments], env=env).returncode != 0:
        raise RuntimeError(f"the GGUF export of {base_dir} failed (its error is above)")


def _llama_class():
    import llama_cpp
    from llama_cpp._internals import LlamaSampler

    class Llama(llama_cpp.Llama):
        """Samples as transformers (and engine.sample) do: temperature, then top-k, then top-p, then the draw.
        llama-cpp-python's own chain applies the temperature last, adds min_p 0.05 and a repetition-penalty
        pass; its other arguments (grammar, mirostat, penalties) are not used here."""

        def _init_sampler(self, top_k: int, top_p: float, temp: float, **unused) -> LlamaSampler:
            sampler = LlamaSampler()
            if temp == 0.0:
                sampler.add_greedy()
                return sampler
            sampler.add_temp(temp)
            sampler.add_top_k(top_k)  # 0: off, as in transformers
            sampler.add_top_p(top_p, 1)
            sampler.add_dist(self._seed)
            return sampler

    return Llama


_RANDOM_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: llama.cpp draws a seed


class LlamaCppDecoder:
    """One sequence at a time through llama-cpp-python; `decode` runs in the caller's thread."""

    name = "llama.cpp"

    def __init__(self, gguf_path: Path, context: int, threads: int | None = None):
        threads = threads or len(os.sched_getaffinity(0))
        self.path = Path(gguf_path)
        self.llm = _llama_class()(model_path=str(gguf_path), n_ctx=context, n_threads=threads, n_threads_batch=threads, verbose=False)
        self.lock = threading.Lock()  # one sequence at a time; held for the whole answer

    def decode(self, sequence) -> None:
        """Feed llama.cpp's tokens to `sequence` (an engine._Sequence: it emits text and ends the answer) until
        it ends or is cancelled."""
        params, handle = sequence.params, sequence.handle
        greedy = params.temperature < MIN_SAMPLING_TEMPERATURE
        with self.lock:
            self.llm.set_seed(params.seed if params.seed is not None else _RANDOM_SEED)
            # The whole prompt prefilled every time: reusing the cached prefix of the previous prompt computes the rest
            # in other kernels, which moves logits by rounding and made a seeded answer differ from itself.
            self.llm.reset()
            tokens = self.llm.generate(handle.request.prompt_ids, top_k=params.top_k, top_p=params.top_p,
                                       temp=0.0 if greedy else params.temperature)  # fmt: skip
            try:
                for token in tokens:
                    if handle.cancelled.is_set():
                        sequence._end("cancelled")
                        return
                    if sequence.advance(token):
                        return
            finally:
                tokens.close()

    def close(self) -> None:
        """Free the model now: left to interpreter exit, llama-cpp-python's finalizer fails on half-torn-down modules."""
        self.llm.close()

    def __str__(self) -> str:
        return f"llama.cpp on {self.path.name} ({self.llm.n_threads} threads)"
