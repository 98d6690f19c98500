"""addrmem.evaluation: seeded training of fresh networks on given images."""

import pytest

from addrmem.evaluation import Accuracy, evaluate
from tiny_run import digits, tiny  # noqa: F401  (digits is a fixture)


def test_evaluate_is_seeded(digits):
    config = tiny(eval_epochs=50)
    images, labels = digits.train[0][:200], digits.train[1][:200]
    a = evaluate(images, labels, digits, config, 2, split="test", seed=1, progress=False)
    b = evaluate(images, labels, digits, config, 2, split="test", seed=1, progress=False)
    assert isinstance(a, Accuracy) and a == b and len(a.runs) == 2
    assert 30 < a.mean <= 100  # 50 full-batch steps on 200 real digits beat chance
    assert str(a) == f"{a.mean:.2f} ± {a.std:.2f}"
    with pytest.raises(ValueError, match="split"):
        evaluate(images, labels, digits, config, 1, split="train", progress=False)


def test_eval_steps_give_every_training_set_the_same_number_of_updates(digits, monkeypatch):
    """With eval_steps, S steps of eval_batch rows, epochs reshuffled, whatever the
    set's size; without, eval_epochs epochs (the last batch of each short)."""
    import torch

    steps = []
    real_step = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a, **k: steps.append(1) or real_step(self, *a, **k))
    images, labels = digits.train[0][:50], digits.train[1][:50]
    for n, config, expected in ((50, tiny(eval_steps=7, eval_batch=20), 7),  # 2.33 epochs
                                (5, tiny(eval_steps=7, eval_batch=20), 7),  # a batch holds all 5 images
                                (50, tiny(eval_epochs=2, eval_batch=20), 6)):  # 3 batches an epoch
        steps.clear()
        evaluate(images[:n], labels[:n], digits, config, 1, split="val", progress=False)
        assert len(steps) == expected
