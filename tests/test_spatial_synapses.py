"""The "spatial" error synapse (a vector error onto a whole feature map) and the normalisation
layers' input-VJP on the error path: explicit rules against torch.func, the ImageNet budget,
and the options' errors."""
import re

import pytest
import torch
import torchvision
from torch import nn

import fxlra
from fxlra.semantics import synapses as syn
from helpers import assert_matches_reference


@pytest.mark.parametrize("grid, shape", [((6, 6), (3, 4, 6, 6)), ((8, 8), (3, 4, 5, 5)),
                                         ((3, 3), (3, 4, 9, 7)), ((2, 5), (3, 4, 4, 4))])
def test_spatial_synapse_weight_gradient_equals_torch_func(grid, shape):
    """Full map, a finer grid pooled down, a coarser grid upsampled, and a mixed one."""
    torch.manual_seed(0)
    s = syn.Synapse("spatial", 5, 4, 1, 1, 0.1, grid).double()
    e, c = torch.randn(3, 5, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)
    d = s(e, shape)
    assert d.shape == shape
    params = dict(s.named_parameters())
    _, pullback = torch.func.vjp(lambda p: torch.func.functional_call(s, p, (e, shape)), params)
    torch.testing.assert_close(syn.weight_grads(s, e, c)[0], pullback(c)[0]["weight"])


def test_spatial_synapse_on_the_full_map_is_a_dense_map_per_position():
    s = syn.Synapse("spatial", 2, 3, std=1.0, grid=(2, 2))
    e = torch.tensor([[1.0, 0.0]])
    d = s(e, (1, 3, 2, 2))
    torch.testing.assert_close(d.flatten(), s.weight[:, 0])


def test_grid_shrinks_the_map_only_past_the_budget():
    assert syn.spatial_grid(10, 8, (28, 28)) == (28, 28)
    assert syn.spatial_grid(1000, 64, (56, 56), budget=1 << 20) == (4, 4)
    assert syn.spatial_grid(1000, 512, (7, 7), budget=1 << 20) == (1, 1)
    assert syn.spatial_grid(1000, 2048, (7, 7), budget=1 << 20) == (1, 1)   # never below 1x1


@pytest.mark.parametrize("scope", ["layer", "block", "stage"])
def test_imagenet_resnet18_error_synapses_stay_within_the_models_own_size(scope):
    model = torchvision.models.resnet18(num_classes=1000)
    prog = fxlra.compile(model, scope=scope, example_inputs=(torch.randn(2, 3, 224, 224),))
    synapses = sum(p.numel() for p in prog.synapses.parameters())
    own = sum(p.numel() for p in model.parameters())
    assert own == 11_689_512
    assert synapses < own, (scope, synapses)
    kinds = {e.child: e.synapse for e in prog.plan.edges if e.parent == "fc"}
    assert set(kinds.values()) == {"spatial"}
    assert prog.synapse("fc", prog.sites[-2]).grid == (1, 1)      # the last stage: broadcast


def test_map_synapse_broadcast_and_a_spatial_override_where_it_cannot_go():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc1, self.fc2 = nn.Conv2d(1, 4, 3), nn.Linear(4 * 36, 8), nn.Linear(8, 3)

        def forward(self, x):
            h = torch.relu(self.conv(x))
            return self.fc2(torch.tanh(self.fc1(h.flatten(1))))
    x = torch.randn(2, 1, 8, 8)
    default = fxlra.compile(Net(), wiring="direct", example_inputs=(x,))
    assert [e.synapse for e in default.plan.edges] == ["spatial", "dense"]
    paper = fxlra.compile(Net(), wiring="direct", map_synapse="broadcast", example_inputs=(x,))
    assert [e.synapse for e in paper.plan.edges] == ["broadcast", "dense"]
    with pytest.raises(fxlra.OptionError, match="a 'spatial' synapse maps a vector error onto a "
                                                "channels-first map"):
        fxlra.compile(Net(), wiring="direct", synapses={("fc2", "tanh"): "spatial"},
                      example_inputs=(x,))
    with pytest.raises(fxlra.OptionError, match=r"map_synapse='dense' is not supported; choose "
                                                r"one of \['spatial', 'broadcast'\]"):
        fxlra.compile(Net(), map_synapse="dense")


@pytest.mark.parametrize("option, value, allowed", [
    ("scope", "blocks", "['layer', 'block', 'stage']"),
    ("norm_error", "identity", "['vjp', 'pass']"),
    ("preset", "pytorch", "['fxlra', 'paper']"),
])
def test_bad_choices_name_the_option_and_the_choices(option, value, allowed):
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(fxlra.OptionError, match=re.escape(
            f"{option}='{value}' is not supported; choose one of {allowed}")):
        fxlra.compile(model, **{option: value})


class Norms(nn.Module):
    """Every normalisation layer between a site and its ops, as modules and as functions."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.gn = nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4)
        self.inorm, self.bn_plain = nn.InstanceNorm2d(4, affine=True), nn.BatchNorm2d(4, affine=False)
        self.fc, self.ln, self.rms = nn.Linear(4 * 36, 6), nn.LayerNorm(6), nn.RMSNorm(6)
        self.out = nn.Linear(6, 3)
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("var", torch.ones(4))

    def forward(self, x):
        h = self.inorm(self.gn(self.bn_plain(self.bn(self.conv(x)))))
        h = torch.nn.functional.batch_norm(h, self.mean, self.var, training=True)
        h = torch.relu(h)
        h = torch.nn.functional.layer_norm(self.rms(self.ln(self.fc(h.flatten(1)))), (6,))
        return self.out(torch.tanh(h))


@pytest.mark.parametrize("norm_error", ["vjp", "pass"])
def test_norms_on_the_error_path_give_the_reference_updates_and_change_no_buffer(norm_error):
    torch.manual_seed(0)
    model = Norms().double()
    x, y = torch.randn(5, 2, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    prog = fxlra.compile(model, wiring="direct", norm_error=norm_error, example_inputs=(x,))
    start = {n: b.clone() for n, b in model.named_buffers()}
    with torch.no_grad():
        model(x)                                   # what the forward alone does to the buffers
    after_forward = {n: b.clone() for n, b in model.named_buffers()}
    for run in (prog.reference_updates, prog.updates):
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(start[n])
        run(x, y)
        for n, b in model.named_buffers():         # carrying the error moved no statistics
            torch.testing.assert_close(b, after_forward[n], rtol=0, atol=0, msg=n)
    assert_matches_reference(prog, x, y, "float64")


def test_batchnorm_input_vjp_removes_the_batch_mean_of_the_error():
    """The invariant that makes BatchNorm's VJP matter: the error reaching the convolution has
    zero mean over batch and space per channel, so the conv bias gets no update; passing it
    through unchanged does not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 36, 4))
    x, y = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1])
    vjp = fxlra.compile(model.double(), norm_error="vjp", example_inputs=(x,)).updates(x, y)
    passed = fxlra.compile(model, norm_error="pass", example_inputs=(x,)).updates(x, y)
    assert vjp["model.0.bias"].abs().max() < 1e-12
    assert passed["model.0.bias"].abs().max() > 1e-6
