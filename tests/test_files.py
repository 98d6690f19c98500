"""addrmem.files: atomic writes that leave the old file on failure, and loads
that refuse corrupt bytes (torch.load does not check the archive's CRCs)."""

import errno
import os

import pytest
import torch

from addrmem.files import atomic_torch_save, atomic_write_text, load_torch


def test_atomic_write_replaces_the_file(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two" and os.listdir(tmp_path) == ["a.txt"]


def test_a_failed_write_keeps_the_old_file_and_names_it(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    atomic_torch_save(path, {"x": torch.arange(3)})
    before = path.read_bytes()

    def full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError) as info:
        atomic_torch_save(path, {"x": torch.arange(1000)})
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["c.pt"]  # no c.pt.tmp left


def test_load_refuses_bytes_overwritten_inside_tensor_data(tmp_path):
    path = tmp_path / "t.pt"
    values = torch.arange(1000, dtype=torch.float32)
    atomic_torch_save(path, {"x": values})
    assert torch.equal(load_torch(path, "a tensor file")["x"], values)
    blob = bytearray(path.read_bytes())
    at = blob.find(values.numpy().tobytes()[400:408])
    blob[at] ^= 0xFF
    path.write_bytes(blob)
    assert not torch.equal(torch.load(path, weights_only=True)["x"], values)  # what torch.load alone accepts
    with pytest.raises(ValueError, match="t.pt' is corrupt: .* fail their CRC-32 check"):
        load_torch(path, "a tensor file")


@pytest.mark.parametrize("content", [b"", b"not an archive", None])
def test_load_refuses_what_is_not_a_torch_archive(tmp_path, content):
    path = tmp_path / "t.pt"
    if content is None:  # a truncated archive
        atomic_torch_save(path, {"x": torch.arange(100)})
        content = path.read_bytes()[:300]
    path.write_bytes(content)
    with pytest.raises(ValueError, match="t.pt' is not a tensor file"):
        load_torch(path, "a tensor file")
