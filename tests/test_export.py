"""The torch.export frontend: ``fxlra.compile(model, frontend="export")`` and the default that
falls back to it where symbolic tracing fails. The same model gives the same updates through
both frontends; the ATen graph keeps the model's parameter names, buffers and batch-size
freedom; bad input is refused with messages that name the fix."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxlra
from fxlra import models
from fxlra.errors import InputError, OptionError, PlanError, TraceError
from fxlra.semantics import rules
from helpers import assert_matches_reference, assert_updates_match


def _mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.BatchNorm1d(8),
                         nn.ReLU(), nn.Linear(8, 3))


def _cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 3 * 3, 3))


class _Tokens(nn.Module):
    """Embedding, a linear layer per token, LayerNorm and GELU, token logits (B, T, V)."""

    def __init__(self, vocab=7, width=8):
        super().__init__()
        self.embed, self.mix = nn.Embedding(vocab, width), nn.Linear(width, width)
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab)

    def forward(self, ids):
        return self.head(F.gelu(self.norm(self.mix(self.embed(ids)))))


class _ScaledTokens(nn.Module):
    """Embedded tokens (B, 3, 4), ``(h @ w) * scale`` to (B, 3, 3), token logits: after the
    matmul the sequence is as long as the width."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(10, 4), nn.Linear(3, 2)
        self.w = nn.Parameter(torch.randn(4, 3) / 2)
        self.scale = nn.Parameter(1 + 0.1 * torch.randn(3))

    def forward(self, ids):
        return self.head((self.embed(ids) @ self.w) * self.scale)


class _PaddedAfterResidual(nn.Module):
    """A residual block, then a reflect-padded conv (torch.export spells it aten.pad, then
    aten.conv2d), pooled logits."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.ELU(2.0),
                                  nn.Conv2d(2, 2, 3, padding=1))
        self.conv = nn.Conv2d(2, 2, 3, padding="same", padding_mode="reflect")
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        return self.head(self.conv(x + self.body(x)).mean((2, 3)))


FX_MODELS = {
    "mlp": (_mlp, lambda: torch.randn(5, 6), lambda: torch.randint(0, 3, (5,))),
    "cnn": (_cnn, lambda: torch.randn(4, 1, 6, 6), lambda: torch.randint(0, 3, (4,))),
    "resnet": (lambda: models.ResNet18(3, 4, cifar=True, in_channels=1),
               lambda: torch.randn(3, 1, 8, 8), lambda: torch.randint(0, 3, (3,))),
    "tokens": (_Tokens, lambda: torch.randint(0, 7, (3, 5)), lambda: torch.randint(0, 7, (3, 5))),
    "scaled_tokens": (_ScaledTokens, lambda: torch.randint(0, 10, (4, 3)),
                      lambda: torch.randint(0, 2, (4, 3))),
    "padded_after_residual": (_PaddedAfterResidual, lambda: torch.randn(3, 2, 4, 4),
                              lambda: torch.randint(0, 3, (3,))),
}


def _compiled(name, frontend, **options):
    build, make_x, make_y = FX_MODELS[name]
    torch.manual_seed(0)
    model, x, y = build().double().train(), make_x(), make_y()
    x = x.double() if x.is_floating_point() else x
    torch.manual_seed(1)
    return fxlra.compile(model, example_inputs=x, frontend=frontend, **options), x, y


@pytest.mark.parametrize("name", sorted(FX_MODELS))
@pytest.mark.parametrize("wiring", ["residual", "direct"])
def test_a_traceable_model_gets_the_same_updates_through_both_frontends(name, wiring):
    fx_prog, x, y = _compiled(name, "fx", wiring=wiring)
    ex_prog, _, _ = _compiled(name, "export", wiring=wiring)
    assert (fx_prog.frontend, ex_prog.frontend) == ("fx", "export")
    assert len(fx_prog.plan.sites) == len(ex_prog.plan.sites)
    assert [s.layout for s in fx_prog.plan.sites] == [s.layout for s in ex_prog.plan.sites]
    got, want = ex_prog.updates(x, y), fx_prog.updates(x, y)
    # the model's parameters by name; the synapses (named after the sites) edge by edge
    rename = {f"synapses.{a.key}.weight": f"synapses.{b.key}.weight"
              for a, b in zip(ex_prog.plan.edges, fx_prog.plan.edges)}
    assert_updates_match({rename.get(k, k): v for k, v in got.items()}, want, "float64")
    assert_matches_reference(ex_prog, x, y)


def test_the_export_graph_reads_the_models_own_parameters_and_names_them():
    prog, x, y = _compiled("mlp", "export")
    model = prog.model
    assert [n for n, _ in prog.named_parameters()][:len(list(model.parameters()))] == \
        [f"model.{n}" for n, _ in model.named_parameters()]
    explain = prog.explain()
    assert explain.splitlines()[0] == "graph: torch.export, training mode, ATen ops: " \
        "frontend='export'"
    assert "model.0.weight" in explain and "graph: torch.export" in repr(prog)
    opt = torch.optim.SGD(prog.parameters(), lr=0.1)
    before = model[0].weight.detach().clone()
    prog.step(x, y)
    opt.step()
    assert not torch.equal(before, model[0].weight)
    assert torch.equal(prog(x), model(x))          # the graph runs on the updated weights


def test_batchnorm_running_statistics_advance_once_per_step():
    prog, x, y = _compiled("cnn", "export")
    twin = copy.deepcopy(prog.model)
    prog.step(x, y)
    twin(x)
    for (name, got), (_, want) in zip(prog.model.named_buffers(), twin.named_buffers()):
        torch.testing.assert_close(got, want, msg=name)


def test_one_exported_program_serves_every_batch_size():
    prog, _, _ = _compiled("tokens", "export")
    for batch in (2, 5, 9):
        x, y = torch.randint(0, 7, (batch, 5)), torch.randint(0, 7, (batch, 5))
        assert prog(x).shape == (batch, 5, 7)
        assert_matches_reference(prog, x, y)


def test_token_logits_get_the_error_and_loss_of_mean_token_cross_entropy():
    torch.manual_seed(0)
    v = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 6, (3, 4))
    y[0, 1] = y[2, 3] = rules.IGNORE_INDEX
    e, loss = rules.output_error(v, rules.targets_for(v, y, "cross_entropy"), "cross_entropy")
    want = F.cross_entropy(v.flatten(0, 1), y.flatten(), ignore_index=rules.IGNORE_INDEX)
    want.backward()
    torch.testing.assert_close(loss, want)
    # e is B times dL/dv (the updates average over the batch), zero at ignored tokens
    torch.testing.assert_close(e, v.grad * v.shape[0])
    assert e[0, 1].abs().sum() == 0 and e[2, 3].abs().sum() == 0


def test_token_labels_out_of_range_are_refused_except_ignore_index():
    prog, x, y = _compiled("tokens", "export")
    y[0, 0] = rules.IGNORE_INDEX
    prog.updates(x, y)
    y[1, 1] = 7
    with pytest.raises(InputError, match=r"class labels must lie in \[0, 6\] \(or be -100, "
                                         r"ignored\); got values from 0 to 7"):
        prog.updates(x, y)


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x) if x.sum() > 0 else self.lin(-x)


class _BatchAsNumber(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(x)) / len(x))


def _falls_back(model, x, error, match, why):
    """The model fails under frontend="fx" with ``error``; the default frontend exports it,
    says ``why``, and its program equals its reference (both in float64)."""
    model, x = model.double(), x.double()
    with pytest.raises(error, match=match):
        fxlra.compile(model, example_inputs=x, frontend="fx")
    prog = fxlra.compile(model, example_inputs=x)
    assert prog.frontend == "export"
    assert why in repr(prog)
    assert_matches_reference(prog, x, torch.randint(0, 3, (len(x),)))
    return prog


def test_the_default_frontend_falls_back_to_export_and_says_why():
    x = torch.randn(4, 4)
    prog = _falls_back(_BatchAsNumber(), x, TraceError, "len",
                       "torch.fx could not trace it (len() of a traced value)")
    with pytest.raises(InputError, match="captured by torch.export at its example's batch "
                                         "size, 4, because it computes with its batch size"):
        prog.updates(torch.randn(5, 4), torch.randint(0, 3, (5,)))


def test_a_model_neither_frontend_captures_gets_both_reasons():
    with pytest.raises(TraceError) as info:
        fxlra.compile(_DataDependent(), example_inputs=torch.randn(3, 4))
    message = str(info.value)
    assert "control flow on a tensor" in message and "Fix: " in message
    assert "torch.export could not capture it either: GuardOnDataDependentSymNode" in message


@pytest.mark.parametrize("options, error, message", [
    (dict(frontend="jit"), OptionError,
     "frontend='jit' is not supported; choose one of ['auto', 'fx', 'export']"),
    (dict(frontend="export"), OptionError,
     "frontend='export' needs an example batch: pass example_inputs=x"),
    (dict(frontend="export", example_inputs=torch.randn(1, 6)), OptionError,
     "the example batch has 1 sample; torch.export fixes a batch axis of size 1"),
    (dict(frontend="fx", example_kwargs={"x": 1}), OptionError,
     "example_kwargs= is for frontend='export'"),
])
def test_bad_frontend_options_are_refused(options, error, message):
    with pytest.raises(error) as info:
        fxlra.compile(_mlp(), **options)
    assert message in str(info.value)


def test_without_an_example_batch_the_trace_error_names_export():
    with pytest.raises(TraceError, match=r"Or pass an example batch \(example_inputs=x\) so "
                                         "that fxlra captures the model with torch.export"):
        fxlra.compile(_DataDependent())


class _Conv1D(nn.Module):
    """A GPT-2-style projection: ``addmm(b, x.view(-1, C), W)`` with W (in, out), viewed back."""

    def __init__(self, width):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(width, width) / width ** 0.5), \
            nn.Parameter(torch.zeros(width))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(x.shape)


class _SquareTokens(nn.Module):
    """Token features (B, T, C) with T == C, a residual addmm block, token logits."""

    def __init__(self, vocab=5, width=6):
        super().__init__()
        self.embed, self.norm = nn.Embedding(vocab, width), nn.LayerNorm(width)
        self.proj, self.head = _Conv1D(width), nn.Linear(width, vocab)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.proj(torch.tanh(self.norm(h)))
        return self.head(h)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_token_sites_keep_their_features_last_when_the_sequence_is_as_long_as_the_width(
        frontend):
    # the residual sum's nearest weight op is an addmm: its shape (B, 6, 6) alone cannot say
    # which axis holds the features, the op's kind must (channels on axis 1 sent the error
    # synapses' displacements along the sequence)
    torch.manual_seed(0)
    ids = torch.randint(0, 5, (3, 6))
    prog = fxlra.compile(_SquareTokens().double(), example_inputs=ids, frontend=frontend)
    layouts = {s.name: (s.layout.channels, s.layout.channel_dim) for s in prog.plan.sites}
    assert set(layouts.values()) == {(6, -1), (5, -1)}, layouts
    assert_matches_reference(prog, ids, torch.randint(0, 5, (3, 6)))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_site_read_by_a_function_op_takes_its_features_from_the_ops_around_it(frontend):
    # the embedding's next module is the head, two ops on (its 3 inputs match the 3 tokens):
    # the matmul in between reads the embedding, so its 4 features are on the last axis; the
    # scale of shape (3,) broadcasts along the last axis of (B, 3, 3)
    prog, _, _ = _compiled("scaled_tokens", frontend)
    layouts = [(s.layout.channels, s.layout.channel_dim) for s in prog.plan.sites]
    assert layouts == [(4, -1), (3, -1), (2, -1)], prog.plan


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_the_site_before_a_reflect_padded_conv_is_the_value_the_conv_is_called_with(frontend):
    # torch.export's aten.pad belongs to the Conv2d's call: the site sits at the residual sum,
    # (B, 2, 4, 4), not at the padded (B, 2, 6, 6) map
    prog, _, _ = _compiled("padded_after_residual", frontend)
    assert prog.plan.sites[0].name == "add", prog.plan


class _Normalized(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(F.normalize(self.mix(x), dim=-1))


def test_a_torch_function_that_export_splits_gets_a_site_where_its_input_fans_out():
    # F.normalize(h) is one op to symbolic tracing; torch.export spells it h / norm(h), so h
    # fans out and the layer's parameters are owned by an identity site at h itself
    torch.manual_seed(0)
    model, x, y = _Normalized().double(), torch.randn(5, 4).double(), torch.randint(0, 3, (5,))
    traced = fxlra.compile(model, example_inputs=x, frontend="fx")
    exported = fxlra.compile(model, example_inputs=x, frontend="export")
    assert [(r.param, r.site) for r in traced.plan.params][:2] == [
        ("mix.weight", "normalize"), ("mix.bias", "normalize")]
    assert [(r.param, r.site) for r in exported.plan.params][:2] == [
        ("mix.weight", "linear"), ("mix.bias", "linear")]
    assert_matches_reference(exported, x, y)


class _MaskedByDefault(nn.Module):
    """``if mask is not None``: symbolic tracing makes ``mask`` an input and traces the masked
    branch, a graph that fails on a batch without a mask (as timm's Hiera does)."""

    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x, mask=None):
        if mask is not None:
            x = x * mask.view(-1, 1)
        return self.out(torch.tanh(self.lin(x)))


def test_the_default_frontend_falls_back_to_export_where_the_traced_graph_fails_on_the_batch():
    _falls_back(_MaskedByDefault(), torch.randn(4, 4), PlanError, "cannot infer the tensor shapes",
                "its torch.fx graph fails on the example batch (input (4, 4): ")
