"""Trained-weights archives: what train.py writes and predict.py's setup(weights=...) reads.

Replicate hands the trained weights to setup() as a URL or path string, so the archive
is treated as untrusted: tarfile's "data" filter refuses absolute paths, `..`, links that
leave the folder and device files, and the unpacked size is capped before anything is written.
"""

import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
# A tokenizer's files as transformers saves them (and Meta's SentencePiece model): what an archive carries beside the
# adapter when training extended the vocabulary (convert_weights.py --extend_vocab).
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "special_tokens_map.json",
                   "chat_template.jinja", "added_tokens.json", "vocab.json", "merges.txt")  # fmt: skip
MAX_UNPACKED_BYTES = 8 * 2**30  # a LoRA adapter of a 70B model at r=64 is under 2 GiB


def fetch(weights: str, dest_dir: Path) -> Path:
    """A local path for `weights` (a path, file:// or http(s):// URL)."""
    parsed = urllib.parse.urlparse(weights)
    if parsed.scheme in ("http", "https"):
        path = dest_dir / (Path(parsed.path).name or "weights.tar")
        print(f"downloading {weights}", flush=True)
        try:
            with urllib.request.urlopen(weights, timeout=60) as response, open(path, "wb") as f:
                while block := response.read(1 << 20):
                    if f.tell() + len(block) > MAX_UNPACKED_BYTES:
                        raise ValueError(f"weights: {weights} is over the {MAX_UNPACKED_BYTES} byte limit")
                    f.write(block)
        except urllib.error.HTTPError as e:
            raise ValueError(f"weights: cannot download {weights} (HTTP {e.code} {e.reason})") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            raise ValueError(f"weights: cannot download {weights} ({getattr(e, 'reason', e)})") from None
        return path
    path = Path(parsed.path if parsed.scheme == "file" else weights)
    if not path.exists():
        raise FileNotFoundError(f"weights: {weights} does not exist")
    return path


def extract(archive: Path, dest_dir: Path, max_bytes: int = MAX_UNPACKED_BYTES) -> Path:
    """Unpack a weights tar safely into dest_dir; return dest_dir."""
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for m in members:  # refused outright, not rewritten (tarfile's filter would strip a leading /)
                if m.name.startswith("/") or ".." in Path(m.name).parts:
                    raise ValueError(f"weights: {archive.name}: member {m.name!r} points outside the archive")
            total = sum(m.size for m in members if m.isfile())
            if total > max_bytes:
                raise ValueError(f"weights: {archive.name} unpacks to {total} bytes, over the {max_bytes} limit")
            tar.extractall(dest_dir, filter="data")
    except (tarfile.TarError, EOFError) as e:
        raise ValueError(f"weights: {archive.name} is not a readable tar archive ({e})") from None
    return dest_dir


def folder_of(path: Path, work_dir: Path) -> Path:
    """`path` if it is a folder, else the tar at `path` extracted into work_dir."""
    return path if path.is_dir() else extract(path, work_dir / "unpacked")


def adapter_dir(weights: str, work_dir: str | Path | None = None) -> Path:
    """The folder holding adapter_model.safetensors + adapter_config.json for `weights`
    (a training-output tar, or a folder that already holds them)."""
    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="alpaca-cog-weights-"))
    return check_adapter(folder_of(fetch(weights, work_dir), work_dir), weights)


def adapter_dirs(weights: str, work_dir: str | Path | None = None) -> list[Path]:
    """adapter_dir for each of comma-separated `weights` ("a.tar,b.tar"), in their order."""
    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="alpaca-cog-weights-"))
    specs = [spec.strip() for spec in weights.split(",") if spec.strip()]
    if not specs:
        raise ValueError(f"weights: {weights!r} names no adapter")
    return [adapter_dir(spec, work_dir / str(i)) for i, spec in enumerate(specs)]


def carries_tokenizer(folder: Path) -> bool:
    return (Path(folder) / "tokenizer_config.json").is_file()


def tokenizer_dir(spec: str, work_dir: str | Path) -> Path:
    """The folder of a tokenizer (convert_weights.py --extend_vocab's output), given as a folder or a tar of one."""
    try:
        folder = folder_of(fetch(spec, Path(work_dir)), Path(work_dir))
    except (ValueError, FileNotFoundError) as e:  # the same checks as trained weights get; the message names this input
        raise type(e)(f"tokenizer: {str(e).removeprefix('weights: ')}") from None
    if not carries_tokenizer(folder):
        raise ValueError(f"tokenizer: {spec} holds no tokenizer (tokenizer_config.json missing)")
    return folder


def check_adapter(folder: Path, weights: str) -> Path:
    """`folder` if it holds a PEFT adapter in safetensors; pickle files (adapter_model.bin) are never loaded."""
    missing = [name for name in ADAPTER_FILES if not (folder / name).is_file()]
    if missing:
        pickle = " (adapter_model.bin is pickle, which is never loaded: save with safetensors)" if (folder / "adapter_model.bin").exists() else ""
        raise ValueError(f"weights: {weights} holds no LoRA adapter (missing {', '.join(missing)}){pickle}")
    return folder
