"""addrmem.evaluation: seeded training of fresh networks on given images."""

import pytest
import torch

from addrmem.evaluation import Accuracy, EvalSettings, evaluate
from tiny_run import digits, tiny  # noqa: F401  (digits is a fixture)


def test_eval_settings_of_a_config():
    config = tiny(eval_epochs=5, eval_steps=7, eval_batch=20, eval_lr=0.5, eval_momentum=0.25, augment="flip_rotate",
                  dtype="float64", network="convnet", net_width=8)
    settings = EvalSettings.of(config)
    assert settings == EvalSettings(network="convnet:width=8", epochs=5, steps=7, batch=20, lr=0.5, momentum=0.25,
                                    augment=True, device=torch.device("cpu"), dtype=torch.float64)
    assert EvalSettings.of(tiny()).augment is False
    changed = EvalSettings.of(config, epochs=2, steps=0, network="mlp")
    assert (changed.epochs, changed.steps, changed.network, changed.batch) == (2, 0, "mlp", 20)
    with pytest.raises(TypeError):
        EvalSettings.of(config, eval_epochs=2)  # the settings' own names, not the config's


def test_evaluate_is_seeded(digits):
    config = EvalSettings.of(tiny(eval_epochs=50))
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
    steps = []
    real_step = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a, **k: steps.append(1) or real_step(self, *a, **k))
    images, labels = digits.train[0][:50], digits.train[1][:50]
    for n, config, expected in ((50, tiny(eval_steps=7, eval_batch=20), 7),  # 2.33 epochs
                                (5, tiny(eval_steps=7, eval_batch=20), 7),  # a batch holds all 5 images
                                (50, tiny(eval_epochs=2, eval_batch=20), 6)):  # 3 batches an epoch
        steps.clear()
        evaluate(images[:n], labels[:n], digits, EvalSettings.of(config), 1, split="val", progress=False)
        assert len(steps) == expected
