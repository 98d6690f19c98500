"""The addrmem command: distill / show / eval on a tiny config, resume, and a
one-line error with a non-zero exit for every kind of bad input."""

import json
import os

import pytest
import yaml

from addrmem.cli import main

TINY = dict(network="mlp", n_bases=4, downsample=1, steps=3, n_per_c=3, iterations=4, eval_every=2,
            val_nets=1, eval_nets=1, eval_epochs=2, full_data_epochs=2, checkpoint_every=2, outer_optimizer="adam",
            outer_lr=0.03)


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
    assert results["iterations"] == 4 and len(results["methods"]) == 4


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
                 "--eval-arch", "--download"):
        assert flag in out


def test_cross_architecture_flag(tmp_path, tiny_yaml, capsys):
    folder = str(tmp_path / "run")
    assert main(["distill", "--config", tiny_yaml, "--out", folder, "--eval-arch", "convnet"]) == 0
    header = capsys.readouterr().out.splitlines()[1].split()
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


def test_corrupt_checkpoint(run, capsys):
    path = os.path.join(run, "checkpoint.pt")
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
