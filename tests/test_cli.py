"""The addrmem command: distill / show / eval on a tiny config, resume, and a
one-line error naming the problem and the fix, with a non-zero exit, for
every kind of bad input a user meets (devices, paths that
cannot be written, corrupt files, garbled logs, non-finite numbers)."""

import errno
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

import addrmem
from addrmem.cli import main
from addrmem.memory import load_memory
from tiny_run import TINY


@pytest.fixture
def tiny_yaml(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return str(path)


@pytest.fixture
def run(tmp_path, tiny_yaml, capsys):
    folder = str(tmp_path / "run")
    assert main(["distill", "--config", tiny_yaml, "--out", folder, "--seed", "3"]) == 0
    return folder


def fails(argv, capsys, match):
    """main(argv) exits non-zero with one line 'addrmem: error: ...' matching ``match``."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    message = info.value.code
    assert isinstance(message, str) and message.startswith("addrmem: error: "), message
    assert "\n" not in message and "Traceback" not in message
    assert match in message, message
    return message


def test_distill_writes_the_run_folder_and_prints_the_comparison(run, capsys):
    out = capsys.readouterr().out
    for name in ("addressable memory (4 bases, 9 per class)", "ImageMemory (1 per class)",
                 "random real subset (10 images)", "full training set", "run folder:"):
        assert name in out, out
    for name in ("config.yaml", "log.jsonl", "checkpoint.pt", "memory.pt", "results.json", "bases.png",
                 "recall.png", "baseline-image/memory.pt"):
        assert os.path.isfile(os.path.join(run, name)), name
    config = yaml.safe_load(open(os.path.join(run, "config.yaml")))
    assert config["seed"] == 3 and config["steps"] == 3 and config["dataset"] == "digits"
    results = json.load(open(os.path.join(run, "results.json")))
    assert results["iterations"] == 4 and len(results["methods"]) == 6


def test_show_redraws_the_grids(run, capsys):
    for name in ("bases.png", "recall.png", "baseline-image/recall.png"):
        os.remove(os.path.join(run, name))
    assert main(["show", run]) == 0
    for name in ("bases.png", "recall.png", "baseline-image/recall.png"):
        assert os.path.isfile(os.path.join(run, name))


def test_eval_reevaluates_the_saved_memory(run, capsys):
    capsys.readouterr()
    assert main(["eval", run, "--nets", "2", "--network", "mlp"]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "2 mlp networks" in out and "AddressableMemory" in out


def test_resume_of_a_finished_run_gives_the_same_results(run, capsys):
    before = json.load(open(os.path.join(run, "results.json")))["methods"]
    assert main(["distill", "--resume", run]) == 0
    assert json.load(open(os.path.join(run, "results.json")))["methods"] == before


def test_help_explains_the_options(capsys):
    with pytest.raises(SystemExit) as info:
        main(["distill", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--dataset", "--data-root", "--ipc", "--n-bases", "--downsample", "--steps", "--iterations",
                 "--inner-lr", "--outer-lr", "--seed", "--device", "--out", "--config", "--resume", "--zca",
                 "--eval-arch", "--download", "--eval-nets", "--eval-epochs", "--val-nets", "--full-data-epochs",
                 "--auto-resume", "--timeout"):
        assert flag in out


def test_cross_architecture_flag(tmp_path, tiny_yaml, capsys):
    folder = str(tmp_path / "run")
    assert main(["distill", "--config", tiny_yaml, "--out", folder, "--eval-arch", "convnet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[[i for i, line in enumerate(lines) if line.startswith("test accuracy")][0] + 1].split()
    assert header == ["mlp", "convnet"]
    results = json.load(open(os.path.join(folder, "results.json")))
    assert results["archs"] == ["mlp", "convnet"]
    fails(["distill", "--config", tiny_yaml, "--out", str(tmp_path / "r2"), "--eval-arch", "resnet9"], capsys,
          "unknown network 'resnet9'")


def test_unknown_dataset(tmp_path, capsys):
    fails(["distill", "--dataset", "imagenet-9000", "--out", str(tmp_path / "r")], capsys, "unknown dataset")
    assert not (tmp_path / "r").exists()


def test_budget_that_cannot_fit(tmp_path, tiny_yaml, capsys):
    fails(["distill", "--config", tiny_yaml, "--n-bases", "64", "--out", str(tmp_path / "r")], capsys,
          "at most n_bases")
    assert not (tmp_path / "r").exists()


def test_missing_data_folder(tmp_path, capsys):
    fails(["distill", "--dataset", "mnist", "--data-root", str(tmp_path / "nowhere"), "--out",
           str(tmp_path / "r")], capsys, "--data-root")
    assert not (tmp_path / "r").exists()


def test_bad_config_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stepz: 3\n")
    fails(["distill", "--config", str(bad), "--out", str(tmp_path / "r")], capsys, "unknown config field")
    fails(["distill", "--config", str(tmp_path / "absent.yaml")], capsys, "no config file")
    assert not (tmp_path / "r").exists()


def test_output_folder_in_use(run, tiny_yaml, capsys):
    fails(["distill", "--config", tiny_yaml, "--out", run], capsys, "not empty")


def unfinished(run):
    """``run`` as if stopped after its last checkpoint (a finished run's --resume only reprints its results)."""
    os.remove(os.path.join(run, "results.json"))
    return run


def test_corrupt_checkpoint(run, capsys):
    path = os.path.join(unfinished(run), "checkpoint.pt")
    with open(path, "r+b") as f:
        f.truncate(100)
    fails(["distill", "--resume", run], capsys, "corrupt")


def test_resume_problems(run, tmp_path, capsys):
    fails(["distill", "--resume", run, "--seed", "1"], capsys, "drop --seed")
    fails(["distill", "--resume", str(tmp_path / "nothing")], capsys, "not an addrmem run folder")


def test_show_and_eval_problems(run, tmp_path, capsys):
    fails(["show", str(tmp_path)], capsys, "not an addrmem run folder")
    fails(["eval", run, "--nets", "0"], capsys, "--nets must be >= 1")
    fails(["eval", run, "--network", "resnet1000"], capsys, "unknown network")
    os.remove(os.path.join(run, "memory.pt"))
    fails(["show", run], capsys, "--resume")
    with open(os.path.join(run, "memory.pt"), "wb") as f:
        f.write(b"not a memory")
    fails(["eval", run], capsys, "not a readable addrmem memory")


def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_python_m_addrmem_help():
    # Run beside the addrmem this process imported (the installed one in CI, not the source tree).
    beside = os.path.dirname(os.path.dirname(addrmem.__file__))
    done = subprocess.run([sys.executable, "-m", "addrmem", "--help"], capture_output=True, text=True, timeout=120,
                          cwd=beside)
    assert done.returncode == 0 and "distill" in done.stdout and "usage: addrmem" in done.stdout


def test_device_auto_is_the_default_and_is_printed(tmp_path, capsys, monkeypatch):
    no_gpu(monkeypatch)
    config = tmp_path / "auto.yaml"
    config.write_text(yaml.safe_dump({**TINY, "device": "auto", "iterations": 1, "full_data_epochs": 0}))
    assert main(["distill", "--config", str(config), "--out", str(tmp_path / "r")]) == 0
    assert "device: cpu (auto)" in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["device"] == "auto"


@pytest.mark.parametrize("device, gpus, match", [
    ("cuda", 0, "device 'cuda': torch sees no CUDA GPU on this machine"),
    ("cuda:1", 1, "device 'cuda:1' does not exist: this machine has 1 CUDA GPU"),
    ("foo", 0, "device must be auto, cpu, cuda or cuda:N; got 'foo'"),
])
def test_a_device_that_is_not_there(tmp_path, tiny_yaml, capsys, monkeypatch, device, gpus, match):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    fails(["distill", "--config", tiny_yaml, "--device", device, "--out", str(tmp_path / "r")], capsys, match)
    assert not (tmp_path / "r").exists()


def test_eval_on_a_missing_gpu_blames_the_device_not_the_memory(run, capsys, monkeypatch):
    no_gpu(monkeypatch)
    message = fails(["eval", run, "--device", "cuda"], capsys, "torch sees no CUDA GPU")
    assert "memory.pt" not in message
    fails(["eval", run, "--device", "foo"], capsys, "device must be auto, cpu, cuda or cuda:N; got 'foo'")


def test_out_under_a_regular_file(tmp_path, tiny_yaml, capsys):
    (tmp_path / "file").write_text("")
    fails(["distill", "--config", tiny_yaml, "--out", str(tmp_path / "file" / "run")], capsys,
          "file' is a file, not a folder: choose another output folder")


def read_only(monkeypatch, folder):
    """Writes under ``folder`` fail as on a read-only file system (chmod does not stop root)."""
    real_open, real_makedirs = open, os.makedirs

    def guard(path):
        if os.path.abspath(os.fspath(path)).startswith(os.path.abspath(folder)):
            raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))

    def fake_open(path, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            guard(path)
        return real_open(path, mode, *args, **kwargs)

    def fake_makedirs(path, *args, **kwargs):
        guard(path)
        return real_makedirs(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    monkeypatch.setattr(os, "makedirs", fake_makedirs)


def test_out_on_a_read_only_file_system(tmp_path, tiny_yaml, capsys, monkeypatch):
    read_only(monkeypatch, tmp_path / "ro")
    fails(["distill", "--config", tiny_yaml, "--out", str(tmp_path / "ro" / "run")], capsys,
          "(Read-only file system): choose an --out folder you can write to")


@pytest.mark.parametrize("command", [["show"], ["distill", "--resume"]])
def test_a_read_only_run(run, capsys, monkeypatch, command):
    unfinished(run)
    before = {name: os.path.getmtime(os.path.join(run, name)) for name in os.listdir(run)}
    read_only(monkeypatch, run)
    fails([*command, run], capsys, f"(Read-only file system): copy the run folder somewhere writable (cp -r {run}")
    assert {name: os.path.getmtime(os.path.join(run, name)) for name in os.listdir(run)} == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_a_read_only_run_by_permissions(run, capsys):
    os.chmod(run, 0o500)
    try:
        fails(["show", run], capsys, "copy the run folder somewhere writable")
    finally:
        os.chmod(run, 0o700)


def test_disk_full_during_a_checkpoint(tmp_path, tiny_yaml, capsys, monkeypatch):
    reference, folder = str(tmp_path / "reference"), str(tmp_path / "run")
    assert main(["distill", "--config", tiny_yaml, "--out", reference]) == 0
    real_save = torch.save

    def full_at_second_checkpoint(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("iteration") == 4:
            f.write(b"some bytes")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_at_second_checkpoint)
    fails(["distill", "--config", tiny_yaml, "--out", folder], capsys,
          f"no space left on the device for '{folder}/checkpoint.pt': free space, then continue with: "
          f"addrmem distill --resume {folder}")
    assert not os.path.exists(os.path.join(folder, "checkpoint.pt.tmp"))
    assert torch.load(os.path.join(folder, "checkpoint.pt"), weights_only=True)["iteration"] == 2
    monkeypatch.setattr(torch, "save", real_save)  # space freed
    assert main(["distill", "--resume", folder]) == 0
    results = [json.load(open(os.path.join(f, "results.json"))) for f in (reference, folder)]
    assert results[0]["methods"] == results[1]["methods"]


@pytest.mark.parametrize("name", ["memory.pt", "checkpoint.pt"])
def test_corrupt_tensor_bytes(run, capsys, name):
    unfinished(run)
    path = os.path.join(run, name)
    blob = bytearray(open(path, "rb").read())
    key = "state_dict" if name == "memory.pt" else "memory"
    bases = torch.load(path, weights_only=True)[key]["bases"]
    at = blob.find(bases.numpy().tobytes()[:16])
    blob[at + 3] ^= 0x10
    open(path, "wb").write(blob)
    command = ["eval", run] if name == "memory.pt" else ["distill", "--resume", run]
    fails(command, capsys, f"{name}' is corrupt")


def test_garbled_log_record(run, capsys):
    unfinished(run)
    path = os.path.join(run, "log.jsonl")
    lines = open(path).read().splitlines()
    lines[0] = "{garbled"
    open(path, "w").write("\n".join(lines) + "\n")
    message = fails(["distill", "--resume", run], capsys, "log.jsonl': record 1 is garbled")
    assert "checkpoint.pt" not in message and "delete" not in message


def test_binary_config_yaml_is_named(run, capsys):
    with open(os.path.join(run, "config.yaml"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n\xff\xfe")
    for command in (["show", run], ["distill", "--resume", run], ["eval", run]):
        fails(command, capsys, f"{run}/config.yaml' is not a text file")


def test_show_a_memory_saved_without_its_preprocessing(run, capsys):
    path = os.path.join(run, "memory.pt")
    load_memory(path).save(path)
    fails(["show", run], capsys, "memory.pt': the memory was saved without its dataset's preprocessing")


@pytest.mark.parametrize("flag, value, field", [("--zca", "inf", "zca"), ("--inner-lr", "nan", "inner_lr"),
                                                ("--outer-lr", "-inf", "outer_lr")])
def test_numbers_that_are_not_finite(tmp_path, tiny_yaml, capsys, flag, value, field):
    fails(["distill", "--config", tiny_yaml, f"{flag}={value}", "--out", str(tmp_path / "r")], capsys,
          f"config field {field} must be a finite number")
    assert not (tmp_path / "r").exists()


def test_yaml_exponent_floats_are_accepted(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({**TINY, "iterations": 1, "full_data_epochs": 0}) + "inner_lr: 1e-2\n")
    assert main(["distill", "--config", str(config), "--out", str(tmp_path / "r")]) == 0
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["inner_lr"] == 0.01


@pytest.mark.parametrize("started", [True, False])
@pytest.mark.parametrize("command", ["distill", "continual"])
def test_interrupt_says_how_to_resume(command, started, tmp_path, monkeypatch, capsys):
    """The hint names the run folder only once it holds a run to resume."""
    import addrmem.cli as cli

    out = str(tmp_path / "run")

    def interrupted(config, *args, **kwargs):
        if started:
            os.makedirs(out)
            config.to_yaml(os.path.join(out, "config.yaml"))
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_experiment" if command == "distill" else "run_continual", interrupted)
    with pytest.raises(SystemExit) as stop:
        main([command, "--out", out])
    assert stop.value.code == 130
    err = capsys.readouterr().err
    assert "addrmem: interrupted" in err
    assert (f"continue with: addrmem {command} --resume {out}" in err) == started, err


def test_export_imagefolder_reads_back_with_torchvision(run, tmp_path, capsys):
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.functional import to_tensor

    from addrmem.data import to_display

    out = tmp_path / "folder"
    assert main(["export", run, "--format", "imagefolder", "--out", str(out)]) == 0
    memory = load_memory(os.path.join(run, "memory.pt"))
    images, labels = memory.recall()
    expected = to_display(images, memory.extra["preprocessing"])  # normalisation undone, in [0, 1]
    data = ImageFolder(str(out))
    assert data.classes == [str(c) for c in memory.extra["classes"]]
    assert data.targets == labels.tolist()  # class-major, in recall order
    for (image, target), want in zip(data, expected):
        got = to_tensor(image)[:1]  # ImageFolder reads grey PNGs as RGB
        assert got.shape == want.shape and (got - want).abs().max() <= 0.5 / 255 + 1e-6
    fails(["export", run, "--format", "imagefolder", "--out", str(out)], capsys, "exists: give another --out")


def test_export_pt_holds_the_images_the_networks_saw(run, tmp_path):
    for folder in (run, os.path.join(run, "baseline-image")):
        assert main(["export", folder, "--format", "pt"]) == 0
        images, labels = torch.load(os.path.join(folder, "recalled.pt"), weights_only=True)
        want_images, want_labels = load_memory(os.path.join(folder, "memory.pt")).recall()
        assert torch.equal(images, want_images.detach()) and torch.equal(labels, want_labels)


def test_a_bug_in_addrmem_is_not_dressed_as_a_user_error(tmp_path, monkeypatch):
    import addrmem.cli as cli

    def buggy(*args, **kwargs):
        return len(None)

    monkeypatch.setattr(cli, "run_experiment", buggy)
    with pytest.raises(TypeError):
        main(["distill", "--out", str(tmp_path / "r")])


def test_a_config_value_of_the_wrong_type(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: many\n")
    fails(["distill", "--config", str(bad), "--out", str(tmp_path / "r")], capsys, "config field steps must be int")


def test_resume_says_what_it_found(run, tmp_path, capsys):
    capsys.readouterr()
    assert main(["distill", "--resume", run]) == 0
    assert f"{run} had finished: its saved results" in capsys.readouterr().out
    early = tmp_path / "early"  # stopped before its first checkpoint
    early.mkdir()
    (early / "config.yaml").write_text(open(os.path.join(run, "config.yaml")).read())
    assert main(["distill", "--resume", str(early)]) == 0
    assert f"{early} stopped before its first checkpoint: starting it over" in capsys.readouterr().out
    assert json.load(open(early / "results.json"))["methods"] == json.load(open(os.path.join(run, "results.json")))["methods"]


def test_auto_resume_starts_or_resumes_out(run, tmp_path, tiny_yaml, capsys):
    fresh = str(tmp_path / "fresh")
    assert main(["distill", "--config", tiny_yaml, "--seed", "3", "--out", fresh, "--auto-resume"]) == 0
    assert "had finished" not in capsys.readouterr().out
    assert main(["distill", "--config", tiny_yaml, "--seed", "3", "--out", run, "--auto-resume"]) == 0
    assert f"{run} had finished" in capsys.readouterr().out
    fails(["distill", "--config", tiny_yaml, "--seed", "4", "--out", run, "--auto-resume"], capsys,
          "holds a run of another config")


def test_evaluation_flags_and_the_capped_n_per_c(tmp_path, tiny_yaml, capsys):
    out = tmp_path / "r"
    assert main(["distill", "--config", tiny_yaml, "--iterations", "1", "--val-nets", "2", "--eval-nets", "2",
                 "--eval-epochs", "1", "--full-data-epochs", "0", "--out", str(out)]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["val_nets"], saved["eval_nets"], saved["eval_epochs"], saved["full_data_epochs"]) == (2, 2, 1, 0)
    printed = capsys.readouterr().out
    assert "2 networks x 1 epochs" in printed and "full training set" not in printed
    # TINY's n_per_c 3 is more than the ImageMemory's one row per class
    assert "n_per_c 3 is more than the rows per class it can take: each inner step takes all 1 of the image memory" \
        in printed


def test_dataset_flag_against_a_config_for_another_dataset(tmp_path, capsys):
    config = tmp_path / "digits.yaml"
    config.write_text(yaml.safe_dump({**TINY, "dataset": "digits"}))
    fails(["distill", "--config", str(config), "--dataset", "mnist", "--out", str(tmp_path / "r")], capsys,
          "--dataset mnist with " + str(config) + ", a config for digits")
    assert not (tmp_path / "r").exists()
