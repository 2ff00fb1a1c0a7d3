"""scope="block" and "stage": the paper's hybrid (Section 3). The sites inside a residual block
(or a stage of blocks) join the block's output site, so that one error, at the block's output,
updates every parameter of the block by the local VJP of the whole block.
"""
import dataclasses

import networkx as nx

from .plan import Site

SCOPES = ("layer", "block", "stage")
# the most residual blocks one "stage" unit holds: ResNet-18's stages, one transformer layer
# (its attention and MLP blocks); deeper stages are split, so that no unit grows with depth
STAGE_BLOCKS = 2


def block_members(g, sites, blocks, outputs):
    """Inner site -> the block output it joins: every non-output site strictly between a
    block's input site (or the model input) and its output site, the earliest block first;
    a block output that lies inside a larger block joins that block's output in turn."""
    order = {s.name: k for k, s in enumerate(sites)}
    joined = {}
    for b in sorted(blocks, key=lambda b: order[b.output]):
        for name in _interior(g, b):
            if name in order and name not in outputs and name not in joined:
                joined[name] = b.output
    for name in joined:                       # nested blocks: follow to the outermost output
        while joined[name] in joined:
            joined[name] = joined[joined[name]]
    return joined


def _interior(g, block):
    """The nodes strictly between a block's input and its output (by name)."""
    above = nx.ancestors(g, block.output)
    if block.input is None:
        return above
    return (above & nx.descendants(g, block.input)) - {block.input}


def join_blocks(g, sites, rules, blocks, outputs, node_order, derived):
    """The paper's hybrid (Section 3): only block outputs (and the sites outside blocks) keep
    their error neurons; the sites inside a block join its output site's region, and so do the
    block's other inner nodes (pooling, shortcuts), so that the block's parameters are updated
    by the local VJP of the whole block, its activations crossed by their derivative.
    Returns (sites, rules, blocks)."""
    joined = block_members(g, sites, blocks, set(outputs))
    if not joined:
        return sites, rules, blocks
    by_name = {s.name: s for s in sites}
    taken = {n for s in sites if s.name not in joined for n in s.region}
    interior = {}                             # block output -> its unowned inner nodes
    for b in blocks:
        owner = joined.get(b.output, b.output)
        if owner in by_name and owner not in joined:
            interior.setdefault(owner, set()).update(
                n for n in _interior(g, b) if n in derived and n not in taken)
    kept = []
    for s in sites:
        if s.name in joined:
            continue
        members = [by_name[n] for n, owner in joined.items() if owner == s.name]
        if members:
            inside = interior.get(s.name, set()).union(*(m.region for m in members))
            region = sorted(set(s.region) | inside, key=node_order.get)
            ops_ = sorted(set(s.ops).union(*(m.ops for m in members)), key=node_order.get)
            crosses = tuple(sorted((m.name for m in members if m.kind == "activation"),
                                   key=node_order.get))
            s = Site(s.name, s.kind, s.h, s.activation, s.layout, tuple(region), tuple(ops_),
                     crosses)
        kept.append(s)
    rules = tuple(dataclasses.replace(r, site=joined.get(r.site, r.site)) for r in rules)
    blocks = tuple(b for b in blocks if b.output not in joined and b.input not in joined)
    return tuple(kept), rules, blocks
