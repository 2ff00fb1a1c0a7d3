"""Residual blocks: the adds where a skip path (reaching the block input with no site in
between) meets a path that has sites, found on the node graph with networkx."""
import operator

import networkx as nx
import torch

from .plan import Block

_ADDS = {operator.add, torch.add}
_ATEN_ADD = torch.ops.aten.add


def node_graph(nodes):
    g = nx.DiGraph()
    g.add_nodes_from(n.name for n in nodes)
    g.add_edges_from((a.name, n.name) for n in nodes for a in n.all_input_nodes)
    return g


def nearest(g, start, site_names, direction):
    """Sites reached first from ``start`` (itself excluded) going along ``direction``."""
    step = g.successors if direction == "down" else g.predecessors
    found, seen, frontier = set(), {start}, list(step(start))
    while frontier:
        n = frontier.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in site_names:
            found.add(n)
        else:
            frontier.extend(step(n))
    return found


def _upstream_sites(g, node, site_names):
    return {node} if node in site_names else nearest(g, node, site_names, "up")


def find_blocks(nodes, g, site_names, order, owner, op_params, from_input):
    """Residual merges: adds of two input-derived tensors where one operand is a skip path
    (it reaches the block input with no site in between) and the other is not."""
    blocks = []
    for node in nodes:
        is_add = (node.op == "call_function" and (
            node.target in _ADDS or getattr(node.target, "overloadpacket", None) is _ATEN_ADD)) or \
                 (node.op == "call_method" and node.target == "add")
        operands = [a for a in node.all_input_nodes if from_input.get(a)]
        if not is_add or len(operands) != 2:
            continue
        ancestors = [nx.ancestors(g, a.name) | {a.name} for a in operands]
        common = (ancestors[0] & ancestors[1]) & site_names
        block_input = max(common, key=order.get) if common else None
        expected = {block_input} if block_input else set()
        skip = [_upstream_sites(g, a.name, site_names) == expected for a in operands]
        if sum(skip) != 1:
            continue
        skip_nodes = (ancestors[skip.index(True)] - (nx.ancestors(g, block_input) | {block_input})
                      if block_input else ancestors[skip.index(True)])
        downsample = any(n.name in skip_nodes for n in op_params)
        out = owner.get(node)
        outs = {out.name} if out is not None else nearest(g, node.name, site_names, "down")
        blocks += [Block(o, block_input, downsample) for o in sorted(outs, key=order.get)]
    return tuple(blocks)
