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
