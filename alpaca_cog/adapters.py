"""Per-request LoRA adapters: fetched once, checked, kept in an LRU cache keyed by their content.

An adapter is named by a train.py archive or an adapter folder, as a path or http(s) URL, optionally
pinned as `URL#sha256=<hex>` (the archive's digest). Fetching and unpacking go through archive.py, so an
adapter given per request passes the same checks as setup(weights=...): safetensors only, size cap, no
member that points outside the archive.
"""

import hashlib
import json
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path

from . import archive
from .model import adapter_vocab_size

DEFAULT_CAPACITY = 10  # as Replicate's LLaMA template caches fine-tunes


def sha256_of(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def prompt_template_of(folder: Path) -> str | None:
    """The template an adapter was trained with (train.py writes prompt_template.json), if it says."""
    path = folder / "prompt_template.json"
    try:
        return json.loads(path.read_text())["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_vocabulary(folder: Path, model, spec: str) -> None:
    """An adapter loaded beside a running model shares its tokenizer: one that brings a vocabulary of another size
    (trained with an extended tokenizer) is refused; it belongs where the model is loaded, with its tokenizer."""
    rows, have = adapter_vocab_size(folder), model.get_input_embeddings().weight.shape[0]
    if rows is not None and rows != have:
        raise ValueError(f"weights: {spec} brings its own vocabulary ({rows} tokens; the running model has {have}): apply it "
                         "at start-up (predict.py's setup weights, COG_WEIGHTS) or serve its merge (convert_weights.py --to merged)")  # fmt: skip


def unpack(spec: str, work_dir: Path) -> Path:
    """The adapter folder for `spec`, checked against its pinned sha256 when it has one."""
    location, _, pin = spec.partition("#")
    expected = None
    if pin:
        if not pin.startswith("sha256=") or len(pin) != 71:
            raise ValueError(f"lora_weights: {spec!r}: the part after '#' must be sha256=<64 hex digits>")
        expected = pin[7:].lower()
    path = archive.fetch(location, work_dir)
    if expected is not None:
        if path.is_dir():
            raise ValueError(f"lora_weights: {location} is a folder; a sha256 pin needs an archive")
        actual = sha256_of(path)
        if actual != expected:
            raise ValueError(f"lora_weights: {location}: sha256 is {actual}, not the pinned {expected}")
    return archive.check_adapter(archive.folder_of(path, work_dir), location)


class AdapterCache:
    """At most `capacity` adapters loaded into the engine beside the base; the least recently used goes first."""

    def __init__(self, engine, capacity: int = DEFAULT_CAPACITY):
        self.engine, self.capacity = engine, capacity
        self._loaded: OrderedDict[str, str | None] = OrderedDict()  # content hash -> prompt template
        self._by_spec: dict[str, str] = {}  # what a request named -> content hash, so a URL is fetched once
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return list(self._loaded)

    def get(self, spec: str) -> tuple[str, str | None, dict]:
        """(engine adapter name, its prompt template, metrics) for `spec`, loading it if it is not cached."""
        started = time.monotonic()
        with self._lock:
            name = self._by_spec.get(spec)
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return name, self._loaded[name], dict(adapter_cache_hit=True, adapter_load_ms=_ms_since(started))
            work_dir = Path(tempfile.mkdtemp(prefix="alpaca-cog-adapter-"))
            try:
                folder = _named_input(unpack, spec, work_dir)
                _named_input(check_vocabulary, folder, self.engine.model, spec.partition("#")[0])
                name = sha256_of(*(folder / f for f in archive.ADAPTER_FILES))[:16]
                hit = name in self._loaded
                if not hit:
                    self._evict()
                    _named_input(self.engine.load_adapter, name, folder)
                    print(f"adapter {name} loaded from {spec.partition('#')[0]}", flush=True)
                    self._loaded[name] = prompt_template_of(folder)
                self._loaded.move_to_end(name)
                self._by_spec[spec] = name
            finally:
                shutil.rmtree(work_dir, ignore_errors=True)
            return name, self._loaded[name], dict(adapter_cache_hit=hit, adapter_load_ms=_ms_since(started))

    def _evict(self) -> None:
        in_use = self.engine.adapters_in_use()
        while len(self._loaded) >= self.capacity:
            name = next((n for n in self._loaded if n not in in_use), None)
            if name is None:  # every cached adapter is decoding right now: go over capacity for a while
                return
            del self._loaded[name]
            self._by_spec = {s: n for s, n in self._by_spec.items() if n != name}
            self.engine.delete_adapter(name)
            print(f"adapter {name} evicted (cache holds {self.capacity})", flush=True)


def _named_input(fn, *args):
    """fn(*args), its errors naming the request's input: a missing file stays a FileNotFoundError (serve.py answers
    404 for it), anything else becomes a ValueError (a PEFT RuntimeError included: an adapter trained for
    another base model does not fit this one)."""
    try:
        return fn(*args)
    except (ValueError, OSError, RuntimeError) as e:
        reason = str(e).removeprefix("weights: ").removeprefix("lora_weights: ")
        if isinstance(e, RuntimeError):
            reason = f"cannot load this adapter into this base model ({reason[:300]})"
        message = f"lora_weights: {reason}"
        raise (FileNotFoundError if isinstance(e, FileNotFoundError) else ValueError)(message) from None


def _ms_since(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)
