"""The contract's equations (docs/design.md section 1), re-derived by hand for chains of Linear
layers.

This file holds a small, independent implementation of rec-LRA (the paper's Algorithm 2) for
MLPs ``nn.Sequential(Linear, act, Linear, act, ..., Linear)``: forward, output error, targets,
error neurons (with alpha/kappa looked up by error-graph depth), forward updates (hebbian and dx)
and error-synapse updates (hebbian-z, hebbian-d, derived). It uses fxlra only to compile the
model and to read what fxlra computes (``sites``, ``wiring``, ``synapse``, ``updates``, ``step``);
every update is compared in float64 with rtol=1e-10, atol=1e-12.

Hidden site ``k`` (1-based, forward order) owns the ``k``-th Linear; the output site owns the last.
"""
import math

import networkx as nx
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fxlra

RTOL, ATOL = 1e-10, 1e-12  # float64, same arithmetic up to summation order


# -- activations: phi and phi' written out by hand ------------------------------------------------
class Sign(nn.Module):
    """torch.sign as a module (phi' = 0 everywhere it is defined)."""

    def forward(self, x):
        return torch.sign(x)


ACTIVATIONS = {
    # name: (module factory, phi, phi')
    "tanh": (nn.Tanh, torch.tanh, lambda h: 1 - torch.tanh(h) ** 2),
    "relu": (nn.ReLU, lambda h: h.clamp_min(0), lambda h: (h > 0).to(h.dtype)),
    "sigmoid": (nn.Sigmoid, lambda h: 1 / (1 + torch.exp(-h)),
                lambda h: torch.exp(-h) / (1 + torch.exp(-h)) ** 2),
    "sign": (Sign, torch.sign, torch.zeros_like),
}


# -- the error graph of a chain, written from the contract's definitions -------------------------
def chain_wiring(spec, n):
    """Edges parent -> child over site indices 1..n (hidden) and n+1 (output)."""
    L = n + 1
    kind, g = spec if isinstance(spec, tuple) else (spec, None)
    if kind == "direct":
        return {(L, k) for k in range(1, n + 1)}
    if kind == "pairwise":
        return {(k + 1, k) for k in range(1, n + 1)}
    if kind == "blocks":                     # Algorithm 1: l % g == 0 -> from L, else from l + 1
        return {(L if k % g == 0 else k + 1, k) for k in range(1, n + 1)}
    if kind == "skip":                       # g positions downstream, or L if fewer remain
        return {(min(k + g, L), k) for k in range(1, n + 1)}
    if kind == "multi":                      # custom: site 1 from 2 and L, site 2 from 3 and L, ...
        return {(k + 1, k) for k in range(1, n + 1)} | {(L, k) for k in range(1, n)}
    raise AssertionError(spec)


def fxlra_wiring(spec, sites):
    """The ``wiring=`` argument that asks fxlra for ``spec`` (custom ones spelled by site name)."""
    kind, g = spec if isinstance(spec, tuple) else (spec, None)
    if kind == "blocks":
        return fxlra.wiring.blocks(g)
    if kind == "skip":
        return fxlra.wiring.skip(g)
    if kind == "multi":
        n = len(sites) - 1
        parents = {}
        for parent, child in chain_wiring(spec, n):
            parents.setdefault(sites[child - 1], []).append(sites[parent - 1])
        return parents
    return kind


def lookup(value, depth):
    """alpha/kappa: a float, or depth -> value with the largest key's value beyond it."""
    if not isinstance(value, dict):
        return value
    return value[min(depth, max(value))]


# -- rec-LRA for an MLP, by hand ------------------------------------------------------------------
def reference_updates(Ws, bs, E, edges, x, y, *, act, loss, beta, gamma, alpha, kappa,
                      error_rule, local_rule):
    """Raw updates for an MLP with hidden sites 1..n and output site n+1.

    Ws[l], bs[l] (l = 1..n+1) are the Linear weights; E[(j, i)] is E_{j->i} of shape
    (|z_i|, |e_j|). Returns (dW, db, dE, e) keyed by layer / edge / site index.
    """
    _, phi, dphi = ACTIVATIONS[act]
    n = len(Ws) - 1
    L = n + 1
    B = x.shape[0]

    # forward: h_l = W_l z_{l-1} + b_l, z_l = phi(h_l); the output is the logits v = h_L
    z, h = {0: x}, {}
    for l in range(1, L + 1):
        h[l] = z[l - 1] @ Ws[l].T + bs[l]
        z[l] = phi(h[l]) if l < L else h[l]

    # output error
    if loss == "cross_entropy":
        e = {L: torch.softmax(z[L], dim=1) - F.one_hot(y, z[L].shape[1]).to(x.dtype)}
    else:
        e = {L: z[L] - y}

    # targets and error neurons, parents first
    G = nx.DiGraph(list(edges))
    depth = nx.shortest_path_length(G, L)
    d, shifted = {}, {}
    for i in nx.topological_sort(G):
        if i == L:
            continue
        d[i] = sum(e[j] @ E[(j, i)].T for j in G.predecessors(i))
        shifted[i] = h[i] - beta * d[i]
        target = phi(shifted[i])
        a, k = lookup(alpha, depth[i]), lookup(kappa, depth[i])
        diff = z[i] - target
        e[i] = k * (a * diff + (1 - a) * torch.sign(diff))

    # forward updates: the owner's error (times phi'(h) for dx, except at the output)
    dW, db = {}, {}
    for l in range(1, L + 1):
        c = e[l] * dphi(h[l]) if (local_rule == "dx" and l < L) else e[l]
        dW[l] = c.T @ z[l - 1] / B
        db[l] = c.mean(0)

    # error-synapse updates, dE has E's shape (|z_i|, |e_j|)
    dE = {}
    for j, i in G.edges():
        if error_rule == "hebbian-d":
            c = -gamma * d[i]
        elif error_rule == "hebbian-z":
            c = gamma * z[i]
        else:  # derived
            c = -gamma * e[i] * dphi(shifted[i])
        dE[(j, i)] = c.T @ e[j] / B
    return dW, db, dE, e


# -- the covering set of cases --------------------------------------------------------------------
A2 = {1: 0.19, 2: 0.24}
CASES = [
    # act,      wiring,         error_rule,  alpha, kappa,          local,     loss,   widths
    ("tanh",    "pairwise",     "hebbian-z", 1.0,   1.0,            "hebbian", "cross_entropy", (7, 9, 8, 10)),
    ("tanh",    ("blocks", 2),  "hebbian-d", A2,    0.5,            "dx",      "mse",  (6, 8, 12, 7)),
    ("tanh",    ("skip", 2),    "derived",   A2,    1.0,            "dx",      "cross_entropy", (8, 6, 9, 11, 7)),
    ("relu",    "direct",       "hebbian-z", A2,    0.5,            "dx",      "cross_entropy", (9, 10, 8)),
    ("relu",    ("blocks", 3),  "derived",   1.0,   0.5,            "hebbian", "mse",  (10, 12, 9, 11, 8)),
    ("relu",    "pairwise",     "hebbian-d", A2,    {1: 1.0, 2: 0.5}, "hebbian", "cross_entropy", (12, 11, 10, 9)),
    ("sigmoid", ("skip", 2),    "hebbian-d", 1.0,   0.5,            "hebbian", "cross_entropy", (6, 7, 8, 9)),
    ("sigmoid", "direct",       "derived",   A2,    1.0,            "hebbian", "mse",  (11, 9, 7)),
    ("sigmoid", ("blocks", 3),  "hebbian-z", A2,    0.5,            "dx",      "cross_entropy", (9, 8, 10, 6, 12)),
    ("sign",    "pairwise",     "derived",   A2,    0.5,            "hebbian", "cross_entropy", (10, 11, 12, 9)),
    ("sign",    ("blocks", 2),  "hebbian-z", 1.0,   1.0,            "dx",      "mse",  (8, 9, 10, 11)),
    ("sign",    "direct",       "hebbian-d", A2,    1.0,            "hebbian", "cross_entropy", (12, 10, 8)),
    ("tanh",    "multi",        "derived",   A2,    0.5,            "hebbian", "mse",  (8, 9, 7, 10)),
    ("relu",    "multi",        "hebbian-z", 1.0,   1.0,            "dx",      "cross_entropy", (11, 7, 9, 8)),
    ("sigmoid", "pairwise",     "hebbian-d", A2,    1.0,            "hebbian", "mse",  (7, 6, 9, 8, 10)),
]


def _case_id(case):
    act, wiring, rule, alpha, kappa, local, loss, widths = case
    w = wiring if isinstance(wiring, str) else f"{wiring[0]}{wiring[1]}"
    a = "a1" if alpha == 1.0 else "a-dict"
    k = f"k{kappa}" if not isinstance(kappa, dict) else "k-dict"
    return f"{act}-{w}-{rule}-{a}-{k}-{local}-{'ce' if loss == 'cross_entropy' else 'mse'}"


def make_mlp(act, n_in, widths, n_out):
    layers, prev = [], n_in
    for w in widths:
        layers += [nn.Linear(prev, w), ACTIVATIONS[act][0]()]
        prev = w
    layers.append(nn.Linear(prev, n_out))
    return nn.Sequential(*layers).double()


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_updates_match_hand_derived_equations(case):
    act, wiring, error_rule, alpha, kappa, local_rule, loss, widths = case
    seed = sum(map(ord, _case_id(case)))
    torch.manual_seed(seed)
    n_in, n_out, B = 5, 4, 5 + seed % 3
    n = len(widths)
    L = n + 1
    model = make_mlp(act, n_in, widths, n_out)
    # sign needs large displacements to flip any unit; the others see moderate ones
    beta = 1.0 if act == "sign" else 0.3
    gamma = 0.7
    std = 1.0 if act == "sign" else 0.4

    sites = fxlra.compile(model, wiring="direct").sites
    prog = fxlra.compile(model, wiring=fxlra_wiring(wiring, sites), loss=loss, beta=beta,
                         gamma=gamma, alpha=alpha, kappa=kappa, error_rule=error_rule,
                         local_rule=local_rule, clip=None, error_init_std=std)

    # the sites and the error graph are the ones the contract defines for this chain
    assert len(prog.sites) == L
    edges = chain_wiring(wiring, n)
    named = {(prog.sites[j - 1], prog.sites[i - 1]) for j, i in edges}
    assert set(prog.wiring.edges()) == named

    x = torch.randn(B, n_in, dtype=torch.float64) * 2
    if loss == "cross_entropy":
        y = torch.randint(0, n_out, (B,))
    else:
        y = torch.randn(B, n_out, dtype=torch.float64)

    linears = [m for m in model if isinstance(m, nn.Linear)]
    Ws = {l: m.weight.detach() for l, m in enumerate(linears, 1)}
    bs = {l: m.bias.detach() for l, m in enumerate(linears, 1)}
    E = {(j, i): prog.synapse(prog.sites[j - 1], prog.sites[i - 1]).weight.detach()
         for j, i in edges}
    for (j, i), w in E.items():
        assert w.shape == (widths[i - 1], n_out if j == L else widths[j - 1])
        assert w.dtype == torch.float64

    dW, db, dE, e = reference_updates(
        Ws, bs, E, edges, x, y, act=act, loss=loss, beta=beta, gamma=gamma, alpha=alpha,
        kappa=kappa, error_rule=error_rule, local_rule=local_rule)

    got = prog.updates(x, y)
    names = {id(p): name for name, p in prog.named_parameters()}
    expected = {}
    for l, m in enumerate(linears, 1):
        expected[names[id(m.weight)]] = dW[l]
        expected[names[id(m.bias)]] = db[l]
    for (j, i), w in E.items():
        expected[names[id(prog.synapse(prog.sites[j - 1], prog.sites[i - 1]).weight)]] = dE[(j, i)]

    assert set(got) == set(expected), "every parameter gets exactly one update"
    for name, want in expected.items():
        assert torch.isfinite(got[name]).all(), name
        torch.testing.assert_close(got[name], want, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")

    # the comparison is not vacuous: some update below the output is clearly non-zero
    inner = [dW[l] for l in range(1, L)] + list(dE.values())
    assert max(t.abs().max().item() for t in inner) > 1e-4

    # derived rule through sign: phi' = 0, so every synapse update is exactly zero (and finite)
    if act == "sign" and error_rule == "derived":
        for (j, i) in edges:
            w = prog.synapse(prog.sites[j - 1], prog.sites[i - 1]).weight
            assert torch.equal(got[names[id(w)]], torch.zeros_like(w))

    # discrepancies are the batch mean of ||e_i||^2 at every site
    out = prog.step(x, y)
    for k, site in enumerate(prog.sites, 1):
        want = (e[k] ** 2).sum(1).mean()
        torch.testing.assert_close(out.discrepancies[site].to(torch.float64), want,
                                   rtol=RTOL, atol=ATOL, msg=lambda m: f"site {site}: {m}")


def test_alpha_lookup_beyond_largest_depth():
    """The test's own lookup rule, so a mistake in it cannot hide a mismatch."""
    assert lookup(A2, 1) == 0.19 and lookup(A2, 2) == 0.24 and lookup(A2, 5) == 0.24
    assert lookup(0.3, 7) == 0.3
    assert math.isclose(lookup({1: 1.0, 2: 0.5}, 4), 0.5)
