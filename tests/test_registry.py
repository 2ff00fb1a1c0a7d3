"""The op registry: every rule a Plan names has a function behind it, explain() says
"local-vjp" exactly where the generated program uses torch.func, and one lookup serves module,
function, method and ATen nodes."""
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fxlra
from fxlra.ops import registry
from fxlra.nn import LocallyConnected2d, PerturbativeConv2d


class Functional(nn.Module):
    """F.linear (fxlra's function rule) and an elementwise scale on parameters (no rule of its
    own: torch.func)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 5) * 0.3)
        self.scale = nn.Parameter(torch.ones(6))
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(F.linear(x, self.w) * self.scale))


class OwnForward(nn.BatchNorm2d):
    """A BatchNorm whose forward adds an activation (as timm's BatchNormAct2d does)."""

    def forward(self, x):
        return torch.relu(super().forward(x))


def _conv_net(norm):
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), norm, nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3))


MODELS = {
    "instancenorm": (lambda: _conv_net(nn.InstanceNorm2d(4, affine=True)), (2, 1, 6, 6)),
    "groupnorm": (lambda: _conv_net(nn.GroupNorm(2, 4)), (2, 1, 6, 6)),
    "batchnorm": (lambda: _conv_net(nn.BatchNorm2d(4)), (2, 1, 6, 6)),
    "own-forward": (lambda: _conv_net(OwnForward(4)), (2, 1, 6, 6)),
    "rmsnorm-prelu": (lambda: nn.Sequential(nn.Linear(5, 6), nn.RMSNorm(6), nn.PReLU(),
                                            nn.LayerNorm(6), nn.Linear(6, 3)), (2, 5)),
    "functional": (Functional, (2, 5)),
    "fxlra.nn": (lambda: nn.Sequential(PerturbativeConv2d(1, 4, nmasks=2), nn.ReLU(),
                                       LocallyConnected2d(4, 2, 3, (6, 6), padding=1),
                                       nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3)),
                 (2, 1, 6, 6)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_named_rule_has_a_function_and_local_vjp_is_named_where_it_is_used(name):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    x, y = torch.randn(shape), torch.tensor([0, 2])
    prog = fxlra.compile(build(), wiring="residual", example_inputs=(x,),
                         leaf_modules=[OwnForward])
    prog.step(x, y)                                  # the program ran
    ops = {r.op for r in prog.plan.params}
    named = {r.op for r in prog.plan.params if r.rule == "local-vjp"}
    assert all(r.rule in registry.WEIGHT_GRADS or r.rule in registry.FUNCTION_GRADS
               for r in prog.plan.params if r.rule != "local-vjp"), \
        [r.rule for r in prog.plan.params]
    assert named == set(prog.fallbacks) & ops
    lines = prog.explain().splitlines()
    for r in prog.plan.params:
        line = next(s for s in lines if s.startswith(f"model.{r.param} "))
        assert line.split()[2] == r.rule


def test_ops_that_the_program_hands_to_torch_func_are_named_local_vjp_and_others_their_rule():
    rules = {}
    for name in ("instancenorm", "rmsnorm-prelu", "functional", "own-forward"):
        build, shape = MODELS[name]
        prog = fxlra.compile(build(), wiring="residual", example_inputs=(torch.randn(shape),),
                             leaf_modules=[OwnForward])
        rules.update({f"{name}:{r.param}": r.rule for r in prog.plan.params})
    assert rules["instancenorm:1.weight"] == "local-vjp"
    assert rules["rmsnorm-prelu:1.weight"] == "local-vjp"
    assert rules["functional:w"] == "linear"               # F.linear's function rule
    assert rules["functional:scale"] == "local-vjp"
    assert rules["own-forward:1.weight"] == "local-vjp"
    assert rules["functional:out.weight"] == "linear"


def _nodes(model):
    class Tracer(fx.Tracer):
        def is_leaf_module(self, m, name):
            return isinstance(m, OwnForward) or super().is_leaf_module(m, name)

    gm = fx.GraphModule(model, Tracer().trace(model))
    return {n.name: n for n in gm.graph.nodes}, dict(gm.named_modules())


def test_one_lookup_for_modules_functions_and_methods():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.own, self.pool = nn.BatchNorm2d(2), OwnForward(2), nn.MaxPool2d(2)

        def forward(self, x):
            a = F.relu(self.bn(x)) - self.own(x)
            b = torch.cat([a, self.pool(a).repeat(1, 1, 2, 2)], 1)
            return b.flatten(1).mean(1, keepdim=True) + torch.zeros_like(b).sum()

    nodes, modules = _nodes(Mixed())
    kind = {name: registry.kind_of(n, modules) for name, n in nodes.items()}
    assert kind["bn"].norm and kind["bn"].signs == (1,) and kind["bn"].rule == "batchnorm"
    assert kind["own"].norm and kind["own"].signs is None and kind["own"].grads is None
    assert kind["relu"].activation and kind["relu"].phi_prime is not None
    assert kind["sub"].signs == (1, -1)
    assert kind["pool"].carry is not None and kind["pool"].mixes_features
    assert kind["cat"].concat
    assert kind["flatten"].layout and kind["flatten"].carry is not None
    assert kind["mean"].carry is not None and not kind["mean"].layout
    assert kind["zeros_like"].constant
    assert kind["repeat"] == registry.UNKNOWN


def test_aten_ops_of_an_exported_graph_find_their_rows():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.LayerNorm(6), nn.Dropout(0.1),
                          nn.Unflatten(1, (2, 3)))
    graph = torch.export.export(model.train(), (torch.randn(2, 4),)).graph
    by_op = {n.target.overloadpacket: registry.kind_of(n, {}) for n in graph.nodes
             if n.op == "call_function" and hasattr(n.target, "overloadpacket")}
    aten = torch.ops.aten
    assert by_op[aten.linear].channel_last and by_op[aten.linear].mixes_features
    assert by_op[aten.relu].activation and by_op[aten.relu].signs == (1,)
    assert by_op[aten.layer_norm].norm and by_op[aten.layer_norm].channel_last
    assert by_op[aten.dropout].signs == (1,)
    assert by_op[aten.unflatten].layout and by_op[aten.unflatten].carry is not None


def test_a_registered_activation_is_a_site_whose_error_crosses_it_by_its_vjp():
    def bump(h):
        return h + 0.1 * torch.sin(h)

    registry.register_activation(bump, lambda h: 1 + 0.1 * torch.cos(h))
    try:
        row = registry.FUNCTIONS[bump]
        assert row.activation and row.signs is None and row.mixes_features
        assert torch.allclose(row.derivative(torch.zeros(2)), torch.full((2,), 1.1))
        assert bump in registry.registered_activation_functions()
    finally:
        del registry.FUNCTIONS[bump]


aten = torch.ops.aten
FUNCTION_CASES = {   # op, its positional arguments (parameters at the positions the rule covers)
    "linear": (aten.linear.default, lambda: [torch.randn(2, 3, 4), torch.randn(5, 4),
                                              torch.randn(5)]),
    "linear-no-bias": (F.linear, lambda: [torch.randn(3, 4), torch.randn(5, 4)]),
    "addmm": (aten.addmm.default, lambda: [torch.randn(5), torch.randn(6, 4), torch.randn(4, 5)]),
    "embedding": (aten.embedding.default, lambda: [torch.randn(7, 3), torch.tensor([[0, 2, 2],
                                                                                   [6, 2, 0]])]),
    "embedding-padding-freq": (aten.embedding.default, lambda: [
        torch.randn(7, 3), torch.tensor([[0, 2, 2], [6, 2, 0]]), 2, True]),
    "layer_norm": (aten.layer_norm.default, lambda: [torch.randn(2, 3, 4), [4], torch.randn(4),
                                                      torch.randn(4), 1e-5]),
    "layer_norm-2d-no-bias": (F.layer_norm, lambda: [torch.randn(2, 3, 4), (3, 4),
                                                     torch.randn(3, 4)]),
    "conv2d": (aten.conv2d.default, lambda: [torch.randn(2, 4, 7, 6), torch.randn(6, 2, 3, 2),
                                              torch.randn(6), [2, 1], [1, 0], [1, 2], 2]),
    "conv2d-same": (aten.conv2d.padding, lambda: [torch.randn(2, 3, 6, 5), torch.randn(4, 3, 4, 3),
                                                   torch.randn(4), [1, 1], "same", [1, 2]]),
    "batch_norm-train": (aten.batch_norm.default, lambda: [
        torch.randn(4, 3, 5, 2), torch.randn(3), torch.randn(3), torch.zeros(3), torch.ones(3),
        True, 0.1, 1e-5, False]),
    "batch_norm-eval": (aten.batch_norm.default, lambda: [
        torch.randn(4, 3, 5), torch.randn(3), torch.randn(3), torch.randn(3), torch.rand(3) + 0.5,
        False, 0.1, 1e-3, False]),
    "conv1d-no-bias": (F.conv1d, lambda: [torch.randn(2, 3, 9), torch.randn(4, 3, 3), None, 2]),
    "conv3d-valid": (aten.conv3d.padding, lambda: [torch.randn(1, 2, 4, 4, 4),
                                                    torch.randn(3, 2, 2, 2, 2), None, [1, 1, 1],
                                                    "valid"]),
}


@pytest.mark.parametrize("case", sorted(FUNCTION_CASES))
def test_a_function_rule_gives_the_gradients_of_the_ops_own_vjp(case):
    op, make = FUNCTION_CASES[case]
    torch.manual_seed(0)
    args = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in make()]
    row = registry.FUNCTIONS.get(op) or registry.FUNCTIONS[op.overloadpacket]
    at = [k for k in row.grad_args if k < len(args) and isinstance(args[k], torch.Tensor)]
    out = op(*args)
    c = torch.randn_like(out)

    def partial(*chosen):
        full = list(args)
        for k, v in zip(at, chosen):
            full[k] = v
        return op(*full)
    _, pull = torch.func.vjp(partial, *[args[k] for k in at])
    want = dict(zip(at, pull(c)))
    got = row.arg_grads(args, c)
    for k in at:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-12)


CARRY_CASES = {   # op, its positional arguments, the position whose error the rule gives
    "linear": (aten.linear.default, lambda: [torch.randn(2, 3, 4), torch.randn(5, 4),
                                              torch.randn(5)], 0),
    "addmm": (aten.addmm.default, lambda: [torch.randn(5), torch.randn(6, 4), torch.randn(4, 5)],
              1),
    "mm": (aten.mm.default, lambda: [torch.randn(6, 4), torch.randn(4, 5)], 0),
    "matmul-batched": (torch.matmul, lambda: [torch.randn(2, 3, 4), torch.randn(2, 4, 5)], 0),
    "matmul-broadcast": (torch.matmul, lambda: [torch.randn(3, 4), torch.randn(2, 4, 5)], 0),
    "matmul-vector": (torch.matmul, lambda: [torch.randn(2, 3, 4), torch.randn(4)], 0),
    "pow": (aten.pow.Tensor_Scalar, lambda: [torch.rand(3, 4) + 0.5, 3.0], 0),
    "slice": (aten.slice.Tensor, lambda: [torch.randn(3, 8), 1, 2, 9223372036854775807, 2], 0),
    "slice-defaults": (aten.slice.Tensor, lambda: [torch.randn(5, 2)], 0),
    "slice-negative": (aten.slice.Tensor, lambda: [torch.randn(3, 8), 1, -5, -1], 0),
}


@pytest.mark.parametrize("case", sorted(CARRY_CASES))
def test_a_function_carry_gives_the_error_of_the_ops_own_vjp_at_its_input(case):
    op, make, k = CARRY_CASES[case]
    torch.manual_seed(0)
    args = [a.double() if isinstance(a, torch.Tensor) else a for a in make()]
    row = registry.FUNCTIONS.get(op) or registry.FUNCTIONS[op.overloadpacket]
    c = torch.randn_like(op(*args))
    _, pull = torch.func.vjp(lambda v: op(*args[:k], v, *args[k + 1:]), args[k])
    torch.testing.assert_close(row.arg_carry(args, c, k), pull(c)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op, size, used", [
    (aten.split.Tensor, 3, (0, 2)), (aten.split_with_sizes.default, [2, 4, 1], (1,)),
    (torch.split, [3, 4], (0, 1))])
def test_the_split_carry_gives_the_error_of_its_vjp_for_the_parts_that_carry_one(op, size, used):
    torch.manual_seed(0)
    x = torch.randn(2, 7, 3, dtype=torch.float64)
    c = {i: torch.randn_like(p) for i, p in enumerate(op(x, size, 1)) if i in used}
    _, pull = torch.func.vjp(lambda v: [p for i, p in enumerate(op(v, size, 1)) if i in used], x)
    want = pull([c[i] for i in used])[0]
    row = registry.FUNCTIONS.get(op) or registry.FUNCTIONS[op.overloadpacket]
    torch.testing.assert_close(row.arg_carry([x, size, 1], c, 0), want, rtol=0, atol=0)
