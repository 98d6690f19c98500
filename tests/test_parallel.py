"""addrmem.parallel and the meta-batch: two gloo processes started with
torchrun give what one process gives, bit for bit (one thread each), and a
run interrupted under torchrun resumes to the same memory."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import yaml
from tiny_run import digits, records, tiny  # noqa: F401 (digits: a fixture)

from addrmem import distill as distill_module
from addrmem import parallel
from addrmem.config import DistillConfig

WORKER = os.path.join(os.path.dirname(__file__), "parallel_worker.py")


def torchrun(*args, nproc=2, cwd=None, timeout=300):
    """Run ``args`` under torchrun with ``nproc`` CPU processes; returns the completed process. Give a ``cwd``
    outside the repository for ``-m addrmem``, so that it imports the installed package."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={nproc}", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=cwd)
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


def test_a_killed_worker_restarted_by_torchrun_resumes_to_the_uninterrupted_result(tmp_path):
    """torchrun --max-restarts 1 restarts both workers after one is killed; `--out` resumes the run from its
    checkpoint, to the results and memory of an uninterrupted run."""
    from addrmem.cli import main
    from addrmem.memory import load_memory

    out = tmp_path / "elastic"
    (tmp_path / "elastic.yaml").write_text(yaml.safe_dump(tiny(meta_batch=2, threads=1).to_dict()))
    done = torchrun("--max-restarts", "1", WORKER, "elastic", str(out), timeout=900)  # two starts of the group
    assert done.returncode == 0, failure(done)
    assert f"resuming {out}.run from its last checkpoint" in done.stdout
    assert main(["distill", "--config", str(tmp_path / "elastic.yaml"), "--out", str(tmp_path / "one")]) == 0
    results = [json.loads((folder / "results.json").read_text()) for folder in (tmp_path / "elastic.run",
                                                                                 tmp_path / "one")]
    assert results[0]["methods"] == results[1]["methods"]
    for name in ("memory.pt", "baseline-image/memory.pt"):
        memories = [load_memory(str(folder / name)) for folder in (tmp_path / "elastic.run", tmp_path / "one")]
        for key, value in memories[1].state_dict().items():
            assert torch.equal(memories[0].state_dict()[key], value)


def test_cli_error_under_torchrun_is_one_line(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    done = torchrun("-m", "addrmem", "distill", "--iterations", "1", "--meta-batch", "2", "--out",
                    str(tmp_path / "full"), cwd=tmp_path)
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


def test_one_rank_reports_each_error(monkeypatch, capsys, tmp_path):
    """The rank an error names as its reporter says it, once; the other ranks stay silent."""
    from addrmem import cli

    monkeypatch.setattr(parallel, "is_writer", lambda: False)
    monkeypatch.setattr(parallel, "rank", lambda: 1)
    with pytest.raises(SystemExit) as stop:  # an error of this rank alone: said, with the rank
        cli.main(["distill", "--device", "cuda:99", "--out", str(tmp_path / "a")])
    assert stop.value.code.startswith("addrmem: error (rank 1): device 'cuda:99'")

    def shared_error(*args, **kwargs):
        exc = FileExistsError("'x' is not empty")
        exc.reporter = 0  # as from_writer and everywhere raise rank 0's error on the other ranks
        raise exc

    monkeypatch.setattr(cli, "run_experiment", shared_error)
    with pytest.raises(SystemExit) as stop:  # rank 0's error: rank 0 says it, this rank is silent
        cli.main(["distill", "--out", str(tmp_path / "b")])
    assert stop.value.code == 1 and capsys.readouterr().err == ""


@pytest.mark.parametrize("flag, value, match", [("--meta-batch", "1", "meta_batch 1 is smaller than the 2 processes"),
                                                ("--device", "cuda", "torch sees no CUDA GPU")])
def test_an_error_every_rank_meets_is_said_once_before_the_folder_is_written(tmp_path, flag, value, match):
    done = torchrun("-m", "addrmem", "distill", flag, value, "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert done.returncode != 0
    assert done.stderr.count("addrmem: error") == 1 and match in done.stderr, failure(done)
    assert not (tmp_path / "run").exists()


def test_a_lost_peer_is_one_line_with_the_resume_hint(monkeypatch, tmp_path):
    from addrmem import cli

    out = tmp_path / "run"

    def peer_lost(config, *args, **kwargs):
        out.mkdir()
        config.to_yaml(out / "config.yaml")
        raise parallel.PeerError("another process of the group stopped")

    monkeypatch.setattr(cli, "run_experiment", peer_lost)
    with pytest.raises(SystemExit) as stop:
        cli.main(["distill", "--out", str(out)])
    assert stop.value.code == (f"addrmem: error: another process of the group stopped; continue with: addrmem "
                               f"distill --resume {out} (under torchrun --max-restarts, a restart resumes it by "
                               f"itself)")


def test_the_group_timeout_is_a_setting(monkeypatch, tmp_path):
    from addrmem import cli

    seen = []
    monkeypatch.setattr(parallel, "setup", lambda timeout: seen.append(timeout) or "")
    monkeypatch.setattr(cli, "run_experiment", lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt))
    for argv in (["--timeout", "42"], []):
        with pytest.raises(SystemExit):
            cli.main(["distill", *argv, "--out", str(tmp_path / "run")])
    assert seen == [42.0, parallel.DEFAULT_TIMEOUT]


def test_query_under_torchrun_is_refused_once(tmp_path):
    done = torchrun("-m", "addrmem", "query", str(tmp_path / "run"), "--map", "parity", cwd=tmp_path)
    assert done.returncode != 0
    assert done.stderr.count("addrmem: error: addrmem query runs in one process: run it without torchrun") == 1


def test_eval_under_torchrun_shares_the_networks_out(tmp_path):
    from addrmem.cli import main

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny(iterations=1, eval_every=1, threads=1).to_dict()))
    assert main(["distill", "--config", str(config), "--out", str(tmp_path / "run")]) == 0
    alone = subprocess.run([sys.executable, "-m", "addrmem", "eval", str(tmp_path / "run"), "--nets", "3"],
                           capture_output=True, text=True, cwd=tmp_path,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert alone.returncode == 0, failure(alone)
    done = torchrun("-m", "addrmem", "eval", str(tmp_path / "run"), "--nets", "3", cwd=tmp_path)
    assert done.returncode == 0, failure(done)
    lines = [line for line in done.stdout.splitlines() if line.startswith("test accuracy")]
    assert lines == [line for line in alone.stdout.splitlines() if line.startswith("test accuracy")]


def test_workers_stop_when_torchrun_dies(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                              WORKER, "linger", str(tmp_path / "pid")], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        files = [tmp_path / "pid.0", tmp_path / "pid.1"]
        pids = wait_for(lambda: all(f.exists() for f in files) and [int(f.read_text()) for f in files])
        agent.kill()
        agent.wait()
        assert wait_for(lambda: not any(alive(pid) for pid in pids) or None)
    finally:
        agent.kill()


def wait_for(probe, seconds=120):
    """probe()'s first truthy value, polled twice a second for up to ``seconds``."""
    for _ in range(2 * seconds):
        value = probe()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {seconds} s")


def alive(pid) -> bool:
    """Whether process ``pid`` runs (a zombie, waiting for its parent to reap it, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
