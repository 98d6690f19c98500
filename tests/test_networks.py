"""addrmem.networks: ConvNet as in METHOD.md §4, MLP, the registry."""

import pytest
import torch
from torch import nn

from addrmem.networks import MLP, ConvNet, make_network


@pytest.mark.parametrize("shape, depth, flat", [
    ((1, 28, 28), 3, 128 * 4 * 4),  # padding 3 on the first layer: 32 -> 16 -> 8 -> 4
    ((3, 32, 32), 3, 128 * 4 * 4),
    ((3, 64, 64), 4, 128 * 4 * 4),
    ((1, 8, 8), 3, 128 * 1 * 1),  # sklearn digits
    ((3, 4, 6), 2, 128 * 1 * 1),
])
def test_convnet_default_depth_and_shapes(shape, depth, flat):
    net = ConvNet(shape[0], 10, shape[1:])
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert len(convs) == depth and len(norms) == depth
    assert all(n.num_groups == n.num_channels == 128 and n.affine for n in norms)
    assert convs[0].padding == ((3, 3) if shape == (1, 28, 28) else (1, 1))
    assert all(c.padding == (1, 1) and c.kernel_size == (3, 3) for c in convs[1:])
    assert net.classifier.in_features == flat
    out = net(torch.randn(2, *shape))
    assert type(out) is torch.Tensor and out.shape == (2, 10)
    assert not list(net.buffers())


def test_convnet_block_order_and_options():
    net = ConvNet(3, 5, 16, width=8, depth=2)
    kinds = [type(m) for m in net.features]
    assert kinds == [nn.Conv2d, nn.GroupNorm, nn.ReLU, nn.AvgPool2d] * 2
    bare = ConvNet(3, 5, (16, 16), width=8, depth=2, norm="none")
    assert not any(isinstance(m, nn.GroupNorm) for m in bare.modules())
    assert bare(torch.randn(1, 3, 16, 16)).shape == (1, 5)


@pytest.mark.parametrize("kwargs", [
    dict(depth=5),  # 16 px pooled 5 times
    dict(norm="batch"),
    dict(width=0),
    dict(image_size=(16,)),
    dict(image_size=1),
])
def test_convnet_bad_args(kwargs):
    with pytest.raises(ValueError):
        ConvNet(**{**dict(in_channels=3, num_classes=5, image_size=16), **kwargs})


def test_mlp():
    net = MLP((3, 4, 4), 7, hidden=16, depth=2)
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(48, 16), (16, 16), (16, 7)]
    assert net(torch.randn(5, 3, 4, 4)).shape == (5, 7)
    assert MLP(10, 3, depth=0)(torch.randn(2, 10)).shape == (2, 3)
    with pytest.raises(ValueError):
        MLP(10, 3, depth=-1)


@pytest.mark.parametrize("name", ["convnet", "ConvNet", "mlp"])
def test_make_network_seed_reproducible_and_global_rng_untouched(name):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = make_network(name, (3, 8, 8), 4, seed=1)
    b = make_network(name, (3, 8, 8), 4, seed=1)
    c = make_network(name, (3, 8, 8), 4, seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    for (na, pa), (nb, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
    assert a(torch.randn(2, 3, 8, 8)).shape == (2, 4)


def test_make_network_unknown():
    with pytest.raises(ValueError, match="unknown network"):
        make_network("resnet50", (3, 32, 32), 10)
