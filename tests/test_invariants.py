"""Invariants of the contract (docs/design.md section 1) that need no hand-written reference:

- the output site's update of the last layer is backprop's gradient of the mean cross-entropy
  (MLP, a small CNN with BatchNorm and pooling, torchvision's ResNet-18);
- beta=0 makes every inner error, discrepancy and inner model update exactly zero;
- blocks(g) and skip(g) give exactly the parents of Algorithm 1 / the skip-gap study on a chain;
- re-projection: ``step`` writes D * min(1, c / ||D||_F) into ``.grad``, added to what is there.
All in float64.
"""
import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

import fxlra


def mlp(act=nn.Tanh, widths=(8, 9, 7), n_in=5, n_out=4):
    layers, prev = [], n_in
    for w in widths:
        layers += [nn.Linear(prev, w), act()]
        prev = w
    layers.append(nn.Linear(prev, n_out))
    return nn.Sequential(*layers).double()


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).double()     # 3x32x32 inputs


def param_names(prog):
    return {id(p): n for n, p in prog.named_parameters()}


# -- output layer == backprop ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "cnn", "resnet18"])
def test_output_update_is_backprop_gradient_of_mean_cross_entropy(kind):
    torch.manual_seed(1)
    if kind == "mlp":
        model, x = mlp(), torch.randn(6, 5, dtype=torch.float64)
        last = model[-1]
    elif kind == "cnn":
        model, x = small_cnn(), torch.randn(5, 3, 32, 32, dtype=torch.float64)
        last = model[-1]
    else:
        model = torchvision.models.resnet18(num_classes=10).double()
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        last = model.fc
    n_out = last.out_features
    y = torch.randint(0, n_out, (x.shape[0],))

    # example_inputs: fxlra's own shape probes are float32 (see the report on float64 convs).
    # clip=None: step writes the raw updates into .grad (test_step_reprojects... checks that
    # against prog.updates); one step instead of updates + step keeps ResNet-18 affordable.
    prog = fxlra.compile(model, wiring="direct" if kind != "resnet18" else "residual",
                         loss="cross_entropy", clip=None, example_inputs=x)
    assert prog.wiring.in_degree(prog.sites[-1]) == 0
    out = prog.step(x, y)

    logits = model(x)
    loss = F.cross_entropy(logits, y)        # mean over the batch
    gw, gb = torch.autograd.grad(loss, [last.weight, last.bias])
    assert gw.abs().max() > 1e-3              # a real comparison, not zeros against zeros
    torch.testing.assert_close(last.weight.grad, gw, rtol=0, atol=1e-12)
    torch.testing.assert_close(last.bias.grad, gb, rtol=0, atol=1e-12)

    # step reports the same mean cross-entropy, and the output discrepancy is mean ||e_L||^2
    torch.testing.assert_close(out.loss.to(torch.float64), loss.detach(), rtol=1e-12, atol=1e-12)
    e_L = torch.softmax(logits.detach(), 1) - F.one_hot(y, n_out).double()
    torch.testing.assert_close(out.discrepancies[prog.sites[-1]].to(torch.float64),
                               (e_L ** 2).sum(1).mean(), rtol=1e-10, atol=1e-12)


# -- beta = 0 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,wiring,alpha,local_rule", [
    ("mlp-tanh", "pairwise", 1.0, "hebbian"),
    ("mlp-relu", fxlra.wiring.blocks(2), {1: 0.19, 2: 0.24}, "dx"),
    ("mlp-sigmoid", "direct", {1: 0.19, 2: 0.24}, "hebbian"),
    ("cnn", "pairwise", {1: 0.19, 2: 0.24}, "hebbian"),
])
def test_beta_zero_gives_zero_inner_errors(kind, wiring, alpha, local_rule):
    torch.manual_seed(2)
    if kind == "cnn":
        model, x = small_cnn(), torch.randn(4, 3, 32, 32, dtype=torch.float64)
        n_out = 10
    else:
        act = {"mlp-tanh": nn.Tanh, "mlp-relu": nn.ReLU, "mlp-sigmoid": nn.Sigmoid}[kind]
        model, x, n_out = mlp(act, widths=(8, 9, 7, 6)), torch.randn(6, 5, dtype=torch.float64), 4
    y = torch.randint(0, n_out, (x.shape[0],))
    prog = fxlra.compile(model, wiring=wiring, beta=0.0, alpha=alpha, local_rule=local_rule,
                         error_init_std=1.0, clip=None, example_inputs=x)
    output = prog.sites[-1]
    assert len(prog.sites) >= 3

    out = prog.step(x, y)
    assert set(out.discrepancies) == set(prog.sites)
    for site in prog.sites[:-1]:
        assert out.discrepancies[site].item() == 0.0, site
    assert out.discrepancies[output].item() > 0.0

    got = prog.updates(x, y)
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    names = param_names(prog)
    out_params = {names[id(last.weight)], names[id(last.bias)]}
    model_updates = {n: u for n, u in got.items() if n.startswith("model.")}
    assert len(model_updates) == len(list(model.parameters()))
    for name, u in model_updates.items():
        if name in out_params:
            assert u.abs().max() > 0, name
        else:
            assert torch.equal(u, torch.zeros_like(u)), f"{name}: max |u| = {u.abs().max()}"


# -- wiring presets on a chain --------------------------------------------------------------------
# Non-output sites of an MLP with 6 hidden activations numbered 1..6, the output is 7 ("L").
EXPECTED_PARENTS = {
    # Algorithm 1: l % g == 0 -> from L, otherwise from l + 1
    "blocks(2)": {1: 2, 2: "L", 3: 4, 4: "L", 5: 6, 6: "L"},
    "blocks(3)": {1: 2, 2: 3, 3: "L", 4: 5, 5: 6, 6: "L"},
    "blocks(4)": {1: 2, 2: 3, 3: 4, 4: "L", 5: 6, 6: "L"},
    # skip(g): site l + g, or L if fewer remain
    "skip(1)": {1: 2, 2: 3, 3: 4, 4: 5, 5: 6, 6: "L"},
    "skip(2)": {1: 3, 2: 4, 3: 5, 4: 6, 5: "L", 6: "L"},
    "skip(3)": {1: 4, 2: 5, 3: 6, 4: "L", 5: "L", 6: "L"},
    "skip(6)": {1: "L", 2: "L", 3: "L", 4: "L", 5: "L", 6: "L"},
    "pairwise": {1: 2, 2: 3, 3: 4, 4: 5, 5: 6, 6: "L"},
    "direct": {1: "L", 2: "L", 3: "L", 4: "L", 5: "L", 6: "L"},
}


@pytest.mark.parametrize("spec", list(EXPECTED_PARENTS))
def test_chain_wiring_presets(spec):
    widths = (6, 7, 8, 6, 7, 8)
    model = mlp(nn.Tanh, widths=widths)
    wiring = eval(spec, {"blocks": fxlra.wiring.blocks, "skip": fxlra.wiring.skip}) \
        if "(" in spec else spec
    prog = fxlra.compile(model, wiring=wiring)
    assert len(prog.sites) == 7
    site = {k: s for k, s in enumerate(prog.sites, 1)} | {"L": prog.sites[-1]}
    expected = {(site[parent], site[child]) for child, parent in EXPECTED_PARENTS[spec].items()}
    assert set(prog.wiring.edges()) == expected
    assert set(prog.wiring.nodes()) == set(prog.sites)
    for parent, child in expected:     # one synapse per edge, shaped (|z_child|, |e_parent|)
        n_parent = 4 if parent == site["L"] else widths[prog.sites.index(parent)]
        assert prog.synapse(parent, child).weight.shape == (widths[prog.sites.index(child)],
                                                            n_parent)


def test_skip_1_equals_pairwise():
    model = mlp(nn.Tanh, widths=(6, 7, 8, 6))
    a = fxlra.compile(model, wiring=fxlra.wiring.skip(1)).wiring
    b = fxlra.compile(model, wiring="pairwise").wiring
    assert set(a.edges()) == set(b.edges())


# -- re-projection --------------------------------------------------------------------------------
@pytest.mark.parametrize("clip", [0.2, None])
def test_step_reprojects_each_update_into_grad(clip):
    torch.manual_seed(3)
    model = mlp(nn.Tanh, widths=(10, 12, 9))
    prog = fxlra.compile(model, wiring="pairwise", error_rule="hebbian-d", clip=clip,
                         beta=0.5, error_init_std=0.5)
    x = torch.randn(7, 5, dtype=torch.float64) * 3
    y = torch.randint(0, 4, (7,))
    raw = prog.updates(x, y)
    assert set(raw) == {n for n, _ in prog.named_parameters()}

    def expected(name):
        D = raw[name]
        if clip is None:
            return D
        return D * min(1.0, clip / torch.linalg.norm(D).item())

    prog.zero_grad(set_to_none=True)
    prog.step(x, y)
    clipped = 0
    for name, p in prog.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, expected(name), rtol=1e-12, atol=1e-15)
        clipped += clip is not None and torch.linalg.norm(raw[name]).item() > clip
        if clip is not None:
            assert torch.linalg.norm(p.grad).item() <= clip * (1 + 1e-12)
    if clip is not None:   # both branches of min(1, c/||D||) are exercised
        assert 0 < clipped < len(raw)

    # step adds into .grad: a second step on the same batch doubles it
    first = {n: p.grad.clone() for n, p in prog.named_parameters()}
    prog.step(x, y)
    for name, p in prog.named_parameters():
        torch.testing.assert_close(p.grad, 2 * first[name], rtol=1e-12, atol=1e-15)
