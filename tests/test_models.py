"""common.models: torchvision-exact shapes, CIFAR stem, width, norms, MLP heads."""
import pytest
import torch
import torchvision

from common.models import mlp, resnet


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_full_width_matches_torchvision_and_loads_its_weights(arch):
    net, dim = resnet(arch, width=64, cifar_stem=False)
    ref = getattr(torchvision.models, arch)(weights=None).state_dict()
    ref = {k: v for k, v in ref.items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in ref.items()}
    net.load_state_dict(ref)  # strict: torchvision weights load
    assert dim == {"resnet18": 512, "resnet50": 2048}[arch]
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, dim)


def test_cifar_stem_has_3x3_stride1_conv_and_no_maxpool():
    net, _ = resnet("resnet18", cifar_stem=True)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity)
    # a 32x32 input keeps 4x4 spatial size before the pool (no early downsampling)
    feats = {}
    net.layer4.register_forward_hook(lambda m, i, o: feats.update(o=o))
    net(torch.randn(1, 3, 32, 32))
    assert feats["o"].shape[-1] == 4


@pytest.mark.parametrize("norm,kind", [("bn", torch.nn.BatchNorm2d), ("gn", torch.nn.GroupNorm),
                                       ("ln", torch.nn.GroupNorm), ("none", None)])
def test_width_and_norm(norm, kind):
    net, dim = resnet("resnet18", width=16, cifar_stem=True, norm=norm)
    assert dim == 128 and net(torch.randn(2, 3, 16, 16)).shape == (2, 128)
    norms = [m for m in net.modules() if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm))]
    assert (not norms) if kind is None else all(isinstance(m, kind) for m in norms) and norms
    if norm == "ln":
        assert all(m.num_groups == 1 for m in norms)


def test_zero_init_residual():
    net, _ = resnet("resnet50", width=16, zero_init_residual=True)
    assert all(b.bn3.weight.abs().sum() == 0 for b in net.layer1)


def test_mlp_shape():
    head = mlp(8, 32, 4, layers=3, norm="bn", last_norm=True)
    lin = [m for m in head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in lin] == [(8, 32), (32, 32), (32, 4)]
    assert isinstance(head[-1], torch.nn.BatchNorm1d) and not head[-1].affine
    assert head(torch.randn(5, 8)).shape == (5, 4)
