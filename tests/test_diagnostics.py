"""fxlra.diagnostics: update angles against backprop, discrepancies, norms and report().

The invariants checked: the output layer's update points along backprop's gradient (angle 0)
for both losses and for every output of a two-headed model; with error synapses equal to the
transposed forward weights rec-LRA's updates converge to backprop's direction as beta -> 0
(angle O(beta)), and negating the output's synapse turns every inner update around (angle 180);
beta=0 leaves inner updates zero, so their angles are NaN; the diagnostics change no parameter,
buffer, ``.grad``, random-number state or step counter.
"""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxlra
from fxlra import diagnostics
from conftest import make_cnn, make_mlp

pytestmark = pytest.mark.usefixtures("one_thread")

ZERO = 1e-6          # degrees: float64 updates that equal the gradient up to scale


def _batch(n_in=5, classes=4, batch=16, dtype=torch.float64):
    return torch.randn(batch, n_in, dtype=dtype), torch.randint(0, classes, (batch,))


def _inner(prog, names):
    output = f"model.{prog.plan.rules_of(prog.sites[-1])[0].param.rsplit('.', 1)[0]}."
    return [n for n in names if not n.startswith(output)]


# -- the geometry ---------------------------------------------------------------------------------
def test_angle_geometry():
    u, v = torch.tensor([1.0, 2.0, -3.0]), torch.tensor([2.0, -1.0, 0.0])
    assert diagnostics.angle(u, 2.5 * u) == pytest.approx(0.0, abs=1e-12)
    assert diagnostics.angle(u, -u) == pytest.approx(180.0, abs=1e-12)
    assert diagnostics.angle(u, v) == pytest.approx(90.0, abs=1e-12)
    assert diagnostics.angle(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == \
        pytest.approx(45.0, abs=1e-12)
    assert diagnostics.angle(u.reshape(3, 1), u) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(diagnostics.angle(torch.zeros(3), u))
    assert math.isnan(diagnostics.angle(u, torch.tensor([1.0, float("nan"), 0.0])))
    with pytest.raises(fxlra.InputError, match="same size"):
        diagnostics.angle(u, torch.ones(4))


# -- rec-LRA against backprop ---------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_output_layer_angle_is_zero(loss):
    prog = fxlra.compile(make_mlp().double(), wiring="pairwise", loss=loss)
    x, y = _batch()
    if loss == "mse":
        y = torch.randn(16, 4, dtype=torch.float64)
    angles = diagnostics.angles(prog, x, y)
    assert set(angles) == {n for n, _ in prog.model.named_parameters(prefix="model")}
    assert angles["model.6.weight"] < ZERO and angles["model.6.bias"] < ZERO
    inner = [angles[n] for n in _inner(prog, angles)]
    assert all(0.0 <= a <= 180.0 for a in inner)
    assert max(inner) > 1.0                 # random error synapses: not backprop's direction


def test_angles_match_plain_autograd():
    """The backprop side is the mean cross-entropy of the model's own forward."""
    prog = fxlra.compile(make_cnn().double(), wiring="residual")
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (4,))
    angles = diagnostics.angles(prog, x, y)
    updates = prog.updates(x, y)
    model = copy.deepcopy(prog.model)
    F.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters(prefix="model"):
        assert angles[name] == pytest.approx(diagnostics.angle(updates[name], p.grad), abs=1e-9)
    assert angles["model.fc.weight"] < ZERO and angles["model.fc.bias"] < ZERO


def test_site_angles():
    prog = fxlra.compile(make_cnn().double(), wiring="residual")
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (4,))
    per_site = diagnostics.site_angles(prog, x, y)
    assert list(per_site) == list(prog.sites)
    assert per_site["fc"] < ZERO
    updates, model = prog.updates(x, y), copy.deepcopy(prog.model)
    F.cross_entropy(model(x), y).backward()
    grads = dict(model.named_parameters(prefix="model"))
    names = [f"model.{r.param}" for r in prog.plan.rules_of("relu_1")]
    assert len(names) > 2
    flat = [torch.cat([t.reshape(-1) for t in ts])
            for ts in ([updates[n] for n in names], [grads[n].grad for n in names])]
    assert per_site["relu_1"] == pytest.approx(diagnostics.angle(*flat), abs=1e-9)


def _exact_feedback(beta):
    """A pairwise MLP whose synapse parent -> child is the parent's weight, transposed: the
    displacement is then backprop's error signal at the child."""
    prog = fxlra.compile(make_mlp().double(), wiring="pairwise", beta=beta)
    weights = dict(prog.model.named_parameters())
    with torch.no_grad():
        for e in prog.plan.edges:
            (w,) = [r.param for r in prog.plan.rules_of(e.parent) if r.param.endswith("weight")]
            prog.synapse(e.parent, e.child).weight.copy_(weights[w].t())
    return prog


def test_exact_feedback_converges_to_backprop():
    x, y = _batch()
    coarse = diagnostics.angles(_exact_feedback(1e-2), x, y)
    fine = diagnostics.angles(_exact_feedback(1e-3), x, y)
    assert max(fine.values()) < 0.05
    inner = _inner(_exact_feedback(1e-3), fine)
    assert len(inner) == 6
    assert all(fine[n] < coarse[n] / 3.0 for n in inner)
    ratio = max(coarse[n] for n in inner) / max(fine[n] for n in inner)
    assert 5.0 < ratio < 20.0                  # the angle is first order in beta


def test_negated_feedback_points_away_from_backprop():
    prog = _exact_feedback(1e-3)
    with torch.no_grad():
        prog.synapse(prog.sites[-1], prog.sites[-2]).weight.neg_()
    x, y = _batch()
    angles = diagnostics.angles(prog, x, y)
    assert all(angles[n] > 179.95 for n in _inner(prog, angles))
    assert angles["model.6.weight"] < ZERO


def test_beta_zero_inner_angles_are_nan():
    prog = fxlra.compile(make_mlp().double(), wiring="direct", beta=0.0)
    x, y = _batch()
    angles = diagnostics.angles(prog, x, y)
    inner = _inner(prog, angles)
    assert inner and all(math.isnan(angles[n]) for n in inner)
    assert angles["model.6.weight"] < ZERO
    per_site = diagnostics.site_angles(prog, x, y)
    assert all(math.isnan(per_site[s]) for s in prog.sites[:-1])
    report = diagnostics.report(prog, x, y)
    assert report["angle/mean"] == pytest.approx(report[f"angle/{prog.sites[-1]}"], abs=ZERO)


def test_dropout_masks_are_shared():
    """Both forwards draw the same dropout mask, so the output layer still matches backprop."""
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 4)).double()
    prog = fxlra.compile(model, wiring="direct")
    x, y = _batch()
    angles = diagnostics.angles(prog, x, y)
    assert angles["model.3.weight"] < ZERO


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk, self.act = nn.Linear(5, 8), nn.Tanh()
        self.head, self.aux = nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x):
        z = self.act(self.trunk(x))
        return self.head(z), self.aux(z)


def test_every_output_head_matches_backprop():
    prog = fxlra.compile(TwoHeads().double(), wiring="direct")
    x, y = _batch()
    angles = diagnostics.angles(prog, x, y)
    for name in ("head.weight", "head.bias", "aux.weight", "aux.bias"):
        assert angles[f"model.{name}"] < ZERO


# -- discrepancies, norms, report -----------------------------------------------------------------
def test_discrepancies_equal_the_steps():
    prog = fxlra.compile(make_mlp(), wiring="pairwise")
    x, y = _batch(dtype=torch.float32)
    found = diagnostics.discrepancies(prog, x, y)
    stepped = prog.step(x, y).discrepancies
    assert list(found) == list(prog.sites)
    for site in prog.sites:
        assert found[site] == pytest.approx(float(stepped[site]), rel=1e-5, abs=1e-12)
    with torch.no_grad():
        p = torch.softmax(prog(x), -1) - F.one_hot(y, 4)
    assert found[prog.sites[-1]] == pytest.approx(float(p.pow(2).sum() / 16), rel=1e-5)


def test_norms():
    prog = fxlra.compile(make_mlp(), wiring="pairwise")
    weights, synapses = diagnostics.weight_norms(prog), diagnostics.synapse_norms(prog)
    params = dict(prog.named_parameters())
    assert set(weights) == {n for n in params if n.startswith("model.")}
    assert set(synapses) == {n for n in params if n.startswith("synapses.")} and synapses
    for name, value in {**weights, **synapses}.items():
        assert value == pytest.approx(float(torch.linalg.norm(params[name].detach())), rel=1e-6)
    report = diagnostics.report(prog, *_batch(dtype=torch.float32))
    assert report["weight_norm/max"] == pytest.approx(max(weights.values()))
    assert report["synapse_norm/mean"] == pytest.approx(sum(synapses.values()) / len(synapses))


def test_report_is_flat_json():
    prog = fxlra.compile(make_cnn(), wiring="residual")
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    report = diagnostics.report(prog, x, y)
    expected = {"loss", "angle/mean", "weight_norm/max", "weight_norm/mean", "synapse_norm/max",
                "synapse_norm/mean"}
    expected |= {f"angle/{s}" for s in prog.sites} | {f"discrepancy/{s}" for s in prog.sites}
    assert set(report) == expected
    assert all(type(v) is float and math.isfinite(v) for v in report.values())
    assert json.loads(json.dumps(report)) == report
    with torch.no_grad():
        assert report["loss"] == pytest.approx(float(F.cross_entropy(prog(x), y)), rel=1e-5)
    stepped = prog.step(x, y)              # its discrepancies replace the reference pass
    reused = diagnostics.report(prog, x, y, stepped)
    assert set(reused) == expected
    for site in prog.sites:
        assert reused[f"discrepancy/{site}"] == float(stepped.discrepancies[site])
        assert reused[f"discrepancy/{site}"] == pytest.approx(report[f"discrepancy/{site}"],
                                                              rel=1e-4, abs=1e-9)
        assert reused[f"angle/{site}"] == report[f"angle/{site}"]


def _state(prog):
    return {"tensors": {k: v.clone() for k, v in prog.state_dict().items()
                        if isinstance(v, torch.Tensor)},
            "grads": {n: None if p.grad is None else p.grad.clone()
                      for n, p in prog.named_parameters()},
            "rng": torch.get_rng_state(), "steps": getattr(prog, "steps", None)}


@pytest.mark.parametrize("what", ["angles", "site_angles", "discrepancies", "report"])
def test_changes_no_state(what):
    """BatchNorm running statistics, counters, dropout's random numbers, .grad and weights."""
    model = make_cnn()
    model.fc = nn.Sequential(nn.Dropout(0.2), model.fc)
    prog = fxlra.compile(model, wiring="residual")
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    prog.step(x, y)                        # .grad present on all but one parameter
    prog.model.conv.bias.grad = None
    before = _state(prog)
    getattr(diagnostics, what)(prog, x, y)
    after = _state(prog)
    assert before["tensors"].keys() == after["tensors"].keys()
    for k, v in before["tensors"].items():
        assert torch.equal(v, after["tensors"][k]), k
    for n, g in before["grads"].items():
        assert (g is None) == (after["grads"][n] is None), n
        assert g is None or torch.equal(g, after["grads"][n]), n
    assert torch.equal(before["rng"], after["rng"])
    assert before["steps"] == after["steps"]
