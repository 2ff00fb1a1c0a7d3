"""Fuzzing fxlra.compile (hypothesis): random models, many of them outside what fxlra knows.

Models are built from a spec (a tuple of layer tuples) that walks through three layouts, vectors
(B, F), images (B, C, S, S) and token sequences (B, T, F):
- the layers fxlra has rules for (Linear, Conv2d plain, strided, dilated, depthwise or with
  reflect padding, BatchNorm, LayerNorm, GroupNorm, activations as modules or functions, with
  and without arguments, residual adds, pooling, flatten, mean, Embedding for integer inputs);
- ops it has no rule for (torch.fft, sort, max and its named fields, cumsum, a custom
  autograd.Function, einsum, matmul between two activations, topk, masked_fill, gather, where,
  softmax in the middle, cat of chunks, stack of unbind, floor division, a plain Python function
  called on traced values) and modules it has no rule for (PReLU, Bilinear, LSTM, GRU,
  MultiheadAttention, TransformerEncoderLayer, ConvTranspose2d, Upsample, PixelShuffle, two
  Linears multiplied, raw parameters used by functions);
- untraceable layers (an `if` on a tensor value, `len()` of a tensor, iteration over a tensor,
  a numpy call on a traced value), with and without ``leaf_modules=[...]``;
- odd structures: a parameter used twice, an unused or frozen parameter, a buffer, every
  parameter frozen, eval mode, several outputs (tuple, list, dict, of equal or different
  shapes), a returned Python value or integer tensor, the input returned, outputs that are not
  2-D or have no feature axis, in-place ops.

Property: ``fxlra.compile(model, wiring=<random preset>, example_inputs=x)`` either raises an
``fxlra.FxlraError`` with a non-empty message (a TraceError when the model cannot be traced and
no leaf module covers it), or it succeeds; then ``prog.step(x, y)`` leaves a finite ``.grad``
on every trainable parameter (model and synapses), and in float64 ``prog.updates`` equals
``prog.reference_updates``; an op that torch.func cannot differentiate on an error's path is an
``fxlra.UnsupportedError`` at the first step. Never an internal exception (KeyError,
AssertionError, a torch RuntimeError, a TypeError that is not fxlra's). Regression tests for
what the fuzzer found follow at the end.
"""
import pytest
import torch
from hypothesis import currently_in_test_context, event, given, note, settings, strategies as st
from torch import nn
from torch.nn import functional as F

import fxlra
from fxlra.frontend import shapes
from helpers import assert_matches_reference, assert_updates_match, close
from strategies import (DTYPE, HEADS, SETTINGS, SPEC_PRESETS as PRESETS, UNTRACEABLE, Lambda,
                        NumpyCall, Recurrent, build_spec_net as build, specs, wiring_of)

pytestmark = pytest.mark.usefixtures("one_thread")


# -- the property --------------------------------------------------------------------------------
def labels_for(prog, x):
    """Class labels for a (B, classes) output, else float targets shaped like the output."""
    out = prog.plan.outputs[0]
    node = next(n for n in prog.graph_module.graph.nodes if n.name == out)
    shape = (x.shape[0],) + shapes.shape_of(node)[1:]      # the probe may use another batch
    generator = torch.Generator().manual_seed(1)
    if len(shape) == 2:
        return torch.randint(0, shape[1], (shape[0],), generator=generator)
    return torch.softmax(torch.randn(shape, generator=generator, dtype=DTYPE), -1)


def compile_or_reject(model, x, wiring, **kw):
    """The program, or None when compile raised an fxlra error (checked to have a message).
    Any other exception propagates and fails the test."""
    spec, depth = wiring_of(wiring)
    try:
        return fxlra.compile(model, wiring=spec, depth=depth, example_inputs=x, **kw)
    except fxlra.FxlraError as exc:
        note(f"rejected: {type(exc).__name__}: {exc}")
        event(f"rejected: {type(exc).__name__}")
        assert str(exc).strip(), type(exc).__name__
        return None


def check_program(prog, x, deterministic=True):
    """step leaves a finite .grad on every trainable parameter; updates equal the reference's.
    An op that torch.func cannot run (a leaf module calling numpy) or that has no derivative
    (floor division) on an error's path is found at the first step, as an UnsupportedError."""
    y = labels_for(prog, x)
    for p in prog.parameters():
        p.grad = None
    if currently_in_test_context():
        event("compiled")
    try:
        out = prog.step(x, y)
    except fxlra.UnsupportedError as exc:
        if currently_in_test_context():
            event("stopped at the first step")
        assert "torch.func cannot differentiate" in str(exc) or \
            "is not differentiable" in str(exc), exc
        return
    assert torch.isfinite(out.loss)
    trainable = {n for n, p in prog.named_parameters() if p.requires_grad}
    for name, p in prog.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
        assert p.grad is None or (p.grad.shape == p.shape and torch.isfinite(p.grad).all()), name
    if not deterministic:
        return
    assert_matches_reference(prog, x, y, "float64_torch_func")     # for every trainable one


def _deterministic(spec):
    """Dropout draws new masks on every forward, so the reference's run differs."""
    return not any(op[0] == "dropout" for op in spec["layers"])


def _untraceable(spec):
    return [op[1] for op in spec["layers"] if op[0] == "untraceable"]


@settings(max_examples=100, **SETTINGS)
@given(spec=specs(), wiring=st.sampled_from(PRESETS), leaf=st.booleans())
def test_compile_steps_or_raises_an_fxlra_error(spec, wiring, leaf):
    model, x = build(spec)
    untraceable = _untraceable(spec)
    leaf_modules = [UNTRACEABLE[k] for k in untraceable] if leaf else []
    spec_wiring, depth = wiring_of(wiring)
    try:
        prog = fxlra.compile(model, wiring=spec_wiring, depth=depth, example_inputs=x,
                             leaf_modules=leaf_modules)
    except fxlra.FxlraError as exc:
        note(f"rejected: {type(exc).__name__}: {exc}")
        event(f"rejected: {type(exc).__name__}")
        assert str(exc).strip()
        return
    assert not untraceable or leaf or prog.frontend == "export", \
        "an untraceable model compiled without leaf modules or torch.export"
    note(str(prog.plan))
    check_program(prog, x, _deterministic(spec))


@settings(max_examples=80, **SETTINGS)
@given(spec=specs(untraceable=False, heads=("logits",), modifiers=("none", "eval")),
       wiring=st.sampled_from(PRESETS),
       options=st.fixed_dictionaries({
           "error_rule": st.sampled_from(["hebbian-z", "hebbian-d", "derived", "bootstrap"]),
           "local_rule": st.sampled_from(["hebbian", "dx"]),
           "loss": st.sampled_from(["cross_entropy", "mse"])}))
def test_traceable_models_with_plain_heads(spec, wiring, options):
    """Without untraceable layers or odd heads most models compile: every option combination
    still steps with finite updates equal to the reference's, or is rejected clearly."""
    model, x = build(spec)
    prog = compile_or_reject(model, x, wiring, **options)
    if prog is not None:
        note(str(prog.plan))
        check_program(prog, x, _deterministic(spec))


# F.normalize is one op to symbolic tracing and several to torch.export, where its input fans
# out (to its norm and to the division) and so holds an identity site: test_export checks that
_ONE_OP_TO_FX_ONLY = (("unknown", "normalize"),)


@settings(max_examples=400, **SETTINGS)
@given(spec=specs(untraceable=False, heads=("logits",), modifiers=("none", "eval")).filter(
           lambda s: not set(s["layers"]) & set(_ONE_OP_TO_FX_ONLY)),
       wiring=st.sampled_from(PRESETS))
def test_a_traced_model_gets_the_same_plan_and_updates_through_torch_export(spec, wiring):
    """Whatever symbolic tracing compiles, torch.export compiles to the same sites and layouts,
    and its program gives the same updates; or export refuses it with an fxlra error."""
    if not _deterministic(spec):
        event("dropout: not compared")  # two programs draw different masks
        return
    model, x = build(spec)
    torch.manual_seed(2)                # the same error synapses' initial weights in both
    traced = compile_or_reject(model, x, wiring, frontend="fx")
    if traced is None:
        return
    torch.manual_seed(2)
    exported = compile_or_reject(model, x, wiring, frontend="export")
    if exported is None:
        return
    note(str(traced.plan))
    assert [s.layout for s in exported.plan.sites] == [s.layout for s in traced.plan.sites]
    assert [(e.synapse, e.in_features, e.out_features) for e in exported.plan.edges] == \
        [(e.synapse, e.in_features, e.out_features) for e in traced.plan.edges]
    y = labels_for(traced, x)
    try:
        want = traced.updates(x, y)
    except fxlra.FxlraError as exc:     # an op with no derivative: both refuse the step alike
        with pytest.raises(type(exc)):
            exported.updates(x, y)
        event(f"step refused by both: {type(exc).__name__}")
        return
    rename = {f"synapses.{a.key}.{n}": f"synapses.{b.key}.{n}"
              for a, b in zip(exported.plan.edges, traced.plan.edges) for n in ("weight", "bias")}
    got = {rename.get(k, k): v for k, v in exported.updates(x, y).items()}
    assert_updates_match(got, want, "float64_torch_func")
    event("compared")


@settings(max_examples=30, **SETTINGS)
@given(spec=specs(untraceable=False, heads=("logits",), modifiers=("none",)),
       kind=st.sampled_from(sorted(UNTRACEABLE)))
def test_untraceable_layers_raise_a_trace_error_naming_the_fixes(spec, kind):
    """An untraceable layer anywhere makes compile raise fxlra.TraceError naming the line and
    the fixes; with it as a leaf module the model compiles or is rejected clearly."""
    spec = dict(spec, layers=spec["layers"] + (("untraceable", kind),))
    model, x = build(spec)
    with pytest.raises(fxlra.TraceError) as info:
        fxlra.compile(model, example_inputs=x, frontend="fx")
    message = str(info.value)
    assert "strategies.py:" in message and "Fix:" in message, message
    assert "leaf_modules" in message or "torch.fx.wrap" in message, message
    prog = compile_or_reject(model, x, "direct", leaf_modules=[UNTRACEABLE[kind]])
    if prog is not None:
        check_program(prog, x, _deterministic(spec))


# -- regressions found by the fuzzer -------------------------------------------------------------
def _mlp_around(middle, n=6):
    return nn.Sequential(nn.Linear(4, n), nn.Tanh(), middle, nn.Linear(n, 3)).to(DTYPE)


X = torch.randn(5, 4, dtype=DTYPE)
Y = torch.tensor([0, 1, 2, 0, 1])


def test_lstm_hidden_state_steps_with_finite_updates():
    """`out, (h, c) = lstm(x); fc(h[-1])`: the cotangent reaches the LSTM through two nested
    tuples; torch.func's VJP got a one-level cotangent (RuntimeError, pytree mismatch)."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), Lambda(lambda h: h.unsqueeze(1)),
                          Recurrent("lstm", 6, 5, "state"), nn.Linear(5, 3)).to(DTYPE)
    prog = fxlra.compile(model, wiring="direct")
    assert any(r.rule == "local-vjp" for r in prog.plan.params if r.param.startswith("3.rnn"))
    prog.step(X, Y)
    for name, p in prog.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # the LSTM belongs to the identity site at h[-1] (its next op is a Linear); its update is
    # torch.func's VJP of the LSTM alone with that site's error e = beta * E e_L at h[-1]
    site, out = prog.sites[-2:]
    lstm = model[3].rnn
    h_in = torch.tanh(model[0](X)).unsqueeze(1)
    with torch.no_grad():
        e_out = torch.softmax(model[4](lstm(h_in)[1][0][-1]), 1) - F.one_hot(Y, 3).to(DTYPE)
        e = 0.1 * e_out @ prog.synapse(out, site).weight.t()
    params = dict(lstm.named_parameters())
    _, pullback = torch.func.vjp(
        lambda p: torch.func.functional_call(lstm, p, (h_in,))[1][0][-1], params)
    (expected,) = pullback(e)
    updates = prog.updates(X, Y)
    for name, g in expected.items():
        close(updates[f"model.3.rnn.{name}"], g / len(X), "float64", name)


def test_lstm_hidden_state_reference_matches_the_program():
    model = nn.Sequential(Lambda(lambda h: h.unsqueeze(1)), Recurrent("lstm", 4, 5, "state"),
                          nn.Linear(5, 3)).to(DTYPE)
    prog = fxlra.compile(model, wiring="direct", example_inputs=X)
    assert_matches_reference(prog, X, Y, "float64")


def test_lstm_outputs_used_separately_name_the_op():
    """`out, (h, c) = lstm(x); fc(out[:, -1] + h[0])`: the LSTM's error would come from two
    places; the error names the op and its users instead of an unowned parameter."""
    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.fc = nn.LSTM(4, 5, batch_first=True), nn.Linear(5, 3)

        def forward(self, x):
            out, (h, c) = self.lstm(x)
            return self.fc(out[:, -1] + h[0])
    with pytest.raises(fxlra.PlanError, match=r"lstm.*used separately.*leaf_modules"):
        fxlra.compile(Both(), example_inputs=torch.randn(2, 3, 4))


@pytest.mark.parametrize("model", [
    nn.Sequential(nn.Tanh()),
    nn.Sequential(nn.Linear(4, 3)).requires_grad_(False),
], ids=["no-parameters", "all-frozen"])
def test_no_trainable_parameter_is_a_plan_error(model):
    """Nothing to update: the generated program failed on an empty update list (RuntimeError
    from torch._foreach_mul_)."""
    with pytest.raises(fxlra.PlanError, match="no trainable parameter"):
        fxlra.compile(model, example_inputs=X.float())


class Returns(nn.Module):
    def __init__(self, head):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 3), head

    def forward(self, x):
        return HEADS[self.head](self, x, x)

    def classifier(self, h):
        return self.fc(h)


@pytest.mark.parametrize("head, message", [
    ("input_too", "the model's input itself"),          # was an AssertionError in Plan.verify
    ("with_argmax", "not a floating-point tensor"),     # was NotImplementedError in log_softmax
    ("same_twice", "same tensor twice"),
])
def test_outputs_that_cannot_hold_errors_are_plan_errors(head, message):
    with pytest.raises(fxlra.PlanError, match=message):
        fxlra.compile(Returns(head).to(DTYPE), example_inputs=X)


def test_a_returned_shape_is_not_an_output():
    """`return logits, x.shape[0]` raised a KeyError: the shape's node became an output site
    without being a site. A returned Python value is not an output, like a constant."""
    prog = fxlra.compile(Returns("with_shape").to(DTYPE), example_inputs=X)
    assert prog.plan.outputs == ("fc",)
    check_program(prog, X)


class ReturnsChunks(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x).chunk(2, 1)


def test_a_returned_tuple_valued_op_asks_to_unpack_it():
    """A returned tuple-valued node was taken for one tensor (PlanError about a site of shape
    None); the message now says what to do."""
    with pytest.raises(fxlra.PlanError, match="unpack it"):
        fxlra.compile(ReturnsChunks(), example_inputs=X.float())


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x, z):
        return self.a(x) + self.b(z)


class VarArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, *xs):
        return self.a(xs[0])


class NoInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self):
        return self.a(torch.ones(2, 4))


@pytest.mark.parametrize("model, seen", [(VarArgs(), "variable arguments (*xs)"),
                                          (NoInput(), "takes no input")])
def test_models_without_one_named_input_are_unsupported(model, seen):
    """forward(*xs) made the program bind the batch to xs itself (xs[0] was the first row: an
    output of shape (3,) and a confusing InputError at step)."""
    with pytest.raises(fxlra.UnsupportedError) as info:
        fxlra.compile(model, example_inputs=X.float())
    assert seen in str(info.value) and "concrete_args" in str(info.value)


def test_a_second_input_fixed_by_concrete_args_compiles():
    """A tensor in concrete_args made the traced graph's code invalid (NameError: float32, the
    tensor's repr used as the placeholder's default)."""
    prog = fxlra.compile(TwoInputs(), concrete_args={"z": torch.zeros(5, 4)},
                         example_inputs=X.float())
    torch.testing.assert_close(prog(X.float()), TwoInputs.forward(prog.model, X.float(),
                                                                   torch.zeros(5, 4)))
    prog.step(X.float(), Y)
    assert prog.model.a.weight.grad is not None


def test_a_model_with_two_inputs_steps_on_a_tuple_and_equals_the_reference():
    x = (X, X * 2)
    prog = fxlra.compile(TwoInputs().to(DTYPE), example_inputs=x)
    updates, _ = assert_matches_reference(prog, x, Y, "float64")
    assert updates
    prog.step(x, Y)
    with pytest.raises(fxlra.InputError, match=r"takes 2 input\(s\) \(x, z\) but 1 were given"):
        prog.step(X, Y)


def test_an_example_batch_the_model_rejects_is_named():
    model = _mlp_around(nn.Identity())
    with pytest.raises(fxlra.PlanError, match="example_inputs is a batch the model accepts"):
        fxlra.compile(model, example_inputs=torch.randn(5, 7, dtype=DTYPE))


@pytest.mark.parametrize("local_rule, error_rule", [("hebbian", "hebbian-z"), ("dx", "derived")])
def test_prelu_is_a_parametrised_activation_site(local_rule, error_rule):
    """nn.PReLU after a Linear is an activation site (phi = PReLU), not an op that needs
    identity sites before and after it: the Linear and the slope both belong to it, the slope
    updated by the PReLU's own weight-gradient with the site's error at its output."""
    model = _mlp_around(nn.PReLU(6))[0:1].append(nn.PReLU(6)).append(nn.Linear(6, 3)).to(DTYPE)
    prog = fxlra.compile(model, wiring="pairwise", local_rule=local_rule, error_rule=error_rule)
    site, out = prog.sites
    assert prog.plan.site(site).kind == "activation"
    rules = {r.param: r for r in prog.plan.params}
    assert rules["0.weight"].site == rules["1.weight"].site == site
    assert rules["1.weight"].rule == "local-vjp"
    check_program(prog, X)
    # the slope's update: the batch mean of sum(e * min(h, 0)) per channel, phi' not involved
    with torch.no_grad():
        h = model[0](X)
        z = model[1](h)
        e_out = torch.softmax(model[2](z), 1) - F.one_hot(Y, 3).to(DTYPE)
        d = e_out @ prog.synapse(out, site).weight.t()
        e = z - model[1](h - 0.1 * d)
        expected = (e * h.clamp(max=0)).sum(0) / len(X)
    close(prog.updates(X, Y)["model.1.weight"], expected, "float64", "model.1.weight")


def test_functional_prelu_is_an_op_with_its_own_local_vjp():
    """F.prelu(h, w) reads a second tensor, so it is not applied as phi; the slope is updated
    by the local VJP of the op with the error of the site after it."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
            self.slope = nn.Parameter(torch.full((6,), 0.25))

        def forward(self, x):
            return self.b(F.prelu(torch.tanh(self.a(x)), self.slope))
    prog = fxlra.compile(Net().to(DTYPE), wiring="pairwise", local_rule="dx",
                         error_rule="derived")
    assert {r.param: r.rule for r in prog.plan.params}["slope"] == "local-vjp"
    check_program(prog, X)


@pytest.mark.parametrize("act", [lambda h: F.elu(h, alpha=3.0), lambda h: F.hardtanh(h, -0.3, 0.3),
                                 lambda h: F.softplus(h, beta=2.0),
                                 lambda h: F.gelu(h, approximate="tanh")],
                         ids=["elu", "hardtanh", "softplus", "gelu"])
def test_phi_prime_of_an_activation_function_uses_its_arguments(act):
    """The generated program differentiated F.elu(h, alpha=3.0) as F.elu(h): phi' (in
    local_rule="dx" and error_rule="derived") was silently wrong against the reference."""
    model = _mlp_around(Lambda(act))[0:1].append(Lambda(act)).append(nn.Linear(6, 3)).to(DTYPE)
    for local_rule, error_rule in (("dx", "hebbian-z"), ("hebbian", "derived")):
        prog = fxlra.compile(model, wiring="direct", local_rule=local_rule,
                             error_rule=error_rule)
        check_program(prog, X)


def _between_linears(fn):
    """Linear -> fn -> Linear: the first Linear's error is carried back through fn."""
    return nn.Sequential(nn.Linear(4, 6), Lambda(fn), nn.Linear(6, 3)).to(DTYPE)


@pytest.mark.parametrize("fn", [lambda h: torch.sort(h, dim=-1).values,
                                lambda h: h.max(-1, keepdim=True).values * h],
                         ids=["sort", "max"])
def test_an_error_is_carried_through_a_named_tuple_field(fn):
    """`torch.sort(h).values` on the error's path: the VJP of sort was asked for its integer
    indices too (RuntimeError from torch.func), and `.values` was read by position among
    flattened leaves."""
    prog = fxlra.compile(_between_linears(fn), wiring="direct")
    check_program(prog, X)


@pytest.mark.parametrize("fn", [lambda h: torch.cat(h.chunk(2, -1)[::-1], -1),
                                lambda h: torch.stack(h.unbind(-1), -1)],
                         ids=["cat-chunks", "stack-unbind"])
def test_an_op_taking_a_tuple_of_tensors_carries_the_error_to_each(fn):
    """torch.cat(h.chunk(2)) passes the chunk tuple itself: the program generator failed
    (TypeError: 'Node' object is not iterable) and the reference called .detach() on a tuple."""
    prog = fxlra.compile(_between_linears(fn), wiring="pairwise")
    check_program(prog, X)


def test_requires_grad_is_not_an_in_place_op():
    """h.requires_grad_(False) was rewritten to h.requires_grad(False) ('bool' object is not
    callable, reported as shapes that cannot be inferred)."""
    prog = fxlra.compile(_between_linears(lambda h: h.requires_grad_(False)))
    check_program(prog, X)


def test_in_place_op_without_out_of_place_form_names_the_user_line():
    """h.fill_(0.5) on a recorded value cannot be made out of place: a clear error at the
    user's line (an in-place op on a view named a line of torch.fx instead)."""
    for fn, seen in ((lambda h: h.fill_(0.5), "no out-of-place form"),
                     (lambda h: (h[:, :2].mul_(2), h)[1], "a view of another tensor")):
        with pytest.raises(fxlra.UnsupportedError) as info:
            fxlra.compile(_between_linears(fn))
        assert seen in str(info.value) and "test_fuzz.py" in str(info.value), info.value
        assert "torch/fx" not in str(info.value), info.value


def test_an_op_torch_func_cannot_run_is_named_at_the_first_step():
    """A leaf module that calls numpy on the error's path failed inside torch.func
    (RuntimeError: Cannot access data pointer of Tensor that doesn't have storage)."""
    model = nn.Sequential(nn.Linear(4, 6), NumpyCall(), nn.Linear(6, 3)).to(DTYPE)
    prog = fxlra.compile(model, leaf_modules=[NumpyCall])
    with pytest.raises(fxlra.UnsupportedError, match="torch.func cannot differentiate"):
        prog.step(X, Y)


def test_an_op_without_derivative_on_the_error_path_is_named():
    """h // 0.5 between two Linears: RuntimeError (derivative for aten::floor_divide is not
    implemented) from inside torch.func."""
    prog = fxlra.compile(_between_linears(lambda h: h // 0.5))
    with pytest.raises(fxlra.UnsupportedError, match="floor_divide.*activation before it"):
        prog.step(X, Y)


def test_an_auxiliary_output_narrower_than_the_labels_is_a_plan_error():
    """Outputs (B, 3) and (B, 2) with class label 2: scatter_ failed at the second output
    (RuntimeError: index 2 is out of bounds) at the first step."""
    spec = {"input": "vector", "layers": (), "classes": 3, "head": "narrow_aux", "modify": "none",
            "seed": 0}
    with pytest.raises(fxlra.PlanError, match="shaped like the first"):
        fxlra.compile(build(spec)[0], example_inputs=build(spec)[1])


def test_the_feature_axis_is_not_decided_by_an_elementwise_op_that_does_not_tell():
    """Tokens (B, T, F) with T == F: Linear -> PReLU() (one slope) took the PReLU to decide the
    feature axis and chose 1 (tokens) instead of the Linear's -1."""
    model = nn.Sequential(nn.Linear(6, 4), nn.PReLU(), Lambda(lambda h: h.mean(1)),
                          nn.Linear(4, 3)).to(DTYPE)
    x = torch.randn(5, 4, 6, dtype=DTYPE)
    prog = fxlra.compile(model, example_inputs=x)
    assert prog.plan.site(prog.sites[0]).layout.channel_dim == -1
    check_program(prog, x)
