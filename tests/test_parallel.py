"""addrmem.parallel and the meta-batch: two gloo processes started with
torchrun give what one process gives, bit for bit (one thread each), and a
run interrupted under torchrun resumes to the same memory."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from tiny_run import digits, records, tiny  # noqa: F401 (digits: a fixture)

from addrmem import distill as distill_module
from addrmem import parallel
from addrmem.config import DistillConfig

WORKER = os.path.join(os.path.dirname(__file__), "parallel_worker.py")


def torchrun(*args, nproc=2, cwd=None):
    """Run ``args`` under torchrun with ``nproc`` CPU processes; returns the completed process. Give a ``cwd``
    outside the repository for ``-m addrmem``, so that it imports the installed package."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={nproc}", *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=cwd)
    return done


def failure(done) -> str:
    """What a failed command said: its lines that name an error, then the end of its stderr."""
    lines = (done.stdout + done.stderr).splitlines()
    named = [line for line in lines if "rror" in line or "xception" in line]
    return "\n".join(named[-20:] + ["-- end of stderr:"] + done.stderr.splitlines()[-30:])


def worker(job, out):
    done = torchrun(WORKER, job, str(out))
    assert done.returncode == 0, failure(done)
    return torch.load(out, weights_only=False)


def test_single_process_defaults():
    assert (parallel.rank(), parallel.world_size(), parallel.is_writer()) == (0, 1, True)
    assert list(parallel.shard(3)) == [0, 1, 2]
    assert parallel.gather([1, 2], 2) == [1, 2]
    assert parallel.exchanged_bytes(4, 10) == 0
    assert parallel.exchanged_bytes(5, 10, element_size=4, size=2) == 1 * 3 * 10 * 4
    parallel.check_meta_batch(1)


def test_collectives_add_in_trajectory_order(tmp_path):
    from parallel_worker import vectors

    everyone = worker("collectives", tmp_path / "out.pt")
    expected = vectors(5, 1031)
    total = expected[0].clone()
    for v in expected[1:]:
        total += v
    for rank, (combined, items, value, error) in enumerate(everyone):
        assert torch.equal(combined, total)  # the same bits as one process adding 0, 1, ..., 4
        assert items == [f"item {m} from rank {m % 2}" for m in range(5)]
        assert value == {"rank": 0}  # rank 0's value, on every rank
        assert "not a number" in error  # rank 0's exception, raised on every rank


def test_two_processes_step_with_the_mean_of_the_trajectories(tmp_path, digits):
    from parallel_worker import recording_step

    torch.set_num_threads(1)
    own, stepped = recording_step(tiny(meta_batch=4, clip=1e9), digits)
    everyone = worker("step", tmp_path / "out.pt")
    for rank, (shard, their_own, their_stepped) in enumerate(everyone):
        assert shard == list(range(rank, 4, 2))
        for m, grads in zip(shard, their_own):  # each trajectory computed as one process computes it
            for name in grads:
                assert torch.equal(grads[name], own[m][name])
        for name in stepped:  # the combined gradient: one process's, bit for bit
            assert torch.equal(their_stepped[name], stepped[name])
    for name in stepped:  # and it is the mean of the trajectories' hypergradients
        total = own[0][name].clone()
        for grads in own[1:]:
            total += grads[name]
        assert torch.equal(stepped[name], total / 4)


def test_two_processes_distill_as_one_with_the_same_meta_batch(tmp_path, digits):
    torch.set_num_threads(1)
    config = tiny(meta_batch=2, iterations=5, checkpoint_every=2, val_nets=3)
    alone = distill_module.distill(config, digits, progress=False)
    two = worker("run", str(tmp_path / "two.pt"))
    for name, value in alone.memory.state_dict().items():
        assert torch.equal(two["memory"][name], value)
    assert records(two["log"]) == records(alone.log)
    assert two["val"] == alone.val.runs and len(two["val"]) == 3  # the networks were shared out, then gathered
    assert sorted(os.listdir(tmp_path / "two.pt.run")) == ["bases.png", "checkpoint.pt", "config.yaml",
                                                            "log.jsonl", "memory.pt", "recall.png"]


def test_meta_batch_one_is_the_single_trajectory_step(digits):
    """M = 1 is the outer step as it always was: M = 2's first trajectory
    draws the same network, rows and real batch."""
    torch.set_num_threads(1)
    from parallel_worker import recording_step

    one, _ = recording_step(tiny(meta_batch=1, clip=1e9), digits)
    two, _ = recording_step(tiny(meta_batch=2, clip=1e9), digits)
    assert len(one) == 1 and len(two) == 2
    for name in one[0]:
        assert torch.equal(one[0][name], two[0][name])
        assert not torch.equal(two[0][name], two[1][name])  # the second trajectory is its own draw


def test_resume_under_torchrun_equals_one_uninterrupted_process(tmp_path, digits):
    torch.set_num_threads(1)
    config = tiny(meta_batch=2, iterations=5, checkpoint_every=2, val_nets=3)
    alone = distill_module.distill(config, digits, progress=False)
    out = str(tmp_path / "cut.pt")
    done = torchrun(WORKER, "interrupt", out)
    assert done.returncode == 0, failure(done)
    assert torch.load(out + ".run/checkpoint.pt", weights_only=True)["iteration"] == 2
    resumed = worker("resume", out)
    for name, value in alone.memory.state_dict().items():
        assert torch.equal(resumed["memory"][name], value)
    assert records(resumed["log"]) == records(alone.log)


def test_meta_batch_smaller_than_the_processes_is_refused(monkeypatch, digits):
    monkeypatch.setattr(parallel, "world_size", lambda: 4)
    with pytest.raises(ValueError, match="meta_batch 2 is smaller than the 4 processes"):
        distill_module.distill(tiny(meta_batch=2), digits, progress=False)


def test_cli_under_torchrun(tmp_path):
    """`torchrun -m addrmem distill`: one results table, rank 0's files, and
    the results of one process; then --resume of the finished run."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**tiny(meta_batch=2, threads=1).to_dict(), "iterations": 2}))
    done = torchrun("-m", "addrmem", "distill", "--config", str(config), "--out", str(tmp_path / "two"), cwd=tmp_path)
    assert done.returncode == 0, failure(done)
    assert done.stdout.count("test accuracy (%)") == 1 and "2 processes" in done.stdout
    single = subprocess.run([sys.executable, "-m", "addrmem", "distill", "--config", str(config), "--out",
                             str(tmp_path / "one")], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert single.returncode == 0, failure(single)
    results = [json.loads((tmp_path / name / "results.json").read_text()) for name in ("two", "one")]
    assert results[0]["methods"] == results[1]["methods"]
    assert DistillConfig.from_yaml(tmp_path / "two" / "config.yaml").meta_batch == 2
    again = torchrun("-m", "addrmem", "distill", "--resume", str(tmp_path / "two"), cwd=tmp_path)
    assert again.returncode == 0, failure(again)
    assert again.stdout.count("test accuracy (%)") == 1


def test_cli_error_under_torchrun_is_one_line(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    done = torchrun("-m", "addrmem", "distill", "--iterations", "1", "--out", str(tmp_path / "full"), cwd=tmp_path)
    assert done.returncode != 0
    assert done.stderr.count("addrmem: error:") == 1 and "is not empty" in done.stderr
    assert (tmp_path / "full" / "x").read_text() == "mine"


def test_continual_under_torchrun_equals_one_process(tmp_path):
    """`torchrun -m addrmem continual`: each task's distillation shared out
    over 2 processes, the same results as one process."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"tasks": 2, "epochs": 1, "batch": 16, "methods": ["replay", "addressable"],
                                      "distill": {"iterations": 2, "steps": 2, "n_per_c": 2, "real_per_class": 8,
                                                  "meta_batch": 2}}))
    done = torchrun("-m", "addrmem", "continual", "--config", str(config), "--out", str(tmp_path / "two"), cwd=tmp_path)
    assert done.returncode == 0, failure(done)
    assert done.stdout.count("split-digits: 2 tasks") == 1 and done.stdout.count("device: cpu") == 1
    single = subprocess.run([sys.executable, "-m", "addrmem", "continual", "--config", str(config), "--out",
                             str(tmp_path / "one")], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert single.returncode == 0, failure(single)
    results = [json.loads((tmp_path / name / "results.json").read_text()) for name in ("two", "one")]
    for method in ("replay", "addressable"):
        assert results[0]["methods"][method]["R"] == results[1]["methods"][method]["R"]


def test_other_ranks_report_only_their_own_errors(monkeypatch, capsys, tmp_path):
    from addrmem import cli

    monkeypatch.setattr(parallel, "is_writer", lambda: False)
    monkeypatch.setattr(parallel, "rank", lambda: 1)
    with pytest.raises(SystemExit) as stop:  # an error of this rank alone: said, with the rank
        cli.main(["distill", "--device", "cuda:99", "--out", str(tmp_path / "a")])
    assert stop.value.code == 1
    assert capsys.readouterr().err.startswith("addrmem: error (rank 1): device 'cuda:99'")

    def shared_error(*args, **kwargs):
        exc = FileExistsError("'x' is not empty")
        exc.raised_on_writer = True  # as from_writer raises rank 0's error on the other ranks
        raise exc

    monkeypatch.setattr(cli, "run_experiment", shared_error)
    with pytest.raises(SystemExit) as stop:  # rank 0's error: rank 0 says it, this rank is silent
        cli.main(["distill", "--out", str(tmp_path / "b")])
    assert stop.value.code == 1 and capsys.readouterr().err == ""
