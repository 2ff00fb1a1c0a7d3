"""fxlra.analysis and fxlra.plan through fxlra.compile: where the error sites are, which site owns
every parameter, residual blocks, layouts and synapse kinds, plan equality and stability, and
the PlanErrors for models rec-LRA cannot train (docs/design.md section 1, "Error sites", "Owners",
"Error synapses")."""
import copy
from collections import Counter

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

import fxlra
from fxlra.frontend import shapes
from conftest import make_cnn, make_mlp
from helpers import assert_matches_reference, assert_updates_match


def rules_by_param(prog):
    return {r.param: r for r in prog.plan.params}


def site(prog, name):
    return prog.plan.site(name)


def site_of(prog, param):
    return next(r.site for r in prog.plan.params if r.param == param)


# -- sites ------------------------------------------------------------------------------------------
def test_mlp_activations_are_sites_and_the_output_is_last():
    model = make_mlp(widths=(8, 7, 6), act=nn.Tanh)
    prog = fxlra.compile(model)
    kinds = [site(prog, s).kind for s in prog.sites]
    assert kinds == ["activation"] * 3 + ["output"]
    assert [site(prog, s).activation for s in prog.sites] == ["Tanh"] * 3 + ["softmax"]
    # the sites are the Tanh modules of the Sequential (nodes _1, _3, _5) and the last Linear
    assert prog.sites == ("_1", "_3", "_5", "_6")
    assert prog.plan.outputs == ("_6",)
    owners = {r.param: r.site for r in prog.plan.params}
    assert owners == {"0.weight": "_1", "0.bias": "_1", "2.weight": "_3", "2.bias": "_3",
                      "4.weight": "_5", "4.bias": "_5", "6.weight": "_6", "6.bias": "_6"}
    assert site(prog, "_3").h == "_2"          # the pre-activation is the Linear's output


def test_mse_output_site_has_identity_phi():
    prog = fxlra.compile(make_mlp(), loss="mse")
    assert site(prog, prog.sites[-1]).activation == "identity"


def test_linear_linear_without_activation_gets_an_identity_site_between_them():
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    prog = fxlra.compile(model)
    assert prog.sites == ("_0", "_2", "_3")
    first = site(prog, "_0")
    assert first.kind == "identity" and first.activation == "identity" and first.h == "_0"
    assert first.ops == ("_0",)
    owners = {r.param: r.site for r in prog.plan.params}
    assert owners["0.weight"] == "_0" and owners["1.weight"] == "_2"


def test_conv_bn_relu_is_one_site_owning_conv_and_bn():
    prog = fxlra.compile(make_cnn())
    s = site(prog, "relu")
    assert s.kind == "activation" and s.h == "bn"
    assert s.ops == ("conv", "bn")
    assert s.region == ("conv", "bn", "relu")
    owners = {r.param: (r.site, r.rule) for r in prog.plan.params}
    assert owners["conv.weight"] == ("relu", "conv")
    assert owners["conv.bias"] == ("relu", "conv")
    assert owners["bn.weight"] == ("relu", "batchnorm")
    assert owners["bn.bias"] == ("relu", "batchnorm")


def test_downsample_conv_belongs_to_the_block_output_site():
    prog = fxlra.compile(make_cnn(), scope="layer")
    (plain, down) = prog.plan.blocks
    assert not plain.downsample and down.downsample
    owners = {r.param: r.site for r in prog.plan.params}
    assert owners["block2.downsample.0.weight"] == down.output
    assert owners["block2.downsample.1.weight"] == down.output
    assert owners["block2.conv2.weight"] == down.output
    assert owners["block2.conv1.weight"] != down.output
    assert "add_1" in site(prog, down.output).region      # the merge is in the block's region
    assert all(not s.crosses for s in prog.plan.sites)


def test_block_scope_joins_the_sites_inside_a_block_to_its_output():
    layer = fxlra.compile(make_cnn(), scope="layer")
    prog = fxlra.compile(make_cnn())                      # scope="block", the default
    (plain, down) = prog.plan.blocks
    assert [b.output for b in prog.plan.blocks] == [b.output for b in layer.plan.blocks]
    owners = {r.param: r.site for r in prog.plan.params}
    for name in ("conv1", "bn1", "conv2", "bn2", "downsample.0", "downsample.1"):
        assert owners[f"block2.{name}.weight"] == down.output
    inner = site_of(layer, "block2.conv1.weight")
    assert inner not in prog.sites and site(prog, down.output).crosses == (inner,)
    assert set(prog.sites) == set(layer.sites) - {inner, site_of(layer, "block1.conv1.weight")}
    assert f"crosses {inner}" in str(prog) and "block-local VJP" in prog.explain()


def test_resnet18_downsample_convs_belong_to_block_outputs_and_there_are_8_merges():
    model = torchvision.models.resnet18(num_classes=10)
    prog = fxlra.compile(model, scope="block")
    plan = prog.plan
    assert len(plan.blocks) == 8
    assert sum(b.downsample for b in plan.blocks) == 3
    owners = {r.param: r.site for r in plan.params}
    outputs = {b.output for b in plan.blocks}
    for stage in (2, 3, 4):
        block_out = owners[f"layer{stage}.0.conv2.weight"]
        assert block_out in outputs
        assert owners[f"layer{stage}.0.downsample.0.weight"] == block_out
        assert owners[f"layer{stage}.0.downsample.1.bias"] == block_out


@pytest.mark.parametrize("factory", [make_mlp, make_cnn,
                                     lambda: torchvision.models.resnet18(num_classes=10)])
def test_every_parameter_has_exactly_one_rule(factory):
    model = factory()
    prog = fxlra.compile(model)
    names = [r.param for r in prog.plan.params]
    assert len(names) == len(set(names))
    assert set(names) == {n for n, _ in model.named_parameters()}
    for r in prog.plan.params:
        assert r.op in site(prog, r.site).ops


def test_plan_params_follow_the_models_parameter_order():
    """Plan.params is documented as "ParamRule, in model order" (plan.py)."""
    model = make_cnn()
    prog = fxlra.compile(model)
    assert [r.param for r in prog.plan.params] == [n for n, _ in model.named_parameters()]


def test_sign_activations_are_sites_and_steps_are_finite():
    class SignNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.c(torch.sign(self.b(torch.sign(self.a(x)))))
    prog = fxlra.compile(SignNet())
    assert [site(prog, s).activation for s in prog.sites] == ["sign", "sign", "softmax"]
    assert [site(prog, s).kind for s in prog.sites] == ["activation", "activation", "output"]
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    for _ in range(3):
        out = prog.step(x, y)
        assert torch.isfinite(out.loss)
        assert all(torch.isfinite(v) for v in out.discrepancies.values())
    for name, p in prog.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert prog.model.c.weight.grad.abs().sum() > 0


# -- parameters that cannot be owned --------------------------------------------------------------
class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.spare, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.c(torch.tanh(self.a(x)))


def test_parameter_not_used_by_forward_is_a_plan_error_naming_it():
    with pytest.raises(fxlra.PlanError, match=r"spare\.weight"):
        fxlra.compile(WithUnused())


def test_freezing_the_unused_parameter_makes_compile_succeed():
    model = WithUnused()
    model.spare.requires_grad_(False)
    prog = fxlra.compile(model)
    assert {r.param for r in prog.plan.params} == {"a.weight", "a.bias", "c.weight", "c.bias"}
    updates = prog.updates(torch.randn(3, 4), torch.tensor([0, 1, 2]))
    assert not any("spare" in k for k in updates)


class Twice(nn.Module):
    """One module applied twice (a shared block); ``Untied`` is its twin with two copies."""

    def __init__(self):
        super().__init__()
        self.shared, self.c = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.c(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


class Untied(nn.Module):
    def __init__(self, twice):
        super().__init__()
        self.first, self.second = copy.deepcopy(twice.shared), copy.deepcopy(twice.shared)
        self.c = copy.deepcopy(twice.c)

    def forward(self, x):
        return self.c(torch.tanh(self.second(torch.tanh(self.first(x)))))


class Tied(nn.Module):
    """Weight tying the usual way: two modules hold the same Parameter object."""

    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Linear(6, 6), nn.Linear(6, 6)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.dec(torch.tanh(self.enc(x)))


class FunctionalTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.w = nn.Parameter(torch.randn(3, 6))

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return F.linear(h, self.w) + F.linear(h * 2, self.w)


@pytest.mark.parametrize("model, x, names", [
    (Twice, (3, 6), r"parameter shared\.weight is used by 2 ops"),
    (Tied, (3, 6), r"parameter enc\.weight \(also named dec\.weight: one tied tensor\) is used by 2 ops"),
    (FunctionalTwice, (3, 4), r"parameter w is used by 2 ops"),
])
def test_shared_parameters_are_refused_when_asked(model, x, names):
    with pytest.raises(fxlra.PlanError, match=names + r".*shared_params='refuse'"):
        fxlra.compile(model(), shared_params="refuse", example_inputs=torch.randn(*x))


@pytest.mark.parametrize("model, x", [(Twice, (3, 6)), (Tied, (3, 6)), (FunctionalTwice, (3, 4))])
def test_shared_parameters_get_a_rule_per_use_and_match_the_reference(model, x):
    model, x = model(), torch.randn(*x)
    y = torch.tensor([0, 1, 2])
    prog = fxlra.compile(model, example_inputs=x)
    uses = Counter(r.param for r in prog.plan.params)
    assert max(uses.values()) == 2 and set(uses) == {n for n, _ in model.named_parameters()}
    assert_matches_reference(prog, x, y, "float32")
    shared = [n for n, k in uses.items() if k == 2]
    assert all("shared by 2 ops" in line for line in prog.explain().splitlines()
               if any(line.startswith(f"model.{n} ") for n in shared))


def test_a_shared_module_is_updated_by_the_sum_of_its_uses_updates():
    """As backprop sums a shared weight's gradients: the update of a module applied twice is
    the sum of the updates its two untied copies get (same weights, same synapses)."""
    twice = Twice()
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    torch.manual_seed(1)
    tied = fxlra.compile(twice, example_inputs=x).updates(x, y)
    torch.manual_seed(1)
    untied = fxlra.compile(Untied(twice), example_inputs=x).updates(x, y)
    for p in ("weight", "bias"):
        torch.testing.assert_close(tied[f"model.shared.{p}"],
                                   untied[f"model.first.{p}"] + untied[f"model.second.{p}"])


# -- ops without a rule of their own ----------------------------------------------------------------
def test_multihead_attention_gets_the_local_vjp_rule():
    class Att(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Linear(4, 8)
            self.att = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            h = torch.tanh(self.emb(x))
            a, _ = self.att(h, h, h)
            return self.fc(torch.tanh(a).mean(1))
    x = torch.randn(2, 5, 4)
    prog = fxlra.compile(Att(), example_inputs=x)
    att = {r.param: r for r in prog.plan.params if r.param.startswith("att.")}
    assert set(att) == {"att.in_proj_weight", "att.in_proj_bias", "att.out_proj.weight",
                        "att.out_proj.bias"}
    assert {r.rule for r in att.values()} == {"local-vjp"}
    assert len({r.site for r in att.values()}) == 1
    lines = prog.explain().splitlines()
    for name in att:
        (line,) = [l for l in lines if f"model.{name} " in l]
        assert "local-vjp" in line
    out = prog.step(x, torch.tensor([0, 2]))
    assert torch.isfinite(out.loss)
    assert prog.model.att.in_proj_weight.grad is not None
    assert torch.isfinite(prog.model.att.in_proj_weight.grad).all()


# -- several outputs --------------------------------------------------------------------------------
class AuxHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 6)
        self.main, self.aux = nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        g = torch.relu(self.b(h))
        return self.main(g), self.aux(h)


def test_tuple_of_two_logits_gives_two_output_sites():
    model = AuxHead()
    prog = fxlra.compile(model)
    plan = prog.plan
    assert plan.outputs == ("main", "aux")
    assert prog.sites[-1] == "main"                       # the primary output is last
    assert site(prog, "aux").kind == "output" and site(prog, "main").kind == "output"
    assert plan.parents("aux") == () and plan.parents("main") == ()
    assert plan.depth["aux"] == 0
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    out_p, out_m = prog(x), model(x)
    assert isinstance(out_p, tuple) and len(out_p) == 2
    for a, b in zip(out_p, out_m):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    res = prog.step(x, y)
    assert torch.isfinite(res.loss)
    assert set(res.discrepancies) == set(prog.sites)
    for name in ("main.weight", "aux.weight", "a.weight", "b.weight"):
        g = prog.model.get_parameter(name).grad
        assert g is not None and g.abs().sum() > 0, name
    # the aux head's update is backprop's gradient of its own cross-entropy
    aux_in = torch.relu(model.a(x)).detach()
    logits = model.aux(aux_in)
    grad, = torch.autograd.grad(F.cross_entropy(logits, y), model.aux.weight)
    u = prog.updates(x, y)["model.aux.weight"]
    torch.testing.assert_close(u, grad, rtol=1e-5, atol=1e-6)


# -- plan identity ----------------------------------------------------------------------------------
@pytest.mark.parametrize("factory", [make_mlp, make_cnn,
                                     lambda: torchvision.models.resnet18(num_classes=10)])
def test_two_traces_give_equal_plans(factory):
    model = factory()
    p1 = fxlra.compile(model)
    p2 = fxlra.compile(model)
    assert p1.plan == p2.plan
    assert str(p1.plan) == str(p2.plan)
    assert p1.plan == fxlra.compile(factory()).plan      # another instance, same architecture


class RenamedBlock(nn.Module):
    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.first = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm_a = nn.BatchNorm2d(c_out)
        self.act = nn.ReLU()
        self.second = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm_b = nn.BatchNorm2d(c_out)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, inp):
        skip = inp if self.shortcut is None else self.shortcut(inp)
        y = self.act(self.norm_a(self.first(inp)))
        y = self.norm_b(self.second(y))
        return F.relu(y + skip)


class RenamedCNN(nn.Module):
    """conftest.SmallCNN with every attribute renamed."""

    def __init__(self, c_in=3, width=4, n_classes=5):
        super().__init__()
        self.stem = nn.Conv2d(c_in, width, 3, padding=1)
        self.stem_norm = nn.BatchNorm2d(width)
        self.stem_act = nn.ReLU()
        self.down = nn.MaxPool2d(2)
        self.res_a = RenamedBlock(width, width)
        self.res_b = RenamedBlock(width, 2 * width, stride=2)
        self.squeeze = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.head = nn.Linear(2 * width, n_classes)

    def forward(self, img):
        img = self.down(self.stem_act(self.stem_norm(self.stem(img))))
        img = self.res_b(self.res_a(img))
        return self.head(self.flat(self.squeeze(img)))


def _structure(plan):
    pos = {s.name: k for k, s in enumerate(plan.sites)}
    return dict(
        sites=[(s.kind, s.activation, str(s.layout), len(s.region), len(s.ops)) for s in plan.sites],
        outputs=[pos[o] for o in plan.outputs],
        edges=[(pos[e.parent], pos[e.child], e.synapse, e.in_features, e.out_features)
               for e in plan.edges],
        rules=[(r.rule, pos[r.site]) for r in plan.params],
        blocks=[(pos[b.output], pos.get(b.input), b.downsample) for b in plan.blocks],
    )


def test_renaming_modules_does_not_change_the_plan_structure():
    a = fxlra.compile(make_cnn(), scope="layer").plan
    b = fxlra.compile(RenamedCNN(), scope="layer").plan
    assert {s.name for s in a.sites} != {s.name for s in b.sites}     # the names did change
    assert _structure(a) == _structure(b)
    assert len(a.sites) == len(b.sites) == 6


def test_renamed_models_have_equal_updates():
    torch.manual_seed(3)
    m1 = make_cnn()
    m2 = RenamedCNN()
    m2.load_state_dict(dict(zip(m2.state_dict().keys(), m1.state_dict().values())))
    p1, p2 = fxlra.compile(m1), fxlra.compile(m2)
    for s, t in zip(p1.synapses.parameters(), p2.synapses.parameters()):
        with torch.no_grad():
            t.copy_(s)
    x, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 4, 2])
    u1, u2 = p1.updates(x, y), p2.updates(x, y)
    by_model_1 = {r.param: u1[f"model.{r.param}"] for r in p1.plan.params}
    by_model_2 = {r.param: u2[f"model.{r.param}"] for r in p2.plan.params}
    names_1, names_2 = [n for n, _ in m1.named_parameters()], [n for n, _ in m2.named_parameters()]
    for n1, n2 in zip(names_1, names_2):
        torch.testing.assert_close(by_model_1[n1], by_model_2[n2], rtol=0, atol=0, msg=n1)


# -- Plan -------------------------------------------------------------------------------------------
def test_plan_verifies_and_prints_every_site_and_parameter():
    model = make_cnn()
    plan = fxlra.compile(model).plan
    assert plan.verify() is plan
    text = str(plan)
    lines = text.splitlines()
    assert lines[0].startswith(f"Plan: {len(plan.sites)} sites, {len(plan.edges)} error synapses, "
                               f"{len(plan.params)} parameters")
    for s in plan.sites:
        assert any(l.split() and l.split()[0] == s.name for l in lines), s.name
    for name, _ in model.named_parameters():
        assert any(l.split() and l.split()[0] == name for l in lines), name
    for e in plan.edges:
        assert f"{e.parent} -> {e.child}: {e.synapse}" in text


def test_plan_is_frozen():
    plan = fxlra.compile(make_mlp()).plan
    with pytest.raises(Exception):
        plan.sites = ()
    with pytest.raises(Exception):
        plan.sites[0].name = "x"


def test_plan_verify_catches_a_broken_plan():
    import dataclasses
    plan = fxlra.compile(make_mlp(), wiring="pairwise").plan
    orphaned = dataclasses.replace(plan, edges=plan.edges[1:])
    with pytest.raises(AssertionError, match=plan.edges[0].child):
        orphaned.verify()


# -- layouts and synapse kinds ----------------------------------------------------------------------
def test_layouts_of_linear_and_conv_sites():
    prog = fxlra.compile(make_cnn(width=4, n_classes=5))
    assert str(site(prog, "fc").layout) == "vector[5]"
    assert str(site(prog, "relu").layout) == "spatial[4@1]"
    assert str(site(prog, "relu_2").layout) == "spatial[8@1]"
    mlp = fxlra.compile(make_mlp(widths=(8, 7)))
    assert [str(site(mlp, s).layout) for s in mlp.sites] == ["vector[8]", "vector[7]", "vector[4]"]


class ConvThenDense(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(6, 7)
        self.fc2 = nn.Linear(7, 5)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = torch.relu(self.conv2(h))
        v = torch.tanh(self.fc1(self.gap(h).flatten(1)))
        return self.fc2(v)


def test_synapse_kinds_follow_the_layouts():
    m = ConvThenDense()
    pre = fxlra.compile(m)
    s_map1, s_map2, s_vec, out = pre.sites
    assert [str(site(pre, s).layout) for s in pre.sites] == \
        ["spatial[4@1]", "spatial[6@1]", "vector[7]", "vector[5]"]
    wiring = {s_vec: out, s_map2: out, s_map1: [s_map2, s_vec]}
    x6 = torch.randn(2, 3, 6, 6)
    paper = fxlra.compile(m, wiring=wiring, map_synapse="broadcast")
    kinds = {(e.parent, e.child): e.synapse for e in paper.plan.edges}
    assert kinds == {(out, s_vec): "dense", (out, s_map2): "broadcast",
                     (s_map2, s_map1): "pointwise", (s_vec, s_map1): "broadcast"}
    shapes = {k: tuple(paper.synapse(*k).weight.shape) for k in kinds}
    assert shapes == {(out, s_vec): (7, 5), (out, s_map2): (6, 5), (s_map2, s_map1): (4, 6),
                      (s_vec, s_map1): (4, 7)}
    # the default: a vector error reaches a channels-first map through a synapse dense to the
    # whole map (6 x 6 here, the example batch's size)
    prog = fxlra.compile(m, wiring=wiring, example_inputs=(x6,))
    kinds = {(e.parent, e.child): e.synapse for e in prog.plan.edges}
    assert kinds == {(out, s_vec): "dense", (out, s_map2): "spatial",
                     (s_map2, s_map1): "pointwise", (s_vec, s_map1): "spatial"}
    shapes = {k: tuple(prog.synapse(*k).weight.shape) for k in kinds}
    assert shapes == {(out, s_vec): (7, 5), (out, s_map2): (6 * 36, 5), (s_map2, s_map1): (4, 6),
                      (s_vec, s_map1): (4 * 36, 7)}
    pooled = fxlra.compile(m, wiring={s_map1: out, s_map2: out, s_vec: s_map2})
    edge = pooled.plan.edge(s_map2, s_vec)
    assert edge.synapse == "pool" and (edge.in_features, edge.out_features) == (6, 7)
    assert tuple(pooled.synapse(s_map2, s_vec).weight.shape) == (7, 6)
    x, y = torch.randn(2, 3, 6, 6), torch.tensor([1, 4])
    for p in (prog, pooled):
        assert torch.isfinite(p.step(x, y).loss)


# -- shapes that cannot be inferred -----------------------------------------------------------------
class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(10, 4)

    def forward(self, x):
        return self.lin(x)


class LeafFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.a, self.c = Encoder(), nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.c(torch.tanh(self.a(torch.tanh(self.enc(x)))))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x, u):
        return self.c(torch.tanh(self.a(x) + self.b(u)))


@pytest.mark.parametrize("model, kw, example", [
    (LeafFirst, {"leaf_modules": [Encoder]}, (torch.zeros(2, 10),)),
    (TwoInputs, {}, (torch.zeros(2, 4), torch.zeros(2, 5))),
])
def test_shapes_that_cannot_be_inferred_ask_for_example_inputs(model, kw, example):
    m = model()
    with pytest.raises(fxlra.PlanError, match="example_inputs="):
        fxlra.compile(m, **kw)
    prog = fxlra.compile(m, example_inputs=example if len(example) > 1 else example[0], **kw)
    assert [str(site(prog, s).layout) for s in prog.sites][-1] == "vector[3]"
    assert {r.param for r in prog.plan.params} == {n for n, _ in m.named_parameters()}


# -- a module that uses its own parameter in several ops ---------------------------------------------
class WSConv(nn.Conv2d):
    """A weight-standardised convolution (NF-ResNets): its forward reads its weight in 4 ops."""

    def forward(self, x):
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return F.conv2d(x, (w - mean) / torch.sqrt(var + 1e-5), self.bias, self.stride,
                        self.padding)


class WSNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.fc = WSConv(1, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.c(x)).flatten(1))


def test_a_module_using_its_parameter_in_several_ops_is_one_op_with_its_local_vjp():
    torch.manual_seed(0)
    model = WSNet().double()
    x, y = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    prog = fxlra.compile(model, example_inputs=(x,))
    ops_ = [n for n in prog.graph_module.graph.nodes if n.op == "call_module"]
    assert [n.target for n in ops_][:1] == ["c"]                     # traced as one op
    rules = {r.param: r.rule for r in prog.plan.params}
    assert rules["c.weight"] == rules["c.bias"] == "local-vjp"      # not Conv2d's own rule
    assert "model.c.weight" in prog.explain() and "local VJP of the op" in prog.explain()
    updates, ref = assert_matches_reference(prog, x, y, "float64")
    # the update is the module's weight-gradient at its recorded input for the site's error
    sig = prog.reference_signals(x, y)
    w = model.c.weight.detach().requires_grad_()
    out = torch.func.functional_call(model.c, {"weight": w, "bias": model.c.bias}, (x,))
    (g,) = torch.autograd.grad(out, [w], sig.errors["relu"])
    torch.testing.assert_close(updates["model.c.weight"], g / x.shape[0])


class HandAttention(nn.Module):
    """Self-attention written by hand, as timm's Attention is: the qkv projection reshaped to
    (B, T, 3, heads, d) and permuted to (3, B, heads, T, d), whose batch axis is not first."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads, self.embed = heads, nn.Linear(4, dim)
        self.qkv, self.proj, self.head = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), \
            nn.Linear(dim, 3)

    def forward(self, x):
        h = self.embed(x)
        b, t, c = h.shape
        qkv = self.qkv(h).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        a = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1) @ v
        h = h + self.proj(a.transpose(1, 2).reshape(b, t, c))
        return self.head(torch.tanh(h).mean(1))


@pytest.mark.parametrize("scope", ["layer", "block"])
def test_no_site_sits_on_attentions_permuted_qkv(scope):
    """The fan-out of q, k, v put an identity site on the permuted (3, B, heads, T, d) tensor and
    its error synapse failed on the batch axis; the site now sits on the qkv projection's
    (B, T, 3C) output, every site's first axis is the batch, and the updates equal the
    reference interpreter's."""
    model, x, y = HandAttention(), torch.randn(2, 5, 4), torch.tensor([0, 1])
    prog = fxlra.compile(model, example_inputs=x, scope=scope)
    nodes = {n.name: n for n in prog.graph_module.graph.nodes}
    for s in prog.plan.sites:
        assert shapes.batch_first(nodes[s.name]) and shapes.shape_of(nodes[s.name])[0] == 2, s
    if scope == "layer":
        assert "qkv" in prog.sites and "permute" not in prog.sites
    assert_matches_reference(prog, x, y, "float32")


class NegativeIndex(nn.Module):
    """``parts[-1]`` of a chunk inside a residual block, as timm's SplitTransposeBlock takes its
    last split: with scope="block" the block's error is carried back through the chunk."""

    def __init__(self, last=-1):
        super().__init__()
        self.last, self.fc0, self.fc1 = last, nn.Linear(4, 6), nn.Linear(6, 6)
        self.fc2, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.fc0(x))
        parts = torch.tanh(self.fc1(h)).chunk(2, dim=1)
        h = h + self.fc2(torch.cat([parts[0], parts[self.last]], 1))
        return self.head(torch.tanh(h))


def test_a_negative_index_into_a_tuple_carries_its_error():
    """The generated program keyed the cotangent of parts[-1] by -1 and then looked for
    position 1, so that part's error was dropped (edgenext under scope="stage"); the updates
    equal the reference's and those of the same model written with parts[1]."""
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    negative, positive = NegativeIndex(), NegativeIndex(last=1)
    positive.load_state_dict(negative.state_dict())
    torch.manual_seed(1)
    prog = fxlra.compile(negative, example_inputs=x)
    torch.manual_seed(1)
    same = fxlra.compile(positive, example_inputs=x).updates(x, y)
    updates, _ = assert_matches_reference(prog, x, y, "float32")
    assert "chunk" in next(s for s in prog.plan.sites if "fc1" in s.ops).region
    assert_updates_match(updates, same, "float32")


class _MaskedResidual(nn.Module):
    """A boolean mask (x > 0.5) computed inside the first residual block's span."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.Softplus(), nn.Linear(4, 4))
        self.shortcut, self.out = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = x.masked_fill(x > 0.5, 0.0)
        return self.out(torch.tanh(self.body(h) + self.shortcut(h)))


@pytest.mark.parametrize("scope", ["block", "stage"])
def test_a_boolean_mask_inside_a_block_joins_no_region(scope):
    """A block's region takes its unowned inner values, but not a boolean or integer one: no
    error is carried into a mask (the step used to ask torch.func for the mask's VJP)."""
    torch.manual_seed(0)
    model = _MaskedResidual().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    prog = fxlra.compile(model, scope=scope, example_inputs=(x,))
    region = {n for s in prog.plan.sites for n in s.region}
    assert "masked_fill" in region and "gt" not in region
    assert_matches_reference(prog, x, torch.tensor([0, 1, 2, 0, 1]))


class _Swapped(nn.Module):
    """The input's halves swapped, by a reversed slice of chunk() or by hand, before a residual
    block: under scope="stage" the block's region takes the swap."""

    def __init__(self, sliced):
        super().__init__()
        self.sliced = sliced
        self.body = nn.Sequential(nn.Linear(4, 4), nn.Softplus(), nn.Linear(4, 4))
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        if self.sliced:
            h = torch.cat(x.chunk(2, -1)[::-1], -1)
        else:
            h = torch.cat([x[:, 2:], x[:, :2]], -1)
        return self.out(torch.tanh(self.body(h) + h))


def test_an_error_crosses_a_sliced_tuple_to_the_parts_it_took():
    """x.chunk(2, -1)[::-1] inside a block's region: the error of each part of the slice goes
    to the chunk it came from (the step used to fail building {slice: cotangent}), and the
    updates equal those of the same swap written by hand."""
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    progs = []
    for sliced in (True, False):
        torch.manual_seed(0)                       # the same weights and synapses for both
        progs.append(fxlra.compile(_Swapped(sliced).double(), example_inputs=(x,)))
    assert "getitem" in {n for s in progs[0].plan.sites for n in s.region}
    updates, _ = assert_matches_reference(progs[0], x, y)
    assert_updates_match(updates, progs[1].updates(x, y), "float64")
