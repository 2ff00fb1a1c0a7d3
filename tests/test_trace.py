"""fxlra.frontend.trace and fxlra.frontend.passes through fxlra.compile: tracing errors that name the user's file,
line, problem and fix; leaf_modules and concrete_args; in-place ops made out-of-place with
identical numerics and without touching the user's model (docs/design.md section 2.1, "Trace")."""
import os

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fxlra

THIS_FILE = os.path.abspath(__file__)


def line_of(marker):
    """The 1-based line number of the line of this file that ends with ``# <marker>``."""
    with open(THIS_FILE) as f:
        hits = [k for k, line in enumerate(f, start=1) if line.rstrip().endswith(f"# {marker}")]
    assert len(hits) == 1, marker
    return hits[0]


# -- untraceable models -----------------------------------------------------------------------------
class ControlFlow(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if h.sum() > 0:  # MARK-IF
            h = h * 2
        return self.b(h)


class ShapeAsValue(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        for _ in range(x.size(0)):  # MARK-RANGE
            h = h + 0
        return self.b(h)


class UsesLen(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        n = len(x)  # MARK-LEN
        return self.b(torch.tanh(self.a(x))) / n


class Gate(nn.Module):
    """A parametrised module with data-dependent control flow: the textbook leaf module."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x):
        if x.mean() > 0:  # MARK-GATE
            return self.lin(x)
        return self.lin(-x)


class Repeat(nn.Module):
    """A parametrised module that uses a shape as a Python value."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x):
        out = self.lin(x)
        for _ in range(x.shape[0] % 2 + 1):
            out = out * 1.0
        return out


class WithSubmodule(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.a, self.inner, self.b = nn.Linear(4, 6), inner, nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.inner(torch.tanh(self.a(x)))))


def _trace_error(model, **kw):
    with pytest.raises(fxlra.TraceError) as info:
        fxlra.compile(model, **kw)
    assert isinstance(info.value, TypeError)
    assert isinstance(info.value, fxlra.FxlraError)
    return str(info.value)


def test_control_flow_error_names_file_line_kind_and_fixes():
    msg = _trace_error(ControlFlow())
    assert f"{THIS_FILE}:{line_of('MARK-IF')}" in msg
    assert "ControlFlow" in msg
    assert "control flow on a tensor" in msg
    assert "concrete_args" in msg and "leaf_modules" in msg


def test_shape_used_as_python_value_error_names_file_line_kind_and_fix():
    msg = _trace_error(ShapeAsValue())
    assert f"{THIS_FILE}:{line_of('MARK-RANGE')}" in msg
    assert "a shape used as a Python value" in msg
    assert "torch.fx.wrap" in msg


def test_error_inside_a_submodule_points_at_the_submodule_line():
    msg = _trace_error(WithSubmodule(Gate()))
    assert f"{THIS_FILE}:{line_of('MARK-GATE')}" in msg
    assert "control flow on a tensor" in msg


def test_len_of_a_traced_value_is_named_as_the_problem():
    msg = _trace_error(UsesLen())
    assert f"{THIS_FILE}:{line_of('MARK-LEN')}" in msg
    # "fxlra could not trace UsesLen: <kind> at <file>:<line> (...). Fix: <fix>. (torch.fx said...)"
    kind = msg.split(" at ")[0].split(": ", 1)[1]
    fix = msg.split("Fix: ", 1)[1].split("(torch.fx said")[0]
    assert "len" in kind, msg
    assert "torch.fx.wrap" in fix or "leaf_modules" in fix, msg


def test_trace_error_is_raised_before_anything_is_built():
    model = ControlFlow()
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(fxlra.TraceError):
        fxlra.compile(model)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None


# -- leaf_modules -----------------------------------------------------------------------------------
def test_leaf_module_class_makes_a_shape_dependent_model_compile():
    model = WithSubmodule(Repeat())
    with pytest.raises(fxlra.TraceError):
        fxlra.compile(model)
    prog = fxlra.compile(model, leaf_modules=[Repeat])
    rules = {r.param: r for r in prog.plan.params}
    assert rules["inner.lin.weight"].rule == "local-vjp"
    assert rules["inner.lin.weight"].op == "inner"          # the whole module is one op
    explain = [l for l in prog.explain().splitlines() if "inner.lin.weight" in l]
    assert len(explain) == 1 and "local-vjp" in explain[0]
    x = torch.randn(5, 4)
    torch.testing.assert_close(prog(x), model(x), rtol=0, atol=0)
    out = prog.step(x, torch.tensor([0, 1, 2, 0, 1]))
    assert torch.isfinite(out.loss)
    assert prog.model.inner.lin.weight.grad is not None


def test_leaf_module_by_qualified_name():
    model = WithSubmodule(Repeat())
    prog = fxlra.compile(model, leaf_modules=["inner"])
    assert {r.rule for r in prog.plan.params if r.param.startswith("inner.")} == {"local-vjp"}


def test_leaf_module_with_data_dependent_control_flow_compiles_and_steps():
    """The fix the TraceError proposes must work: leaf_modules=[Gate] for `if x.mean() > 0`."""
    model = WithSubmodule(Gate())
    prog = fxlra.compile(model, leaf_modules=[Gate])
    assert {r.rule for r in prog.plan.params if r.param.startswith("inner.")} == {"local-vjp"}
    assert "local-vjp" in [l for l in prog.explain().splitlines() if "inner.lin.bias" in l][0]
    x = torch.randn(5, 4)
    torch.testing.assert_close(prog(x), model(x), rtol=0, atol=0)
    prog.step(x, torch.tensor([0, 1, 2, 0, 1]))
    assert prog.model.inner.lin.weight.grad is not None


def test_bad_leaf_modules_entry_is_a_type_error():
    with pytest.raises(TypeError, match="leaf_modules"):
        fxlra.compile(WithSubmodule(Repeat()), leaf_modules=[42])


# -- concrete_args ----------------------------------------------------------------------------------
class Flag(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x, double=False):
        h = torch.tanh(self.a(x))
        if double:
            h = h * 2
        return self.b(h)


def test_concrete_args_passes_through_to_fx():
    model = Flag()
    with pytest.raises(fxlra.TraceError, match="concrete_args"):
        fxlra.compile(model)
    prog = fxlra.compile(model, concrete_args={"double": False})
    x = torch.randn(3, 4)
    torch.testing.assert_close(prog(x), model(x, False), rtol=0, atol=0)
    assert not any(n.target is torch.mul or n.name.startswith("mul")
                   for n in prog.graph_module.graph.nodes)


def test_concrete_args_specialising_to_a_non_default_value():
    """concrete_args={"double": True} selects the other branch; the program (whose forward and
    step take only x) must run that branch."""
    model = Flag()
    prog = fxlra.compile(model, concrete_args={"double": True})
    x = torch.randn(3, 4)
    torch.testing.assert_close(prog(x), model(x, True), rtol=0, atol=0)
    out = prog.step(x, torch.tensor([0, 1, 2]))
    assert torch.isfinite(out.loss)


def test_non_module_is_a_type_error():
    for bad in (lambda x: x, 3, "model"):
        with pytest.raises(TypeError, match="nn.Module"):
            fxlra.compile(bad)


# -- in-place ops -----------------------------------------------------------------------------------
class InPlace(nn.Module):
    """Every in-place form the pass must rewrite. ``inplace=False`` builds the out-of-place twin
    with the same numerics (where an in-place op aliased two names, the twin uses one value)."""

    def __init__(self, variant, inplace=True):
        super().__init__()
        self.variant, self.inplace = variant, inplace
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.act = nn.ReLU(inplace=inplace)
        if variant not in ("iadd", "add_"):    # b is unused there: freeze it (else a PlanError)
            self.b.requires_grad_(False)

    def forward(self, x):
        h = self.a(x)
        v, ip = self.variant, self.inplace
        if v == "module":                      # nn.ReLU(inplace=True): h and z alias
            z = self.act(h)
            other = h if ip else z
        elif v == "method":                    # x.relu_() as a statement, then h used
            if ip:
                h.relu_()
                z = h
            else:
                z = h.relu()
            other = z
        elif v == "functional":                # F.relu(x, inplace=True): both names alias
            z = F.relu(h, inplace=ip)
            other = h if ip else z
        elif v == "iadd":                      # h += ... on a recorded pre-activation
            z = torch.tanh(h)
            if ip:
                h += 1.5
            else:
                h = h + 1.5
            other = torch.tanh(self.b(h))
        elif v == "add_":                      # h.add_(...) on a recorded pre-activation
            z = torch.tanh(h)
            if ip:
                h.add_(1.5)
            else:
                h = h + 1.5
            other = torch.tanh(self.b(h))
        return self.c(z + other)


VARIANTS = ["module", "method", "functional", "iadd", "add_"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_in_place_ops_keep_forward_outputs(variant):
    model = InPlace(variant)
    prog = fxlra.compile(model)
    x = torch.randn(6, 4)
    expected = model(x.clone())
    torch.testing.assert_close(prog(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_in_place_ops_are_rewritten_and_give_the_out_of_place_updates(variant):
    """A recorded pre-activation is never overwritten: updates equal the out-of-place twin's."""
    torch.manual_seed(1)
    model = InPlace(variant, inplace=True)
    torch.manual_seed(1)
    twin = InPlace(variant, inplace=False)
    prog, prog_twin = fxlra.compile(model), fxlra.compile(twin)
    for p, q in zip(prog.synapses.parameters(), prog_twin.synapses.parameters()):
        with torch.no_grad():
            p.copy_(q)
    code = prog.graph_module.code
    assert "relu_(" not in code and "inplace = True" not in code and "iadd" not in code
    for node in prog.graph_module.graph.nodes:
        if node.op == "call_module":
            assert not getattr(prog.graph_module.get_submodule(node.target), "inplace", False)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    ours, theirs = prog.updates(x, y), prog_twin.updates(x, y)
    assert len(ours) == len(theirs)
    for (name, u), v in zip(ours.items(), theirs.values()):
        torch.testing.assert_close(u, v, rtol=0, atol=0, msg=name)


def test_user_model_is_not_modified_by_the_in_place_pass():
    model = InPlace("module")
    prog = fxlra.compile(model)
    assert model.act.inplace is True
    assert prog.model is model and prog.model.act.inplace is True
    # the user's model still runs in place: a ReLU(inplace=True) overwrites its input
    h = torch.randn(3, 6)
    out = model.act(h)
    assert out.data_ptr() == h.data_ptr()
    # and the program's forward does not overwrite the caller's tensor
    x = torch.randn(3, 4)
    x_copy = x.clone()
    prog(x)
    assert torch.equal(x, x_copy)


class InPlaceOnView(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h[:, :3].mul_(2)                       # mutates h through a view
        return self.b(h)


def test_in_place_op_on_a_view_keeps_numerics_or_is_rejected():
    """Turning `h[:, :3].mul_(2)` into an unused out-of-place product would change the forward.
    fxlra must either keep the numerics or raise a clear fxlra error."""
    model = InPlaceOnView()
    x = torch.randn(5, 4)
    try:
        prog = fxlra.compile(model)
    except fxlra.FxlraError as exc:
        assert "mul_" in str(exc)
        return
    torch.testing.assert_close(prog(x), model(x.clone()), rtol=0, atol=0)
