"""addrmem/continual/learner.py: the protocols. Under "online" a replay
buffer fills while the task streams and every batch takes ``glances``
steps; under "replay" the memory is of earlier tasks only; under "retrain"
a fresh learner trains on the memory alone."""

import torch

from addrmem.continual import ContinualConfig, learn, make_learner, make_method, make_stream
from continual_helpers import TINY


class CountingSGD(torch.optim.SGD):
    steps = 0

    def step(self, *args, **kw):
        CountingSGD.steps += 1
        return super().step(*args, **kw)


def run_task(monkeypatch, protocol, name="replay", **fields):
    config = ContinualConfig(**{**TINY, **fields}, protocol=protocol)
    stream = make_stream(config)
    method = make_method(name, config, stream)
    recalls = []
    real_recalled = method.recalled

    def spy():
        out = real_recalled()
        recalls.append(0 if out is None else len(out[1]))
        return out

    monkeypatch.setattr(method, "recalled", spy)
    monkeypatch.setattr(torch.optim, "SGD", CountingSGD)
    CountingSGD.steps = 0
    images, labels = stream.train(0)
    net = learn(make_learner(config, stream), method, config, 0, images, labels)
    return config, method, recalls, CountingSGD.steps, net, len(labels)


def test_online_fills_the_buffer_while_the_task_streams_and_glances(monkeypatch):
    config, method, recalls, steps, _, n = run_task(monkeypatch, "online", glances=3, budget_images=1000)
    batches = -(-n // config.batch)
    assert steps == 3 * batches  # one pass, three steps per batch
    assert recalls[0] == 0 and recalls[-1] == (batches - 1) * config.batch  # all but the last batch
    assert recalls == sorted(recalls) and recalls[3] == config.batch  # the task's earlier batches are replayed
    assert len(method.labels) == n  # every image of the task went through the buffer


def test_replay_draws_from_earlier_tasks_only(monkeypatch):
    config, method, recalls, steps, _, n = run_task(monkeypatch, "replay", glances=2)
    assert steps == 2 * -(-n // config.batch) and set(recalls) == {0}  # nothing before the first task
    assert len(method.labels) == 200  # the task is remembered after it is learnt (the buffer full)


def test_distilled_memories_take_the_whole_task_after_it_under_online(monkeypatch):
    _, method, recalls, _, _, _ = run_task(monkeypatch, "online", name="compressed")
    assert set(recalls) == {0} and len(method.memories) == 1


def test_retrain_trains_a_fresh_learner_on_the_memory(monkeypatch):
    config, method, recalls, steps, net, n = run_task(monkeypatch, "retrain", budget_images=20)
    assert steps == config.epochs * -(-20 // config.batch)  # the buffer's 20 images, not the task's n
    fresh = make_learner(config, method.stream)
    assert any(not torch.equal(p, q) for p, q in zip(net.parameters(), fresh.parameters()))
