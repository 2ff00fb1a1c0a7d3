"""fxlra.nn: the pseudo-convolution (forward vs a materialised torch computation, fixed seeded
masks at any size, state_dict round trips, strides), its rec-LRA rule vs the reference
interpreter (hypothesis), ``perturbative(model)`` on ResNet-18, and LocallyConnected2d (forward
vs a loop, rule vs the reference)."""
import io

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings, strategies as st
from torch import nn

import fxlra
from fxlra.nn import LEAF_MODULES, LocallyConnected2d, PerturbativeConv2d, perturbative
from test_codegen import assert_same_updates


pytestmark = pytest.mark.usefixtures("one_thread")


# -- PerturbativeConv2d: forward ------------------------------------------------------------------
def materialised(layer, x):
    """The pseudo-convolution written out: pool by the stride, repeat every channel over its
    masks, add the masks, relu, 1x1 conv."""
    if layer.stride != (1, 1):
        x = F.avg_pool2d(x, layer.stride, layer.stride, ceil_mode=True)
    b, c, h, w = x.shape
    n = layer.noise[:, :h, :w].to(x.dtype).reshape(c, layer.nmasks, h, w)
    u = torch.relu(x[:, :, None] + n[None]).reshape(b, c * layer.nmasks, h, w)
    return F.conv2d(u, layer.weight, layer.bias)


@settings(max_examples=25, deadline=None)
@given(c_in=st.integers(1, 4), c_out=st.integers(1, 4), nmasks=st.integers(1, 5),
       stride=st.integers(1, 3), h=st.integers(3, 19), w=st.integers(3, 19),
       bias=st.booleans())
def test_forward_equals_the_materialised_computation(c_in, c_out, nmasks, stride, h, w, bias):
    layer = PerturbativeConv2d(c_in, c_out, nmasks, level=0.5, stride=stride, seed=3,
                               bias=bias).double()
    x = torch.randn(2, c_in, h, w, dtype=torch.float64)
    out = layer(x)
    assert out.shape == (2, c_out, -(-h // stride), -(-w // stride))
    torch.testing.assert_close(out, materialised(layer, x), rtol=1e-12, atol=1e-12)
    # same output size as the 3x3, padding-1 conv it replaces
    assert out.shape == nn.Conv2d(c_in, c_out, 3, stride, 1).double()(x).shape


def test_masks_are_gaussian_with_std_level_and_differ_across_channels_and_masks():
    layer = PerturbativeConv2d(3, 2, nmasks=4, level=0.2, seed=0)
    n = layer.masks(64, 64)
    assert n.shape == (12, 64, 64)
    assert abs(n.std().item() - 0.2) < 0.01 and abs(n.mean().item()) < 0.01
    assert not torch.equal(n[0], n[1]) and not torch.equal(n[0], n[4])


def test_masks_stay_fixed_across_calls_and_sizes():
    layer = PerturbativeConv2d(2, 3, nmasks=2, seed=7)
    layer(torch.randn(1, 2, 10, 6))
    first = layer.masks(10, 6).clone()
    layer(torch.randn(4, 2, 10, 6))
    assert torch.equal(layer.masks(10, 6), first)
    layer(torch.randn(1, 2, 33, 40))            # a larger size grows the field ...
    assert layer.noise.shape[1:] == (40, 40)
    assert torch.equal(layer.masks(10, 6), first)   # ... without changing the masks seen
    small = PerturbativeConv2d(2, 3, nmasks=2, seed=7)
    small(torch.randn(1, 2, 33, 40))            # sizes seen in another order
    assert torch.equal(small.masks(10, 6), first)
    assert torch.equal(small.noise, layer.noise)


def test_same_seed_same_masks_other_seed_other_masks():
    a, b = PerturbativeConv2d(3, 2, 4, seed=11), PerturbativeConv2d(3, 2, 4, seed=11)
    c = PerturbativeConv2d(3, 2, 4, seed=12)
    assert torch.equal(a.masks(12, 12), b.masks(12, 12))
    assert not torch.equal(a.masks(12, 12), c.masks(12, 12))
    torch.manual_seed(5)
    d = PerturbativeConv2d(3, 2, 4)             # seed=None: drawn from torch's RNG
    torch.manual_seed(5)
    e = PerturbativeConv2d(3, 2, 4)
    assert int(d.noise_seed) == int(e.noise_seed)
    assert torch.equal(d.masks(9, 9), e.masks(9, 9))


def test_state_dict_round_trip_keeps_masks_and_output():
    layer = PerturbativeConv2d(2, 3, nmasks=3, stride=2, seed=1, bias=True)
    x = torch.randn(2, 2, 20, 20)
    out = layer(x)
    state = layer.state_dict()
    assert {"noise", "noise_seed", "weight", "bias"} <= set(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh = PerturbativeConv2d(2, 3, nmasks=3, stride=2, seed=99, bias=True)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(fresh.noise, layer.noise)
    assert torch.equal(fresh(x), out)
    fresh(torch.randn(1, 2, 60, 60))            # growing after a load follows the saved seed
    assert torch.equal(fresh.masks(10, 10), layer.masks(10, 10))
    assert torch.equal(fresh.masks(30, 30), PerturbativeConv2d(2, 3, 3, seed=1).masks(30, 30))


def test_dtype_and_device_moves_keep_the_masks():
    layer = PerturbativeConv2d(2, 2, 2, seed=4)
    n = layer.masks(8, 8).clone()
    layer.double()
    assert layer.noise.dtype == torch.float64
    torch.testing.assert_close(layer.masks(8, 8).float(), n)


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        PerturbativeConv2d(2, 2, nmasks=0)


# -- the rec-LRA rule: generated program == reference --------------------------------------------
class PNet(nn.Module):
    def __init__(self, c_in, width, nmasks, stride, bias, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(c_in, width, 3, padding=1)
        self.p1 = PerturbativeConv2d(width, width, nmasks, 0.3, stride, seed=1, bias=bias)
        self.bn = nn.BatchNorm2d(width)
        self.p2 = PerturbativeConv2d(width, width + 1, nmasks, 0.3, 1, seed=2)
        self.fc = nn.Linear(width + 1, classes)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = torch.relu(self.bn(self.p1(h)))
        h = torch.tanh(self.p2(h))
        return self.fc(h.mean((2, 3)))


@settings(max_examples=12, deadline=None)
@given(c_in=st.integers(1, 3), width=st.integers(1, 4), nmasks=st.integers(1, 4),
       stride=st.integers(1, 3), size=st.integers(4, 11), bias=st.booleans(),
       wiring=st.sampled_from(["pairwise", "direct"]))
def test_perturbative_rule_equals_the_reference(c_in, width, nmasks, stride, size, bias, wiring):
    torch.manual_seed(0)
    model = PNet(c_in, width, nmasks, stride, bias).double()
    prog = fxlra.compile(model, wiring=wiring, leaf_modules=LEAF_MODULES, error_init_std=0.5)
    assert prog.fallbacks == ()
    assert "local.perturbative_grads" in prog.code
    x = torch.randn(3, c_in, size, size + 1, dtype=torch.float64)
    assert_same_updates(prog, x, torch.tensor([0, 1, 2]))


def test_perturbative_rule_is_the_papers_sum():
    layer = PerturbativeConv2d(2, 3, nmasks=2, level=0.4, seed=0).double()
    x, e = torch.randn(4, 2, 5, 5).double(), torch.randn(4, 3, 5, 5).double()
    dw = fxlra.ops.local.perturbative_grads(layer, x, e)["weight"]
    n = layer.masks(5, 5)
    for o in range(3):
        for i in range(2):
            for m in range(2):
                want = (e[:, o] * torch.relu(x[:, i] + n[i * 2 + m])).sum()
                torch.testing.assert_close(dw[o, i * 2 + m, 0, 0], want)


# -- perturbative(model) ---------------------------------------------------------------------------
def test_perturbative_replaces_resnet18_kxk_convs_but_the_stem():
    model = torchvision.models.resnet18(num_classes=10)
    new, report = perturbative(model, nmasks=2, level=0.1)
    convs = [n for n, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    assert [name for name, _, _ in report] == convs[1:]      # 16 3x3 convs, stem kept
    assert len(report) == 16 and report.kept == [("conv1", "the stem (keep_stem=True)")]
    assert "layer1.0.conv1" in str(report) and "kept conv1" in str(report)
    for name, old, layer in report:
        assert new.get_submodule(name) is layer
        assert torch.equal(old.weight, model.get_submodule(name).weight)
        assert (layer.in_channels, layer.out_channels, layer.stride) == \
            (old.in_channels, old.out_channels, old.stride)
    assert type(new.conv1) is nn.Conv2d and type(new.layer2[0].downsample[0]) is nn.Conv2d
    assert type(model.layer1[0].conv1) is nn.Conv2d          # the original is untouched
    x = torch.randn(2, 3, 64, 64)
    assert new(x).shape == model(x).shape == (2, 10)
    seeds = {int(layer.noise_seed) for _, _, layer in report}
    assert len(seeds) == 16
    _, everything = perturbative(model, nmasks=2, keep_stem=False)
    assert len(everything) == 17 and everything.kept == []


def test_perturbative_keeps_convs_that_would_change_the_size():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3),
                          nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Conv2d(4, 4, 5, padding=2))
    new, report = perturbative(model, nmasks=1)
    assert [n for n, _, _ in report] == ["3"]
    assert [n for n, _ in report.kept] == ["0", "1", "2"]
    assert new(torch.randn(1, 3, 9, 9)).shape == model(torch.randn(1, 3, 9, 9)).shape


# -- LocallyConnected2d ----------------------------------------------------------------------------
def loop_reference(layer, x):
    kh, kw = layer.kernel_size
    sh, sw = layer.stride
    x = F.pad(x, (layer.padding[1],) * 2 + (layer.padding[0],) * 2)
    oh, ow = layer.output_size
    out = torch.zeros(x.shape[0], layer.out_channels, oh, ow, dtype=x.dtype)
    for r in range(oh):
        for c in range(ow):
            patch = x[:, :, r * sh:r * sh + kh, c * sw:c * sw + kw].reshape(x.shape[0], -1)
            w = layer.weight[r * ow + c]                      # (out, in*kh*kw)
            out[:, :, r, c] = patch @ w.t()
            if layer.bias is not None:
                out[:, :, r, c] += layer.bias[:, r, c]
    return out


@settings(max_examples=20, deadline=None)
@given(c_in=st.integers(1, 3), c_out=st.integers(1, 3), k=st.integers(1, 4),
       stride=st.integers(1, 2), padding=st.integers(0, 2), h=st.integers(4, 9),
       w=st.integers(4, 9), bias=st.booleans())
def test_locally_connected_forward_equals_a_loop(c_in, c_out, k, stride, padding, h, w, bias):
    layer = LocallyConnected2d(c_in, c_out, k, (h, w), stride, padding, bias).double()
    x = torch.randn(2, c_in, h, w, dtype=torch.float64)
    torch.testing.assert_close(layer(x), loop_reference(layer, x), rtol=1e-12, atol=1e-12)


def test_locally_connected_weights_are_not_shared():
    layer = LocallyConnected2d(1, 1, 3, (5, 5), bias=False)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[4].fill_(1.0)                            # only the centre position
    out = layer(torch.ones(1, 1, 5, 5))
    assert out[0, 0, 1, 1] == 9 and out.sum() == 9


def test_locally_connected_rejects_other_sizes():
    layer = LocallyConnected2d(2, 2, 3, 8)
    with pytest.raises(ValueError, match="expects inputs"):
        layer(torch.randn(1, 2, 9, 8))
    with pytest.raises(ValueError):
        LocallyConnected2d(2, 2, 5, 3)


class LCNet(nn.Module):
    def __init__(self, c_in, width, k, stride, size, bias):
        super().__init__()
        self.lc1 = LocallyConnected2d(c_in, width, k, size, stride, k // 2, bias)
        self.lc2 = LocallyConnected2d(width, width, k, self.lc1.output_size, 1, k // 2, bias)
        self.fc = nn.Linear(width * self.lc2.output_size[0] * self.lc2.output_size[1], 3)

    def forward(self, x):
        h = torch.relu(self.lc1(x))
        h = torch.tanh(self.lc2(h))
        return self.fc(h.flatten(1))


@settings(max_examples=12, deadline=None)
@given(c_in=st.integers(1, 3), width=st.integers(1, 4), k=st.integers(1, 3),
       stride=st.integers(1, 2), size=st.integers(4, 8), bias=st.booleans(),
       wiring=st.sampled_from(["pairwise", "direct"]))
def test_locally_connected_rule_equals_the_reference(c_in, width, k, stride, size, bias, wiring):
    torch.manual_seed(0)
    model = LCNet(c_in, width, k, stride, size, bias).double()
    x = torch.randn(3, c_in, size, size, dtype=torch.float64)
    prog = fxlra.compile(model, wiring=wiring, leaf_modules=LEAF_MODULES, error_init_std=0.5,
                         example_inputs=x)
    assert prog.fallbacks == ()
    assert "local.locally_connected_grads" in prog.code
    assert_same_updates(prog, x, torch.tensor([0, 1, 2]))
