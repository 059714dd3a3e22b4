"""Weights archives are untrusted input (Replicate passes them to setup() by URL): each attack is refused."""

import io
import tarfile

import pytest

from alpaca_cog.archive import adapter_dir, extract


def make_tar(path, members):
    """members: (TarInfo, bytes | None) pairs."""
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def file(name, data=b"x"):
    return tarfile.TarInfo(name), data


def link(name, target, kind=tarfile.SYMTYPE):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def device(name):
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    return info, None


@pytest.mark.parametrize(
    "members",
    [
        [file("/etc/evil")],
        [file("../evil")],
        [file("a/../../evil")],
        [link("adapter_model.safetensors", "/etc/passwd")],
        [link("adapter_model.safetensors", "../../outside")],
        [link("adapter_model.safetensors", "/etc/passwd", tarfile.LNKTYPE)],
        [device("adapter_model.safetensors")],
    ],
    ids=["absolute", "dotdot", "nested-dotdot", "symlink-absolute", "symlink-dotdot", "hardlink", "device"],
)
def test_hostile_members_are_refused(tmp_path, members):
    archive = make_tar(tmp_path / "evil.tar", members)
    with pytest.raises((tarfile.FilterError, ValueError)):
        extract(archive, tmp_path / "out")
    assert not (tmp_path / "evil").exists() and not (tmp_path.parent / "evil").exists()


def test_unpacked_size_is_capped_before_writing(tmp_path):
    archive = make_tar(tmp_path / "big.tar", [file("adapter_model.safetensors", b"0" * 2000)])
    with pytest.raises(ValueError, match="unpacks to 2000 bytes, over the 1000 limit"):
        extract(archive, tmp_path / "out", max_bytes=1000)
    assert not (tmp_path / "out").exists()


def test_not_a_tar_or_no_adapter_is_a_clear_error(tmp_path):
    (tmp_path / "weights.tar").write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(ValueError, match="weights.tar is not a readable tar archive"):
        adapter_dir(str(tmp_path / "weights.tar"), tmp_path / "a")
    make_tar(tmp_path / "empty.tar", [file("README.md")])
    with pytest.raises(ValueError, match="holds no LoRA adapter .missing adapter_model.safetensors, adapter_config.json"):
        adapter_dir(str(tmp_path / "empty.tar"), tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="weights: .*nope.tar does not exist"):
        adapter_dir(str(tmp_path / "nope.tar"), tmp_path / "c")
