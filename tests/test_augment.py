"""addrmem.augment: the Siamese (one draw per outer iteration) and per-image
flip/rotate augmentation (docs/method.md, "Augmentation")."""

import pytest
import torch

from addrmem.augment import MAX_ANGLE, SiameseAugment, augment_per_image


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def images(n=4, dtype=torch.float64):
    return torch.randn(n, 3, 6, 6, generator=gen(1), dtype=dtype)


def test_flip_is_exact_and_identity_is_a_no_op():
    x = images()
    assert torch.equal(SiameseAugment(flip=True)(x), x.flip(-1))
    assert SiameseAugment()(x) is x


def test_rotation_convention():
    x = images()
    torch.testing.assert_close(SiameseAugment(angle=90.0)(x), torch.rot90(x, 1, (-2, -1)), rtol=0, atol=1e-12)
    small = SiameseAugment(angle=3.0)(x)
    assert 0 < (small - x).abs().max() < x.abs().max()


def test_siamese_is_identical_on_every_call_and_any_batch():
    aug = SiameseAugment(flip=True, angle=-7.5)
    x = images(5)
    assert torch.equal(aug(x), aug(x))
    assert torch.equal(aug(x[:2]), aug(x)[:2])


def test_siamese_is_differentiable():
    aug = SiameseAugment(flip=True, angle=11.0)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=gen(2), requires_grad=True)
    assert torch.autograd.gradcheck(aug, (x,))
    assert torch.autograd.gradgradcheck(aug, (x,))


def test_draw_distribution_and_reproducibility():
    g = gen(3)
    draws = [SiameseAugment.draw(g) for _ in range(2000)]
    again = [SiameseAugment.draw(h) for h in [gen(3)] for _ in range(5)]
    assert [(d.flip, d.angle) for d in draws[:5]] == [(d.flip, d.angle) for d in again]
    rotations = [d.angle for d in draws if d.angle]
    flips = [d.flip for d in draws if not d.angle]
    assert all(not d.flip for d in draws if d.angle)  # one operation per draw
    assert 900 < len(rotations) < 1100 and 400 < sum(flips) < 600
    assert all(-MAX_ANGLE <= a <= MAX_ANGLE for a in rotations)
    assert min(rotations) < -13 and max(rotations) > 13


def test_per_image_is_independent_per_image_and_reproducible():
    x = images(64)
    g = gen(4)
    outs = [augment_per_image(x, g) for _ in range(6)]
    assert torch.equal(outs[0], augment_per_image(x, gen(4)))
    for out in outs:
        assert out.shape == x.shape
        flipped = (out == x.flip(-1)).flatten(1).all(1)
        unchanged = (out == x).flatten(1).all(1)
        if bool((flipped | unchanged).all()):  # a flip minibatch: some images flipped, some not
            assert 10 < int(flipped.sum()) < 54
        else:  # a rotation minibatch: every image rotated by its own angle
            diffs = (out - x).flatten(1).abs().sum(1)
            assert len(set(diffs.tolist())) == 64
    kinds = {bool(((o == x) | (o == x.flip(-1))).all()) for o in outs}
    assert kinds == {True, False}


def test_bad_images():
    with pytest.raises(ValueError):
        SiameseAugment(flip=True)(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError):
        augment_per_image(torch.zeros(2, 3, 4, 4, dtype=torch.long), gen())
