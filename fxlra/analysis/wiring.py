"""Wiring: the error graph over sites (edges parent -> child, the child receives displacement
from the parent's error), from a preset or a user's graph, validated.

Presets: ``"direct"``, ``"pairwise"``, ``"residual"`` (``depth=2`` or ``3``), ``blocks(g)`` (the
paper's Algorithm 1) and ``skip(g)``. Custom: a ``networkx.DiGraph``, a mapping
``child -> parent(s)``, or a callable that receives the site names and returns edges.
"""
from collections.abc import Mapping

import networkx as nx

from ..errors import WiringError
from .plan import stages_of


class Preset:
    """A named wiring rule: ``build(site_graph, depth)`` returns the edges (parent, child)."""

    def __init__(self, name, build):
        self.name, self._build = name, build

    def __call__(self, graph, depth=2):
        return self._build(graph, depth)

    def __repr__(self):
        return f"fxlra.wiring.{self.name}"


def _inner(graph):
    """Non-output sites in forward order (the numbering 1..L-1 of the paper)."""
    return [s for s in graph.sites if s not in graph.outputs]


def _direct(graph, depth):
    root = graph.outputs[0]
    return [(root, s) for s in _inner(graph)]


def _pairwise(graph, depth):
    return [(p, s) for s in _inner(graph) for p in graph.downstream[s]]


def _stages(graph):
    """Block outputs grouped into stages: a stage starts at a block with a downsample shortcut."""
    stages, current = [], []
    ends = {b.output for b in stages_of(graph.blocks)}
    for block in graph.blocks:
        current.append(block.output)
        if block.output in ends:
            stages.append(current)
            current = []
    return stages


def _residual(graph, depth):
    if depth not in (2, 3):
        raise WiringError(f"wiring='residual' takes depth=2 or depth=3, got depth={depth}")
    root = graph.outputs[0]
    parent = {}
    stem = graph.blocks[0].input if graph.blocks else None
    if depth == 2:
        anchors = [b.output for b in graph.blocks]
    else:
        anchors = []
        for stage in _stages(graph):
            parent.update({b: stage[-1] for b in stage[:-1]})
            anchors.append(stage[-1])
    anchors += [stem] if stem is not None else []
    parent.update({a: root for a in anchors if a not in graph.outputs})
    edges = [(p, s) for s, p in parent.items()]
    members = graph.members if graph.members is not None else {s: None for s in graph.sites}
    for s in _inner(graph):
        if s in parent:
            continue
        if s in members:                      # inside a block: from the sites after it
            edges += [(p, s) for p in graph.downstream[s]]
        else:                                 # outside every block: from the output
            edges.append((root, s))
    return edges


def blocks(g):
    """The paper's Algorithm 1: number the non-output sites 1..L-1 in forward order; a site with
    l % g == 0 gets its error from the output, every other site from site l+1."""
    _check_gap(g, "blocks")

    def build(graph, depth):
        inner, root = _inner(graph), graph.outputs[0]
        return [((root if l % g == 0 or l == len(inner) else inner[l]), s)
                for l, s in enumerate(inner, start=1)]
    return Preset(f"blocks({g})", build)


def skip(g):
    """A site's parent is the site g positions downstream, or the output if fewer remain
    (``skip(1)`` is ``"pairwise"`` on a chain)."""
    _check_gap(g, "skip")

    def build(graph, depth):
        inner, root = _inner(graph), graph.outputs[0]
        return [((inner[l - 1 + g] if l - 1 + g < len(inner) else root), s)
                for l, s in enumerate(inner, start=1)]
    return Preset(f"skip({g})", build)


def _check_gap(g, name):
    if not isinstance(g, int) or isinstance(g, bool) or g < 1:
        raise WiringError(f"fxlra.wiring.{name}(g) takes a positive int gap, got {g!r}")


PRESETS = {"direct": Preset("direct", _direct), "pairwise": Preset("pairwise", _pairwise),
           "residual": Preset("residual", _residual)}


def _custom_edges(spec, graph):
    if isinstance(spec, nx.DiGraph):
        return list(spec.edges()), "custom"
    if isinstance(spec, Mapping):
        edges = []
        for child, parents in spec.items():
            parents = [parents] if isinstance(parents, str) else list(parents)
            edges += [(p, child) for p in parents]
        return edges, "custom"
    if callable(spec):
        result = spec(graph.sites)
        if isinstance(result, (nx.DiGraph, Mapping)):
            return _custom_edges(result, graph)
        return [tuple(e) for e in result], "custom"
    raise WiringError(f"wiring= takes one of {sorted(PRESETS)}, fxlra.wiring.blocks(g), "
                      f"fxlra.wiring.skip(g), a networkx.DiGraph, a mapping child -> parent(s) "
                      f"or a callable; got {spec!r}")


def build(spec, graph, depth=2):
    """The validated error graph (a networkx.DiGraph over all sites) and its name."""
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise WiringError(f"unknown wiring preset {spec!r}; choose one of {sorted(PRESETS)}, "
                              "fxlra.wiring.blocks(g), fxlra.wiring.skip(g) or a custom graph")
        spec = PRESETS[spec]
    if isinstance(spec, Preset):
        edges, name = spec(graph, depth), spec.name
    else:
        edges, name = _custom_edges(spec, graph)
    g = nx.DiGraph()
    g.add_nodes_from(graph.sites)
    validate(edges, graph)
    g.add_edges_from(edges)
    return g, name


def validate(edges, graph):
    """Reject graphs with unknown sites, edges into outputs, cycles or sites without a parent."""
    known = set(graph.sites)
    for edge in edges:
        if len(edge) != 2:
            raise WiringError(f"an error-graph edge must be (parent, child), got {edge!r}")
    unknown = sorted({n for e in edges for n in e if n not in known})
    if unknown:
        raise WiringError(f"the error graph names unknown sites {unknown}; the sites are "
                          f"{list(graph.sites)}")
    loops = sorted({p for p, c in edges if p == c})
    if loops:
        raise WiringError(f"the error graph has self-loops at {loops}")
    into_outputs = sorted({f"{p} -> {c}" for p, c in edges if c in graph.outputs})
    if into_outputs:
        raise WiringError(f"output sites take their error from the labels, not from other sites; "
                          f"remove {into_outputs}")
    g = nx.DiGraph(list(edges))
    try:
        cycle = nx.find_cycle(g)
    except nx.NetworkXNoCycle:
        cycle = None
    if cycle:
        raise WiringError("the error graph has a cycle through sites "
                          f"{[p for p, _ in cycle]}; it must be acyclic")
    orphans = [s for s in graph.sites if s not in graph.outputs and not any(c == s for _, c in edges)]
    if orphans:
        raise WiringError(f"sites {orphans} get no error: give each a parent (every site other "
                          f"than the outputs needs one)")
