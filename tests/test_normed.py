"""Sites read by a norm over their features (a pre-norm residual stream): under
norm_error="vjp" their displacement goes through that norm's input-VJP at the site's own
statistics (fxlra/analysis/normed.py, ``synapses.through_norm``); under "pass" it does not."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fxlra
from fxlra.semantics import synapses as syn
from helpers import assert_matches_reference, close


@pytest.mark.parametrize("kind, norm, eps", [
    ("layer", lambda v: F.layer_norm(v, (6,), eps=1e-5), 1e-5),
    ("layer", lambda v: F.layer_norm(v, (6,), eps=0.5), 0.5),
    ("rms", lambda v: F.rms_norm(v, (6,), eps=1e-3), 1e-3),
    ("rms", lambda v: F.rms_norm(v, (6,)), None),
])
def test_through_norm_is_the_norms_input_vjp_at_the_value(kind, norm, eps):
    z = torch.randn(3, 4, 6, dtype=torch.float64) * 3 + 1
    d = torch.randn_like(z)
    _, pullback = torch.func.vjp(norm, z)
    close(syn.through_norm(d, z, kind, eps), pullback(d)[0], "float64", kind)


class _FunctionalNorm(nn.Module):
    def __init__(self, f, rms=False):
        super().__init__()
        self.weight, self.f, self.rms = nn.Parameter(1 + 0.1 * torch.randn(f)), f, rms

    def forward(self, h):
        if self.rms:
            return F.rms_norm(h, (self.f,), self.weight, 1e-4)
        return F.layer_norm(h, (self.f,), self.weight, None, 1e-4)


NORMS = {"LayerNorm": lambda f: nn.LayerNorm(f), "RMSNorm": lambda f: nn.RMSNorm(f),
         "RMSNorm-eps": lambda f: nn.RMSNorm(f, eps=1e-2),
         "F.layer_norm": lambda f: _FunctionalNorm(f),
         "F.rms_norm": lambda f: _FunctionalNorm(f, True)}


class _Block(nn.Module):
    def __init__(self, f, norm):
        super().__init__()
        self.norm, self.fc1, self.fc2 = NORMS[norm](f), nn.Linear(f, 2 * f), nn.Linear(2 * f, f)

    def forward(self, h):
        return h + self.fc2(torch.tanh(self.fc1(self.norm(h))))


class PreNorm(nn.Module):
    """Tokens (B, T, f): an embedding Linear, two pre-norm residual blocks, a final norm, a
    head: the input of every norm is a site's value."""

    def __init__(self, norm, f=6, classes=3):
        super().__init__()
        self.embed = nn.Linear(4, f)
        self.blocks = nn.Sequential(_Block(f, norm), _Block(f, norm))
        self.norm, self.head = NORMS[norm](f), nn.Linear(f, classes)

    def forward(self, x):
        return self.head(self.norm(self.blocks(torch.tanh(self.embed(x)))))


def _batch(n=5):
    return torch.randn(n, 3, 4, dtype=torch.float64), torch.randint(0, 3, (n, 3))


def _compile(norm="LayerNorm", **options):
    """PreNorm (initialised from seed 0) with every residual block its own unit."""
    torch.manual_seed(0)
    model = PreNorm(norm).double()
    return fxlra.compile(model, example_inputs=_batch()[0], scope="block", **options)


# the sites the norms read under symbolic tracing: the embedding's and the first block's
# outputs, and the second block's where the final norm is a function call (then that block's
# output is a site of its own; a norm module's output is the site)
READ = {"LayerNorm": ("tanh", "add"), "F.layer_norm": ("tanh", "add"),
        "RMSNorm": ("tanh", "add"), "RMSNorm-eps": ("tanh", "add"),
        "F.rms_norm": ("tanh", "add", "add_1")}


@pytest.mark.parametrize("norm", list(NORMS))
def test_the_sites_a_norm_reads_are_found_with_its_kind_and_eps(norm):
    prog = _compile(norm)
    kind, eps = ("rms" if "rms" in norm.lower() else "layer"), \
        {"LayerNorm": 1e-5, "RMSNorm": None, "RMSNorm-eps": 1e-2}.get(norm, 1e-4)
    assert prog.plan.normed == tuple((name, kind, eps) for name in READ[norm])
    assert _compile(norm, norm_error="pass").plan.normed == ()


def test_the_displacement_of_a_normed_site_goes_through_the_norm_and_pass_leaves_it():
    x, y = _batch()
    normed = _compile().plan.normed
    values = fxlra.semantics.reference.run_inference(_compile().graph_module, x)
    for norm_error in ("vjp", "pass"):
        prog = _compile(norm_error=norm_error)
        sig = prog.reference_signals(x, y)
        for name, kind, eps in normed:
            raw = sum(syn.apply(prog.synapses[prog.plan.edge(p, name).key], sig.errors[p],
                                values[name].shape) for p in prog.plan.parents(name))
            want = syn.through_norm(raw, values[name], kind, eps) if norm_error == "vjp" else raw
            close(sig.displacements[name], want, "float64", f"{norm_error} {name}")


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("error_rule", ["bootstrap", "hebbian-z"])
@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_the_program_equals_the_reference_with_normed_sites(norm, error_rule, frontend):
    prog = _compile(norm, error_rule=error_rule, frontend=frontend)
    assert [n for n, _, _ in prog.plan.normed][:2] == ["tanh", "add"]
    assert_matches_reference(prog, *_batch())


def test_both_frontends_find_the_same_normed_sites():
    fx, export = (_compile("F.rms_norm", frontend=f).plan.normed for f in ("fx", "export"))
    assert fx == export == tuple((name, "rms", 1e-4) for name in READ["F.rms_norm"])


class _WrittenRMS(nn.Module):
    """An RMSNorm written out as Hugging Face writes it (``dim``: the axis of its mean)."""

    def __init__(self, f, dim=-1, keepdim=True):
        super().__init__()
        self.weight, self.dim, self.keepdim = nn.Parameter(torch.ones(f)), dim, keepdim

    def forward(self, h):
        h = h.to(torch.float64)
        variance = h.pow(2).mean(self.dim, keepdim=self.keepdim)
        if not self.keepdim:
            variance = variance[..., None]
        return self.weight * (h * torch.rsqrt(variance + 1e-3))


class _WrittenPreNorm(nn.Module):
    def __init__(self, **norm):
        super().__init__()
        self.embed, self.norm, self.fc = nn.Linear(4, 6), _WrittenRMS(6, **norm), nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        return self.head(torch.tanh(self.fc(self.norm(h))))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_an_rms_norm_written_out_is_found_and_the_program_equals_the_reference(frontend):
    x, y = _batch()
    torch.manual_seed(0)
    prog = fxlra.compile(_WrittenPreNorm().double(), example_inputs=x, frontend=frontend)
    assert prog.plan.normed == (("tanh", "rms", 1e-3),)
    assert_matches_reference(prog, x, y)


@pytest.mark.parametrize("norm", [dict(dim=1), dict(keepdim=False)])
def test_a_written_out_norm_the_pattern_does_not_cover_is_left_alone(norm):
    """A mean over another axis is no norm over the features; a mean reshaped before the
    rsqrt is one, but not the pattern fxlra matches: both leave the displacement alone."""
    x, _ = _batch()
    model = _WrittenPreNorm(**norm).double()
    assert fxlra.compile(model, example_inputs=x).plan.normed == ()


class _TwoAxisNorm(nn.Module):
    """A LayerNorm over (T, f) reads the site: not a norm over the features alone."""

    def __init__(self):
        super().__init__()
        self.embed, self.norm, self.head = nn.Linear(4, 6), nn.LayerNorm((3, 6)), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.norm(torch.tanh(self.embed(x))))


class _ChannelsFirst(nn.Module):
    """A GroupNorm reads a channels-first map: not a norm over the last axis."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(1, 4)
        self.head = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        return self.head(torch.flatten(self.norm(torch.relu(self.conv(x))), 1))


@pytest.mark.parametrize("model, x", [(_TwoAxisNorm, torch.randn(2, 3, 4)),
                                      (_ChannelsFirst, torch.randn(2, 1, 5, 5))])
def test_other_norms_are_not_counted_as_reading_the_site(model, x):
    prog = fxlra.compile(model(), example_inputs=x)
    assert prog.plan.normed == ()


def test_explain_and_the_plan_name_the_normed_sites():
    prog = _compile()
    assert "norm_error='vjp': the displacements into tanh, add go through the input-VJP" in \
        prog.explain()
    assert str(prog.plan).count("read by a layer norm: its displacement goes through") == 2
    assert "norm_error='vjp'" not in _compile(norm_error="pass").explain()
