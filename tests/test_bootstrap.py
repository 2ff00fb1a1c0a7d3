"""error_rule="bootstrap": each error synapse is fitted by least squares to c_i, the error of the
sites that read z_i carried back to z_i by their own local VJP (fxlra/analysis/bootstrap.py). These tests
check c_i against autograd on the same graph cut at every site, the synapse update against the
least-squares gradient, the generated program against the reference, and the option's errors."""
import copy

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import fxlra
from fxlra import models
from helpers import assert_matches_reference, assert_updates_match


def _cut_vjp(prog, x, sig):
    """c_i by autograd: run the traced graph with every inner site's value replaced by a leaf,
    then differentiate sum_j <h_j, s_j e_j> (s_j: 1 at an output, 1/beta inside) at the leaves.
    Exact whenever every op of a region is carried by its exact VJP (no pass-through norms)."""
    plan, beta = prog.plan, prog.options["beta"]
    inner = {s.name for s in plan.sites if s.name not in plan.outputs}
    pre = {s.h: s.name for s in plan.sites}
    leaves, h = {}, {}
    state = {k: v.clone() for k, v in prog.model.state_dict().items()}

    class Cut(fx.Interpreter):
        def run_node(self, node):
            value = super().run_node(node)
            if node.name in pre:
                h[pre[node.name]] = value
            if node.name in inner:
                leaves[node.name] = value.detach().requires_grad_()
                return leaves[node.name]
            return value

    with torch.enable_grad():
        Cut(prog.graph_module).run(x)
        total = sum((h[s.name] * sig.errors[s.name] *
                     (1.0 if s.name in plan.outputs else 1.0 / beta)).sum()
                    for s in plan.sites if h[s.name].requires_grad)
        grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
    prog.model.load_state_dict(state)
    return {n: g for n, g in zip(leaves, grads) if g is not None}


class ConvBN(nn.Module):
    """Pooling and flattening between sites belong to no site: c must travel through them."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), \
            nn.Conv2d(4, 6, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(6 * 4 * 4, 12), nn.Linear(12, 3)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = F.avg_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.tanh(self.fc1(torch.flatten(x, 1))))


CASES = {
    "conv-bn, layer scope": (ConvBN, (1, 16, 16), 3, dict(scope="layer")),
    "resnet-18, block scope": (lambda: models.ResNet18(4, 4, cifar=True, in_channels=1),
                               (1, 12, 12), 4, dict(scope="block")),
    "resnet-18, stage scope": (lambda: models.ResNet18(4, 4, cifar=True, in_channels=1),
                               (1, 12, 12), 4, dict(scope="stage")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_c_is_the_reading_sites_error_carried_back_exactly(case):
    build, shape, classes, options = CASES[case]
    torch.manual_seed(0)
    x, y = torch.randn(6, *shape, dtype=torch.float64), torch.randint(0, classes, (6,))
    prog = fxlra.compile(build().double(), error_rule="bootstrap", example_inputs=(x,),
                         **options)
    sig = prog.reference_signals(x, y)
    want = _cut_vjp(prog, x, sig)
    children = {e.child for e in prog.plan.edges}
    assert children and children <= set(want)
    for name in children:
        torch.testing.assert_close(sig.bootstrap[name], want[name], rtol=1e-9, atol=1e-12,
                                   msg=name)


def test_the_synapse_update_is_the_least_squares_gradient():
    """A dense synapse E (out x in) into site i, d_i = e_j E^T: its update is
    gamma (d_i - c_i)^T e_j / B, the gradient of |d_i - c_i|^2 / (2B); and a site of an MLP
    reads z_i through a Linear, so c_i = (e_j / beta) W_j."""
    torch.manual_seed(0)
    model = models.mlp(2, 5, "tanh", in_features=4, classes=3)
    prog = fxlra.compile(model.double(), wiring="direct", error_rule="bootstrap", gamma=0.5,
                         beta=0.2)
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    sig = prog.reference_signals(x, y)
    updates = prog.updates(x, y)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    sites = [s.name for s in prog.plan.sites]
    for k, (i, j) in enumerate(zip(sites[:-1], sites[1:])):
        scale = 1.0 if j in prog.plan.outputs else 1.0 / 0.2
        torch.testing.assert_close(sig.bootstrap[i], scale * sig.errors[j] @ linears[k + 1].weight)
    for edge in prog.plan.edges:
        e, d, c = sig.errors[edge.parent], sig.displacements[edge.child], sig.bootstrap[edge.child]
        want = 0.5 * (d - c).t() @ e / 7
        torch.testing.assert_close(updates[f"synapses.{edge.key}.weight"], want)


def test_the_generated_program_equals_the_reference_and_moves_only_the_forwards_stats():
    torch.manual_seed(0)
    model = models.ResNet18(4, 4, cifar=True, in_channels=1)
    x, y = torch.randn(4, 1, 12, 12), torch.randint(0, 4, (4,))
    prog = fxlra.compile(model, error_rule="bootstrap", example_inputs=(x,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = prog.updates(x, y)
    after_program = {k: v.clone() for k, v in model.state_dict().items()}
    want = prog.reference_updates(x, y)
    assert_updates_match(got, want, "float32_resnet")
    assert "boot_" in prog.code and "boot_" not in fxlra.compile(model, error_rule="hebbian-z").code
    # the program's forward moves the running statistics once, as a training forward does;
    # so does the reference's, and its carry (the boundary's included) re-runs on copies
    moved = [k for k in before if not torch.equal(before[k], after_program[k])]
    assert moved and all(k.endswith(("running_mean", "running_var", "num_batches_tracked"))
                         for k in moved)
    one_more = copy.deepcopy(model)
    one_more.load_state_dict(after_program)
    one_more(x)
    for k, v in one_more.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=1e-6, msg=k)


def test_with_beta_zero_only_the_outputs_error_reaches_c():
    """beta = 0 makes every inner error zero; c then holds the output's error alone (no 0/0)."""
    torch.manual_seed(0)
    model = models.mlp(2, 5, "tanh", in_features=4, classes=3)
    prog = fxlra.compile(model, wiring="direct", error_rule="bootstrap", beta=0.0)
    x, y = torch.randn(7, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    sig = prog.reference_signals(x, y)
    first, last = [s.name for s in prog.plan.sites][:2]
    out = prog.plan.outputs[0]
    torch.testing.assert_close(sig.bootstrap[last], sig.errors[out] @ model.out.weight)
    assert torch.count_nonzero(sig.bootstrap[first]) == 0
    assert_matches_reference(prog, x, y, "float32")


def test_the_presets_choose_the_rule_and_a_given_option_wins():
    model = models.ResNet18(4, 4, cifar=True, in_channels=1)
    x = torch.randn(2, 1, 12, 12)
    keys = ("scope", "norm_error", "map_synapse", "error_rule")
    ours = fxlra.compile(model, example_inputs=(x,))
    assert [ours.options[k] for k in keys] == ["stage", "vjp", "spatial", "bootstrap"]
    assert "error_rule='bootstrap': each error synapse is fitted" in ours.explain()
    assert "local VJP of their stage of at most two residual blocks" in ours.explain()
    paper = fxlra.compile(model, preset="paper", example_inputs=(x,))
    assert [paper.options[k] for k in keys] == ["layer", "pass", "broadcast", "hebbian-z"]
    assert "bootstrap" not in paper.explain()
    mixed = fxlra.compile(model, preset="paper", error_rule="bootstrap", example_inputs=(x,))
    assert [mixed.options[k] for k in keys] == ["layer", "pass", "broadcast", "bootstrap"]


def test_a_stage_holds_at_most_two_blocks():
    """torchvision's ResNet-50 has stages of 3, 4, 6 and 3 blocks: under scope="stage" they
    become units of 2+1, 2+2, 2+2+2 and 2+1 blocks; ResNet-18's four stages stay four."""
    import torchvision
    prog = fxlra.compile(torchvision.models.resnet50(num_classes=10), scope="stage",
                         example_inputs=(torch.randn(2, 3, 32, 32),))
    outputs = [s.name for s in prog.plan.sites if s.crosses]
    assert outputs == ["layer1_1_relu_2", "layer1_2_relu_2", "layer2_1_relu_2", "layer2_3_relu_2",
                       "layer3_1_relu_2", "layer3_3_relu_2", "layer3_5_relu_2", "layer4_1_relu_2",
                       "layer4_2_relu_2"]
    resnet18 = fxlra.compile(models.ResNet18(4, 4, cifar=True, in_channels=1),
                             example_inputs=(torch.randn(2, 1, 12, 12),))
    assert [s.name for s in resnet18.plan.sites if s.crosses] == [
        f"layer{k}_1_relu_1" for k in (1, 2, 3, 4)]
