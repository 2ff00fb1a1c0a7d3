"""Property-based tests (hypothesis) over random small models and random error graphs.

The models are the trainable family of the shared zoo, ``strategies.model_specs``: float64
Linear or Conv2d stems, 1-4 random layers (Linear with or without activation, Conv2d [+
BatchNorm2d] + activation, pooling, residual blocks with an identity or projection shortcut),
Flatten or AdaptiveAvgPool2d and a final Linear, on (3, 6) vectors or (3, 2, 8, 8) images.

Wirings are the presets ("direct", "pairwise", "residual", blocks(g), skip(g) for g = 1..3) and
random DAGs over ``prog.sites``: every non-output site draws one or more parents among the sites
after it in forward order (always acyclic and valid), given as a mapping child -> [parents].

Properties (docs/design.md section 1):
- compile succeeds, ``Plan.verify()`` passes, every model parameter has exactly one rule, every
  non-output site has a parent and depth >= 1, the output site is last; the presets give the
  parents their definitions say; a custom DAG is the error graph exactly;
- ``prog.updates`` gives a finite update, shaped like the parameter, for every named parameter
  (model and synapses), with no autograd graph attached, equal to what the reference
  interpreter computes (``prog.reference_updates``);
- the output site's update of the last Linear is autograd's gradient of the mean cross-entropy;
- beta=0 makes every inner discrepancy and every inner-owned model update exactly zero;
- two compiles of the same model give equal plans (also without ``example_inputs`` where fxlra
  can probe the input shape itself); ``prog(x)`` is the model's forward;
- invalid wirings (a cycle, an edge into the output, a site without parent, an unknown site)
  raise ``fxlra.WiringError`` naming the offending site.
"""
import copy

import networkx as nx
import pytest
import torch
from hypothesis import assume, example, given, note, settings, strategies as st
from torch import nn
from torch.nn import functional as F

import fxlra
from helpers import assert_updates_match, close
from strategies import (DTYPE, PRESETS, SETTINGS, build_random_net as build, model_specs,
                        preset, random_dags)


def compile_(model, x, wiring, **kw):
    return fxlra.compile(model, wiring=wiring, example_inputs=x, **kw)


def inner_sites(prog):
    return [s for s in prog.sites if s not in prog.plan.outputs]


# -- shared checks --------------------------------------------------------------------------------
def check_plan(prog, model):
    plan = prog.plan
    assert plan.verify() is plan
    assert prog.sites == plan.site_names
    assert prog.sites[-1] == plan.outputs[0]
    assert len(plan.outputs) == 1 and len(set(prog.sites)) == len(prog.sites)
    # every model parameter: exactly one rule, at a known site, using an op of that site
    names = [r.param for r in plan.params]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert len(set(names)) == len(names)
    for r in plan.params:
        assert r.op in plan.site(r.site).ops, r
    # every non-output site has a parent and depth >= 1; the output takes none
    depth = plan.depth
    g = prog.wiring
    assert set(g.nodes) == set(prog.sites)
    assert nx.is_directed_acyclic_graph(g)
    assert g.in_degree(prog.sites[-1]) == 0 and depth[prog.sites[-1]] == 0
    for s in inner_sites(prog):
        assert g.in_degree(s) >= 1, s
        assert set(plan.parents(s)) == set(g.predecessors(s))
        assert depth[s] is not None and depth[s] >= 1, (s, depth[s])
    # one synapse per edge
    assert {(e.parent, e.child) for e in plan.edges} == set(g.edges)
    for e in plan.edges:
        assert prog.synapse(e.parent, e.child) is not None
    # the last Linear belongs to the output site
    rule = {r.param: r for r in plan.params}
    assert rule["classifier.weight"].site == prog.sites[-1]
    assert rule["classifier.weight"].rule == "linear"


def check_preset_parents(prog, p):
    """direct, blocks(g) and skip(g) are defined on the forward numbering of the sites."""
    inner, root = inner_sites(prog), prog.sites[-1]
    if p == "direct":
        expected = {s: root for s in inner}
    elif isinstance(p, tuple) and p[0] == "blocks":
        g = p[1]
        expected = {s: root if l % g == 0 or l == len(inner) else inner[l]
                    for l, s in enumerate(inner, start=1)}
    elif isinstance(p, tuple) and p[0] == "skip":
        g = p[1]
        expected = {s: inner[l - 1 + g] if l - 1 + g < len(inner) else root
                    for l, s in enumerate(inner, start=1)}
    else:
        return
    for s in inner:
        assert prog.plan.parents(s) == (expected[s],), (s, prog.plan.parents(s), expected[s])


def check_updates(prog, x, y):
    updates = prog.updates(x, y)
    params = dict(prog.named_parameters())
    assert set(updates) == set(params), set(updates) ^ set(params)
    for name, p in params.items():
        u = updates[name]
        assert u.shape == p.shape, (name, u.shape, p.shape)
        assert u.dtype == p.dtype, name
        assert torch.isfinite(u).all(), name
        assert u.grad_fn is None and not u.requires_grad, name
    return updates


def check_equals_reference(prog, x, y, updates):
    """The generated program computes what the reference interpreter (the specification) does."""
    expected = prog.reference_updates(x, y)
    assert_updates_match(updates, expected, "float64")
    # and prog.step leaves the re-projected reference updates in .grad
    clip = prog.options["clip"]
    for p in prog.parameters():
        p.grad = None
    prog.step(x, y)
    for name, p in prog.named_parameters():
        norm = expected[name].norm().item()
        scale = min(1.0, clip / norm) if norm > 0 else 1.0
        close(p.grad, expected[name] * scale, "float64", name)


# -- properties -----------------------------------------------------------------------------------
options = st.fixed_dictionaries({
    "beta": st.sampled_from([0.05, 0.1, 0.5, 1.0]),
    "alpha": st.sampled_from([1.0, 0.5, {1: 0.19, 2: 0.24}]),
    "kappa": st.sampled_from([1.0, 0.5]),
    "error_rule": st.sampled_from(["hebbian-z", "hebbian-d", "derived", "bootstrap"]),
    "local_rule": st.sampled_from(["hebbian", "dx"]),
    "scope": st.sampled_from(["layer", "block", "stage"]),
    "norm_error": st.sampled_from(["vjp", "pass"]),
    "map_synapse": st.sampled_from(["spatial", "broadcast"]),
})


# hand-written models that have every layer kind at once (random draws are mostly small)
RICH_SPECS = [
    {"stem": ("image", 4, ("relu", "module")), "classes": 3, "seed": 1, "layers": (
        ("conv", 6, True, ("gelu", "function")), ("pool", "max"),
        ("conv_res", 6, True, ("relu_inplace", "module"), False, ("relu", "function")),
        ("conv_res", 3, False, ("sign", "function"), True, None), ("pool", "avg"),
        ("head", "gap"), ("linear", 5, None))},
    {"stem": ("vector", 5, None), "classes": 4, "seed": 2, "layers": (
        ("linear", 5, ("tanh", "module")),
        ("linear_res", 5, ("elu", "function"), False, ("leaky_relu", "module")),
        ("linear", 4, None), ("linear_res", 6, ("sigmoid", "module"), True, None))},
    {"stem": ("image", 3, None), "classes": 2, "seed": 3, "layers": (
        ("conv_res", 3, False, ("leaky_relu", "function"), False, None), ("pool", "avg"),
        ("head", "flatten"), ("linear", 4, ("sign", "function")))},
]
DEFAULT_OPTIONS = dict(beta=0.1, alpha=1.0, kappa=1.0, error_rule="hebbian-z",
                       local_rule="hebbian", scope="block", norm_error="vjp",
                       map_synapse="spatial")
PAPER_OPTIONS = dict(DEFAULT_OPTIONS, scope="layer", norm_error="pass", map_synapse="broadcast")


@settings(max_examples=40, **SETTINGS)
@given(spec=model_specs(), wiring=st.sampled_from(PRESETS), opts=options)
@example(spec=RICH_SPECS[0], wiring="residual", opts=DEFAULT_OPTIONS)
@example(spec=RICH_SPECS[0], wiring=("blocks", 2), opts=dict(DEFAULT_OPTIONS, local_rule="dx"))
@example(spec=RICH_SPECS[1], wiring="residual", opts=dict(DEFAULT_OPTIONS, alpha=0.5))
@example(spec=RICH_SPECS[1], wiring="pairwise", opts=dict(DEFAULT_OPTIONS, error_rule="hebbian-d"))
@example(spec=RICH_SPECS[2], wiring=("skip", 2), opts=DEFAULT_OPTIONS)
@example(spec=RICH_SPECS[0], wiring="residual", opts=PAPER_OPTIONS)
@example(spec=RICH_SPECS[0], wiring="residual", opts=dict(DEFAULT_OPTIONS, scope="stage"))
@example(spec=RICH_SPECS[0], wiring="residual", opts=dict(DEFAULT_OPTIONS, error_rule="bootstrap"))
@example(spec=RICH_SPECS[1], wiring="pairwise", opts=dict(PAPER_OPTIONS, error_rule="bootstrap"))
def test_presets_compile_verify_and_update(spec, wiring, opts):
    model, x, y = build(spec)
    reference = copy.deepcopy(model)            # before any forward through fxlra
    prog = compile_(model, x, preset(wiring), **opts)
    note(str(prog.plan))
    check_plan(prog, model)
    check_preset_parents(prog, wiring)
    updates = check_updates(prog, x, y)
    check_equals_reference(prog, x, y, updates)

    # the output site's update of the last Linear is backprop's gradient of the mean CE
    logits = reference(x)
    loss = F.cross_entropy(logits, y)
    gw, gb = torch.autograd.grad(loss, [reference.classifier.weight, reference.classifier.bias])
    close(updates["model.classifier.weight"], gw, "float64_autograd", "classifier.weight")
    close(updates["model.classifier.bias"], gb, "float64_autograd", "classifier.bias")


@settings(max_examples=30, **SETTINGS)
@given(spec=model_specs(), data=st.data())
def test_random_dag_wiring(spec, data):
    model, x, y = build(spec)
    sites = compile_(model, x, "direct").sites
    dag = data.draw(random_dags(sites, (sites[-1],)), label="wiring")
    prog = compile_(model, x, dag)
    assert prog.sites == sites
    assert set(prog.wiring.edges) == {(p, c) for c, ps in dag.items() for p in ps}
    assert prog.plan.wiring == "custom"
    check_plan(prog, model)
    check_equals_reference(prog, x, y, check_updates(prog, x, y))


@settings(max_examples=30, **SETTINGS)
@given(spec=model_specs(), wiring=st.sampled_from(PRESETS + ["dag"]), opts=options,
       data=st.data())
def test_beta_zero_gives_zero_inner_errors_and_updates(spec, wiring, opts, data):
    model, x, y = build(spec)
    if wiring == "dag":
        sites = compile_(model, x, "direct").sites
        wiring = data.draw(random_dags(sites, (sites[-1],)), label="wiring")
    else:
        wiring = preset(wiring)
    opts = dict(opts, beta=0.0)
    prog = compile_(model, x, wiring, error_init_std=1.0, clip=None, **opts)
    output = prog.sites[-1]
    out = prog.step(x, y)
    assert set(out.discrepancies) == set(prog.sites)
    for s in inner_sites(prog):
        assert out.discrepancies[s].item() == 0.0, s
    assert out.discrepancies[output].item() > 0.0

    updates = prog.updates(x, y)
    owner = {r.param: r.site for r in prog.plan.params}
    for name, site in owner.items():
        if site not in prog.plan.outputs:
            u = updates[f"model.{name}"]
            assert torch.equal(u, torch.zeros_like(u)), (name, site, u.abs().max().item())


def _probe_friendly(spec):
    """fxlra can infer the input shape itself (no example_inputs) for vector inputs and for
    image models whose head does not flatten a fixed spatial size."""
    return spec["stem"][0] == "vector" or ("head", "flatten") not in spec["layers"]


@settings(max_examples=30, **SETTINGS)
@given(spec=model_specs(), wiring=st.sampled_from(PRESETS))
def test_two_compiles_give_equal_plans_and_forward_is_the_model(spec, wiring):
    model, x, y = build(spec)
    first = compile_(model, x, preset(wiring))
    second = compile_(model, x, preset(wiring))
    assert first.plan == second.plan
    assert str(first.plan) == str(second.plan)
    assert first.sites == second.sites
    assert set(first.wiring.edges) == set(second.wiring.edges)
    # a second instance of the same architecture (other weights) gives the same plan
    other, _, _ = build(dict(spec, seed=spec["seed"] + 7))
    assert compile_(other, x, preset(wiring)).plan == first.plan
    if _probe_friendly(spec):                  # fxlra's own shape probe finds the same plan
        assert fxlra.compile(model, wiring=preset(wiring)).plan == first.plan

    # prog(x) is the model's forward (train mode: BatchNorm uses batch statistics, so the
    # running-statistics updates of both calls do not change the outputs)
    with torch.no_grad():
        expected = copy.deepcopy(model)(x)
        got = first(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# -- invalid wirings ------------------------------------------------------------------------------
def _raises_wiring_error(model, x, wiring):
    with pytest.raises(fxlra.WiringError) as info:
        compile_(model, x, wiring)
    return str(info.value)


@settings(max_examples=25, **SETTINGS)
@given(spec=model_specs(), data=st.data())
def test_invalid_wirings_are_rejected(spec, data):
    model, x, _ = build(spec)
    sites = compile_(model, x, "direct").sites
    inner, root = list(sites[:-1]), sites[-1]
    assume(len(inner) >= 1)
    dag = data.draw(random_dags(sites, (root,)), label="valid dag")

    # an unknown site name, as a parent and as a child
    child = data.draw(st.sampled_from(inner), label="child")
    bad = {c: list(ps) for c, ps in dag.items()}
    bad[child] = bad[child] + ["no_such_site"]
    assert "'no_such_site'" in _raises_wiring_error(model, x, bad)
    bad = dict(dag, no_such_site=[root])
    assert "'no_such_site'" in _raises_wiring_error(model, x, bad)

    # an edge into the output
    source = data.draw(st.sampled_from(inner), label="source of the edge into the output")
    bad = dict(dag, **{root: [source]})
    assert f"{source} -> {root}" in _raises_wiring_error(model, x, bad)

    # a non-output site left without parent
    orphan = data.draw(st.sampled_from(inner), label="orphan")
    bad = {c: ps for c, ps in dag.items() if c != orphan}
    assert repr(orphan) in _raises_wiring_error(model, x, bad)
    bad = dict(dag, **{orphan: []})
    assert repr(orphan) in _raises_wiring_error(model, x, bad)

    # a self-loop
    bad = {c: list(ps) for c, ps in dag.items()}
    bad[child] = bad[child] + [child]
    assert repr(child) in _raises_wiring_error(model, x, bad)

    if len(inner) >= 3:
        # one edge reversed to close a cycle: sites a < m < b (forward order) with edges
        # b -> m -> a and b -> a; reversing b -> a gives a -> b -> m -> a
        a, m, b = sorted(data.draw(st.lists(st.sampled_from(inner), min_size=3, max_size=3,
                                            unique=True), label="cycle"), key=sites.index)
        bad = {c: list(ps) for c, ps in dag.items()}
        bad[m] = sorted(set(bad[m]) | {b}, key=sites.index)
        bad[a] = sorted((set(bad[a]) | {m}) - {b}, key=sites.index)
        bad[b] = sorted(set(bad[b]) | {a}, key=sites.index)
        assert not nx.is_directed_acyclic_graph(
            nx.DiGraph([(p, c) for c, ps in bad.items() for p in ps]))
        message = _raises_wiring_error(model, x, bad)
        assert any(repr(s) in message for s in (a, m, b)), message
    elif len(inner) == 2:
        # two sites feeding each other
        a, b = inner
        bad = dict(dag, **{a: [b], b: [a, root]})
        message = _raises_wiring_error(model, x, bad)
        assert repr(a) in message or repr(b) in message, message


# -- regressions found by the properties above ----------------------------------------------------
@pytest.mark.parametrize("width", [4, 3])
def test_derived_error_rule_at_an_identity_site_uses_phi_prime_one(width):
    """error_rule="derived" at an identity site (Linear -> Linear, phi = identity) must use
    phi' = 1: dE = -gamma * (e_i)^T e_L / B. Found by test_presets_compile_verify_and_update:
    the generated program differentiated the site's own op (the Linear) as if it were phi,
    which is silently wrong when the Linear is square and crashes when it is not (the same
    happens with a Conv2d stem without activation)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, width), nn.Linear(width, 3)).to(DTYPE)
    x, y = torch.randn(5, 4, dtype=DTYPE), torch.tensor([0, 1, 2, 0, 1])
    beta, gamma = 0.5, 1.0
    prog = fxlra.compile(model, wiring="direct", error_rule="derived", beta=beta, gamma=gamma)
    site, root = prog.sites
    assert prog.plan.site(site).kind == "identity"
    updates = prog.updates(x, y)
    E = prog.synapse(root, site).weight.detach()
    with torch.no_grad():
        z = model[0](x)
        e_L = torch.softmax(model[1](z), 1) - F.one_hot(y, 3).to(DTYPE)
        d = e_L @ E.t()
        e = z - (z - beta * d)                          # y_i = phi(h - beta d), phi = identity
        expected = -gamma * (e.t() @ e_L) / x.shape[0]   # times phi' = 1
    got = updates[f"synapses.{root}__to__{site}.weight"]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
