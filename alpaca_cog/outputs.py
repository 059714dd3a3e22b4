"""Writing outputs so that an interrupted run never leaves a half-written file or folder behind."""

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# Files kept in an output folder by git (its README); they do not make the folder "non-empty".
PLACEHOLDERS = {"README.md", ".gitignore", ".gitkeep"}


def check_replaceable(target: str | Path, force: bool) -> None:
    """Refuse a non-empty output folder or an existing output file unless `force`: checked before any
    long work, so a user learns it at once."""
    target = Path(target)
    existing = [p for p in target.iterdir() if p.name not in PLACEHOLDERS] if target.is_dir() else []
    if (existing or target.is_file()) and not force:
        what = f"is not empty ({existing[0].name}, ...)" if existing else "exists"
        raise FileExistsError(f"{target} {what}; pass --force to replace it")


@contextmanager
def atomic_dir(target: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target`, on error it is removed."""
    target = Path(target)
    check_replaceable(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.is_dir():
        for name in PLACEHOLDERS:  # carry the tracked placeholders over
            if (target / name).exists() and not (tmp / name).exists():
                shutil.copy2(target / name, tmp / name)
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, old / target.name)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)


@contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; it becomes `target` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.partial-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.chmod(0o644)  # mkstemp makes it private; the result is an ordinary file
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
