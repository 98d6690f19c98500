"""addrmem.runs: run folders, checkpoints (corrupt or foreign ones refused,
naming the file), log.jsonl (a garbled record named as such) and grids."""

import errno
import json
import os

import pytest
import torch

from addrmem.distill import distill
from addrmem.memory import load_memory
from addrmem.runs import create_run_folder, load_checkpoint, read_log, save_grids
from tiny_run import digits, tiny  # noqa: F401  (digits is a fixture)


@pytest.fixture(scope="module")
def finished(digits, tmp_path_factory):
    """A finished tiny run's folder, to copy from."""
    folder = tmp_path_factory.mktemp("run")
    config = tiny()
    config.to_yaml(folder / "config.yaml")
    distill(config, digits, str(folder), progress=False)
    return folder


def copy_run(finished, tmp_path):
    for name in os.listdir(finished):
        (tmp_path / name).write_bytes((finished / name).read_bytes())
    return tmp_path


def test_create_run_folder(tmp_path):
    create_run_folder(str(tmp_path / "a" / "b"))
    assert (tmp_path / "a" / "b").is_dir()
    (tmp_path / "a" / "b" / "x").write_text("")
    with pytest.raises(FileExistsError, match="not empty"):
        create_run_folder(str(tmp_path / "a" / "b"))
    with pytest.raises(FileExistsError, match="is a file, not a folder"):
        create_run_folder(str(tmp_path / "a" / "b" / "x"))
    with pytest.raises(NotADirectoryError, match="'.*x' is a file, not a folder: choose another output folder"):
        create_run_folder(str(tmp_path / "a" / "b" / "x" / "y" / "z"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_create_run_folder_in_a_read_only_folder(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(OSError) as info:
            create_run_folder(str(tmp_path / "run"))
        assert info.value.errno in (errno.EACCES, errno.EROFS) and info.value.filename == str(tmp_path / "run")
    finally:
        tmp_path.chmod(0o700)


def test_checkpoint_of_another_config_is_refused(digits, finished, tmp_path):
    run = copy_run(finished, tmp_path)
    with pytest.raises(ValueError, match="another config"):
        distill(tiny(seed=3), digits, str(run), resume=True, progress=False)


def test_truncated_checkpoint_is_refused(digits, finished, tmp_path):
    run = copy_run(finished, tmp_path)
    blob = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="checkpoint.pt' is not an addrmem checkpoint.*truncated.*delete"):
        distill(tiny(), digits, str(run), resume=True, progress=False)


@pytest.mark.parametrize("name", ["checkpoint.pt", "memory.pt"])
def test_bytes_overwritten_inside_tensor_data_are_refused(finished, tmp_path, name):
    run = copy_run(finished, tmp_path)
    blob = bytearray((run / name).read_bytes())
    key = "memory" if name == "checkpoint.pt" else "state_dict"
    bases = torch.load(finished / name, weights_only=True)[key]["bases"]
    at = blob.find(bases.numpy().tobytes()[:16])
    assert at > 0
    blob[at + 5] ^= 0x40
    (run / name).write_bytes(blob)
    with pytest.raises(ValueError, match=f"{name}' is corrupt"):
        if name == "checkpoint.pt":
            load_checkpoint(str(run / name), tiny().to_dict())
        else:
            load_memory(str(run / name))


def test_garbled_log_record_is_reported_as_the_log(digits, finished, tmp_path):
    run = copy_run(finished, tmp_path)
    lines = (run / "log.jsonl").read_text().splitlines()
    lines[1] = lines[1][:10] + "\x00garbage"
    (run / "log.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="log.jsonl': record 2 is garbled.*checkpoint is fine") as info:
        distill(tiny(), digits, str(run), resume=True, progress=False)
    assert "checkpoint.pt" not in str(info.value)
    (run / "log.jsonl").write_text("\n".join(lines[:2]) + "\n")
    with pytest.raises(ValueError, match="log.jsonl' has 2 records, fewer than the"):
        distill(tiny(), digits, str(run), resume=True, progress=False)


def test_read_log_ignores_a_half_written_last_line(tmp_path):
    (tmp_path / "log.jsonl").write_text(json.dumps({"iteration": 0}) + "\n" + '{"iterat')
    assert read_log(str(tmp_path / "log.jsonl"), 1) == [{"iteration": 0}]


def test_grids_need_the_preprocessing(finished, tmp_path):
    memory = load_memory(str(finished / "memory.pt"))
    assert [os.path.basename(p) for p in save_grids(memory, str(tmp_path))] == ["recall.png", "bases.png"]
    memory.extra = {}
    with pytest.raises(ValueError, match="saved without its dataset's preprocessing.*preprocessing="):
        save_grids(memory, str(tmp_path))
