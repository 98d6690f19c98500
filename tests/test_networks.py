"""addrmem.networks: ConvNet as in docs/method.md, MLP, the cross-architecture
nets (AlexNet, VGG11, ResNet18), the registry."""

import pytest
import torch
from torch import nn

from addrmem.hypergradient import hypergradient
from addrmem.memory import AddressableMemory
from addrmem.networks import MLP, AlexNet, ConvNet, ResNet18, VGG11, make_network, network_spec, parse_network


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


def test_network_specs_set_the_size():
    net = make_network("convnet:width=16:depth=2:norm=none", (3, 32, 32), 10, seed=0)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 16]
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in net.modules())
    assert net.classifier.in_features == 16 * 8 * 8
    mlp = make_network("MLP:width=7:depth=1", (1, 8, 8), 3, seed=0)
    assert [m.out_features for m in mlp.modules() if isinstance(m, torch.nn.Linear)] == [7, 3]
    assert parse_network("convnet:depth=4") == ("convnet", {"depth": 4})
    assert network_spec("convnet", width=32, depth=None) == "convnet:width=32"
    with pytest.raises(ValueError, match="depth 6 pools"):
        make_network("convnet:depth=6", (3, 32, 32), 10)
    with pytest.raises(ValueError, match="norm must be"):
        make_network("convnet:norm=batch", (3, 32, 32), 10)


# The cross-architecture nets (docs/method.md): instance-norm AlexNet, VGG11, ResNet18.

CROSS_ARCH = {"alexnet": AlexNet, "vgg11": VGG11, "resnet18": ResNet18}


@pytest.mark.parametrize("name", sorted(CROSS_ARCH))
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 28, 28), (1, 32, 32)])
def test_cross_arch_shapes_and_no_buffers(name, shape):
    net = make_network(name, shape, 10, seed=0)
    assert type(net) is CROSS_ARCH[name]
    out = net(torch.randn(2, *shape))
    assert type(out) is torch.Tensor and out.shape == (2, 10)
    assert not list(net.buffers())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(n.num_groups == n.num_channels and n.affine for n in norms)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_cross_arch_definitions(shape):
    """The DC/MTT layer lists, feature sizes and parameter counts."""
    alex = AlexNet(shape[0], 10, shape[1:])
    convs = [m for m in alex.features if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size[0]) for c in convs] == [(128, 5), (192, 5), (256, 3), (192, 3), (192, 3)]
    assert convs[0].padding == ((4, 4) if shape[1] == 28 else (2, 2))
    assert sum(isinstance(m, nn.AvgPool2d) for m in alex.features) == 3
    assert alex.classifier.in_features == 192 * 4 * 4

    vgg = VGG11(shape[0], 10, shape[1:])
    convs = [m for m in vgg.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 256, 512, 512, 512, 512]
    assert convs[0].padding == ((3, 3) if shape[1] == 28 else (1, 1))
    assert sum(isinstance(m, nn.MaxPool2d) for m in vgg.features) == 5
    assert vgg.classifier.in_features == 512

    resnet = ResNet18(shape[0], 10, shape[1:])
    blocks = list(resnet.blocks)
    assert len(blocks) == 8
    assert [(b.conv1.out_channels, b.conv1.stride[0]) for b in blocks] == [
        (64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)]
    assert [isinstance(b.shortcut, nn.Identity) for b in blocks] == [True, True] + [False, True] * 3
    assert resnet.classifier.in_features == 512
    features = resnet.blocks(resnet.stem(torch.randn(1, *shape)))
    assert features.shape == (1, 512, 4, 4)  # DC/MTT's avg_pool2d(out, 4) is the global mean here

    counts = {name: sum(p.numel() for p in net.parameters()) for name, net in
              (("alexnet", alex), ("vgg11", vgg), ("resnet18", resnet))}
    first_conv = 64 * 9 * (shape[0] - 3)  # weights the first convolution loses on 1-channel input
    # torchvision's VGG11 convolutions, the norms' weights and biases, Linear(512, 10)
    assert counts["vgg11"] == 9_220_480 + first_conv + 2 * (64 + 128 + 2 * 256 + 4 * 512) + 5130
    assert counts["resnet18"] == 11_173_962 + first_conv  # the usual CIFAR ResNet18 count


@pytest.mark.parametrize("name, shape, layer", [
    ("vgg11", (1, 8, 8), "instance-norm layer would see a 1x1 map"),
    ("vgg11", (3, 16, 16), "instance-norm layer would see a 1x1 map"),
    ("resnet18", (1, 8, 8), "instance-norm layer would see a 1x1 map"),
    ("alexnet", (1, 6, 6), "instance-norm layer would see a 1x1 map"),
    ("alexnet", (1, 4, 16), "pooling layer would get a 1x4 map"),
])
def test_cross_arch_too_small_inputs_raise(name, shape, layer):
    with pytest.raises(ValueError, match=f"{CROSS_ARCH[name].__name__} cannot take .*{layer}"):
        make_network(name, shape, 10)


@pytest.mark.parametrize("name, shape, flat", [("alexnet", (1, 8, 8), 192), ("resnet18", (3, 9, 9), 512),
                                               ("vgg11", (3, 64, 64), 512 * 2 * 2)])
def test_cross_arch_other_sizes_that_fit(name, shape, flat):
    net = make_network(name, shape, 4)
    assert net.classifier.in_features == flat
    assert net(torch.randn(2, *shape)).shape == (2, 4)


@pytest.mark.parametrize("name", sorted(CROSS_ARCH))
def test_cross_arch_seeded_init(name):
    state = torch.get_rng_state()
    a, b, c = (make_network(name, (3, 32, 32), 10, seed=s) for s in (5, 5, 6))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.classifier.weight, c.classifier.weight)


@pytest.mark.parametrize("name", sorted(CROSS_ARCH))
def test_cross_arch_hypergradient_smoke(name):
    """One inner step, batch 2, through each net: finite loss and gradients."""
    g = torch.Generator().manual_seed(0)
    memory = AddressableMemory(2, (3, 32, 32), n_bases=2, per_class=2, downsample=2, generator=g)
    net = make_network(name, (3, 32, 32), 2, seed=0)
    loss, grads = hypergradient(memory, net, [torch.tensor([0, 3])], torch.randn(2, 3, 32, 32, generator=g),
                                torch.tensor([0, 1]), lr=0.01, momentum=0.9)
    assert torch.isfinite(loss)
    for param_name, p in memory.named_parameters():
        assert grads[param_name].shape == p.shape and torch.isfinite(grads[param_name]).all()
    assert grads["bases"].abs().max() > 0 and grads["addresses"][[0, 3]].abs().min() > 0
