"""Analysis: find the error sites of a traced model, the region and owner of every op, the
layout of every site, and the residual blocks (fxlra.analysis.blocks).

Sites are found by a sweep in forward order that tracks, for every node, the parametrised ops
whose error is still unresolved there ("pending"). An activation whose input has pending ops
is a site; an identity site is added where pending ops would otherwise reach a feature-mixing
op, fan out to several users, or reach an output. The sweep repeats until no site is added.
"""
from dataclasses import dataclass

import torch
from torch import fx

from . import params, scope as scopes
from .blocks import find_blocks, nearest, node_graph
from ..frontend import export, passes, shapes
from ..ops import registry
from ..errors import PlanError
from .plan import Layout, ParamRule, Site, stages_of


@dataclass(frozen=True)
class SiteGraph:
    """What the wiring presets need: sites in forward order, nearest downstream sites, blocks."""
    sites: tuple
    outputs: tuple
    downstream: dict
    blocks: tuple
    members: dict = None     # inner site -> the output site of the residual block it lies in


def input_derived(nodes):
    """Nodes whose value depends on the model's input (only those can hold error neurons); a
    tensor made by an op that ignores its input's values (a random mask) does not."""
    found = {}
    for n in nodes:
        found[n] = n.op == "placeholder" or (not registry.ignores_input_values(n) and
                                             any(found[a] for a in n.all_input_nodes))
    return found


def _carries_no_error(node):
    """An integer or boolean tensor, or an op whose value ignores its input's values: no error
    is carried into it."""
    meta = shapes.tensor_meta(node)
    return registry.ignores_input_values(node) or \
        (meta is not None and not (meta.dtype.is_floating_point or meta.dtype.is_complex))


# -- sites ----------------------------------------------------------------------------------------
def _is_tuple_builder(node):
    """A call that only packs tensors into a (named) tuple, as models with aux heads return."""
    return node.op == "call_function" and isinstance(node.target, type) and \
        issubclass(node.target, tuple)


def output_nodes(gm):
    """The tensors the model returns, in order, looking through (named) tuple construction.
    Python values it returns (a constant, a shape) are not outputs; each returned tensor must be
    one floating-point tensor computed by the model (see ``_check_output``)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    pending, nodes = [out.args[0]], []
    while pending:
        flat, _ = torch.utils._pytree.tree_flatten(pending.pop(0))
        for a in flat:
            if isinstance(a, fx.Node) and _is_tuple_builder(a):
                pending.append((a.args, a.kwargs))
            elif isinstance(a, fx.Node) and shapes.tensor_valued(a):
                nodes.append(a)
    if not nodes:
        raise PlanError("the model returns no tensor; rec-LRA needs logits or predictions")
    if len(set(nodes)) != len(nodes):
        raise PlanError("the model returns the same tensor twice; return it once")
    for node in nodes:
        _check_output(node)
    primary = shapes.shape_of(nodes[0])[1:]
    for node in nodes[1:]:
        if shapes.shape_of(node)[1:] != primary:
            raise PlanError(f"the model returns {nodes[0].name} of shape (B, "
                            f"{', '.join(map(str, primary))}) and {node.name} of shape "
                            f"(B, {', '.join(map(str, shapes.shape_of(node)[1:]))}); every "
                            "output gets its error against the same labels, so every output "
                            f"must be shaped like the first. Fix: give {node.name} the same "
                            "shape, or return only the outputs to train")
    return nodes


# an output node that cannot hold error neurons: (test, what it is, how to fix it)
_BAD_OUTPUTS = (
    (lambda n: n.op == "placeholder", "the model's input itself",
     "return only tensors the model computes"),
    (lambda n: n.op == "get_attr", "a parameter or buffer of the model, returned as is",
     "return only tensors computed from the input"),
    (lambda n: shapes.shape_of(n) is None, "a tuple or list of tensors made by one op",
     "unpack it (a, b = ...) and return the tensors"),
    (lambda n: not shapes.tensor_meta(n).dtype.is_floating_point, "not a floating-point tensor",
     "return the logits (integer or boolean tensors such as argmax carry no error)"),
    (lambda n: len(shapes.shape_of(n)) < 2, "a tensor without a feature axis",
     "return (B, C, ...) (for example with keepdim=True or unsqueeze(1))"),
)


def _check_output(node):
    for bad, what, fix in _BAD_OUTPUTS:
        if bad(node):
            meta = shapes.tensor_meta(node)
            seen = f" ({meta.dtype}, shape {tuple(meta.shape)})" if meta is not None else ""
            raise PlanError(f"the model returns {node.name}{seen}, which is {what}; rec-LRA "
                            f"needs every returned tensor to be floating-point values (B, C, ...) "
                            f"computed by the model. Fix: {fix}")


def _sweep(nodes, modules, op_params, identity, outputs, from_input):
    """One forward pass of the site rule. Returns (sites, pending) for the given forced sites."""
    pending, sites = {}, []
    for node in nodes:
        if node.op in ("placeholder", "get_attr", "output") or not shapes.tensor_valued(node) \
                or _carries_no_error(node):
            pending[node] = frozenset()
            continue
        incoming = frozenset().union(*(pending[a] for a in node.all_input_nodes))
        own = incoming | ({node} if node in op_params else frozenset())
        activation = incoming and from_input[node] and registry.is_activation(node, modules) and \
            shapes.batch_first(node)
        if node in identity or node in outputs or activation:
            sites.append(node)
            pending[node] = frozenset()
        else:
            pending[node] = own
    return sites, pending


def _violations(nodes, modules, op_params, pending, from_input):
    """Nodes that must become identity sites: unresolved errors entering a feature-mixing op,
    or fanning out to several users. Only input-derived tensors can be sites; an error that
    fans out from a parameter-only computation has no single owner and is rejected."""
    extra = set()
    for node in nodes:
        if node in op_params and registry.is_weight_op(node, modules):
            for a in node.all_input_nodes:
                if pending[a] and from_input[a]:
                    a = _above_module_prologue(a, node, pending, op_params)
                    extra |= _nearest_tensor(a, pending, modules)
        if pending.get(node) and len(node.users) > 1:
            if not from_input[node]:
                names = sorted(n.name for n in pending[node])
                raise PlanError(f"the parameters of {names} feed {len(node.users)} ops through "
                                f"{node.name} before reaching the input's path; rec-LRA needs one "
                                "owner site per parameter. Freeze them, or compute them inside a "
                                "leaf module (leaf_modules=[...])")
            found = _nearest_tensor(node, pending, modules)
            if not found:
                raise _fan_out_error(node, pending)
            extra |= found
    return extra


def _above_module_prologue(node, op, pending, op_params):
    """The value a built-in module was called with, when ``node`` is a parameter-free op of
    that module's own call before its weight op ``op`` (torch.export's ``aten.pad`` of a
    reflect-padded Conv2d): the site sits there, as symbolic tracing, to which the module is
    one op, places it."""
    call = export.builtin_module_call(op)
    while call is not None and node.op == "call_function" and node not in op_params and \
            export.builtin_module_call(node) == call:
        inputs = [a for a in node.all_input_nodes if pending.get(a)]
        if len(inputs) != 1:
            break
        node = inputs[0]
    return node


def _fan_out_error(node, pending):
    """A tuple-valued op (an LSTM's (output, (h, c)), split, chunk) whose parts are used
    separately, with no tensor before it where an identity site could collect their errors."""
    names = sorted(n.name for n in pending[node])
    users = ", ".join(u.name for u in node.users)
    return PlanError(f"the tensors of {node.name} (the outputs of {', '.join(names)}) are used "
                     f"separately by {users}; rec-LRA needs one owner site per parameter, so one "
                     f"op's outputs cannot reach several sites. Fix: use one of its outputs, or "
                     f"combine them in a leaf module (leaf_modules=[...]) that returns one "
                     f"tensor")


def _nearest_tensor(node, pending, modules, memo=None):
    """The node itself if it is one batch-first tensor; else (a tuple from chunk, split or
    attention; a value whose batch axis moved, as attention's permuted q, k, v) the nearest
    such tensors with unresolved errors that feed it, where an identity site can sit. Above a
    moved batch axis the search also skips the reshapes that moved it, so the site sits on the
    values an op computed (the qkv projection's output)."""
    if shapes.shape_of(node) is not None and shapes.batch_first(node):
        return {node}
    memo = {} if memo is None else memo       # each node once: the graph is a DAG, not a tree
    if node in memo:
        return memo[node]
    found = memo[node] = set()
    merging = node.meta.get("batch_first") == "merged" and registry.is_layout_op(node, modules)
    for a in node.all_input_nodes:
        if pending.get(a):        # x.view(-1, C) of a batch-first x: the site is at x
            start = a if merging and shapes.batch_first(a) else _above_reshapes(a, pending,
                                                                               modules)
            found |= _nearest_tensor(start, pending, modules, memo)
    if not found and shapes.shape_of(node) is not None and shapes.batch_first(node, merged=True):
        found.add(node)         # a batch merged with another axis (windows): the best there is
    return found


def _above_reshapes(node, pending, modules):
    """The value a chain of reshapes, permutes and transposes started from (``node`` itself
    when it is not such an op), or the first batch-first value of the chain when it started
    from a batch merged with another axis (a linear layer applied to ``x.view(-1, C)``)."""
    while registry.is_layout_op(node, modules):
        inputs = [a for a in node.all_input_nodes if pending.get(a)]
        if len(inputs) != 1 or shapes.shape_of(inputs[0]) is None:
            break
        if shapes.batch_first(node) and not shapes.batch_first(inputs[0]):
            break               # not up into a batch merged with another axis ((B * T, C))
        node = inputs[0]
    return node


def find_sites(gm, modules, op_params):
    nodes = list(gm.graph.nodes)
    outputs = output_nodes(gm)
    from_input = input_derived(nodes)
    identity = set()
    while True:
        sites, pending = _sweep(nodes, modules, op_params, identity, set(outputs), from_input)
        extra = _violations(nodes, modules, op_params, pending, from_input) - identity
        if not extra:
            return sites, outputs, pending
        identity |= extra


def _regions(nodes, sites, pending):
    """Assign every node with an unresolved error to the site it flows into (its unique user
    chain ends there, by construction of the identity sites)."""
    site_set, owner = set(sites), {}
    for node in reversed(nodes):
        if node in site_set:
            owner[node] = node
        elif pending.get(node) and len(node.users) == 1:
            user = next(iter(node.users))
            if user in owner:
                owner[node] = owner[user]
    return owner


def _next_weight_op(node, modules, op_params):
    """The first parametrised op the site's value reaches that reads its features (its next
    consumer: a module, or a function op such as torch.export's ``aten.linear`` or ``h @ w``),
    past elementwise ones (a scale), if any."""
    frontier, seen = list(node.users), set()
    while frontier:
        n = frontier.pop(0)
        if n in seen:
            continue
        seen.add(n)
        if n in op_params and (n.op == "call_module" or registry.is_weight_op(n, modules)):
            return n
        frontier.extend(n.users)
    return None


def _channel_dim(node, shape, region, modules, op_params):
    """The feature axis of a site (1 or last): the one axis whose size is the input feature
    count of the next parametrised op that reads it, else the output feature count of the nearest
    parametrised op before it; the op's kind decides when both or neither axis match."""
    after = _next_weight_op(node, modules, op_params)
    if after is not None:
        reads = registry.input_feature_counts(after, modules)
        matches = [d for d in (1, -1) if shape[d] in reads]
        if len(matches) == 1:
            return matches[0]
    for op in reversed(region):
        if op not in op_params:
            continue
        axes = registry.broadcast_axes(op, modules, len(shape))     # a scale or a shift
        if len(axes) == 1 and axes <= {1, len(shape) - 1}:
            return 1 if axes == {1} else -1
        features = registry.feature_counts(op, modules, modules[""])
        if not features and not registry.is_weight_op(op, modules):
            continue          # an elementwise op that does not tell (PReLU's one slope, a scale)
        matches = [d for d in (1, -1) if shape[d] in features]
        if len(matches) == 1:
            return matches[0]
        return -1 if registry.channel_last(op, modules) else 1
    return -1 if len(shape) == 3 else 1


def _layout(node, region, modules, op_params):
    shape = shapes.shape_of(node)
    if shape is None or len(shape) < 2:
        raise PlanError(f"site {node.name} has shape {shape}; rec-LRA needs a batch dimension and "
                        "at least one feature dimension (B, C, ...)")
    if len(shape) == 2:
        return Layout("vector", shape[1], 1)
    dim = _channel_dim(node, shape, region, modules, op_params)
    return Layout("spatial", shape[dim], dim)


def _site_kind(node, outputs, modules):
    if node in outputs:
        return "output"
    return "activation" if registry.is_activation(node, modules) else "identity"


def _make_site(node, kind, region, modules, op_params, loss_phi):
    if kind == "activation":
        h = node.all_input_nodes[0].name
        phi = registry.activation_name(node, modules)
    else:
        h, phi = node.name, (loss_phi if kind == "output" else "identity")
    return Site(name=node.name, kind=kind, h=h, activation=phi,
                layout=_layout(node, region, modules, op_params),
                region=tuple(n.name for n in region),
                ops=tuple(n.name for n in region if n in op_params))


def _check_batch_axes(sites, by_name, outputs):
    """Every site but the outputs holds one value per sample along its first axis: an error
    synapse maps a sample's error onto it."""
    for s in sites:
        node = by_name[s.name]
        if s.name not in outputs and not shapes.batch_first(node):
            raise PlanError(
                f"site {s.name} would hold the error neurons of a value of shape "
                f"{shapes.shape_of(node)} whose first axis is not the batch alone (the batch "
                "merged with another axis, as attention heads or windows folded into it); an "
                "error synapse maps each sample's error onto one sample's values. Fix: make "
                "the module that computes it a leaf (leaf_modules=[...]), or compile with "
                "scope='block' or 'stage' so that the site joins its residual block's output")


# -- entry point ----------------------------------------------------------------------------------
def analyse(gm, model, loss_phi="softmax", example_inputs=None, scope="layer",
            shared_params="sum"):
    """Sites (forward order, primary output last), parameter rules, and the site graph."""
    modules = dict(gm.named_modules())
    gm.graph.eliminate_dead_code()
    gm.recompile()
    shapes.propagate_shapes(gm, example_inputs)
    passes.unpack_tuple_arguments(passes.fields_to_indices(gm))
    output_nodes(gm)                      # what the model returns is checked first
    op_params = params.find_param_ops(gm, modules, model, shared_params)
    canonical = params.canonical_names(model)
    nodes = list(gm.graph.nodes)
    site_nodes, outputs, pending = find_sites(gm, modules, op_params)
    owner = _regions(nodes, site_nodes, pending)
    primary = outputs[0]
    ordered = [n for n in site_nodes if n is not primary] + [primary]
    sites = []
    for node in ordered:
        region = [n for n in nodes if owner.get(n) is node]
        sites.append(_make_site(node, _site_kind(node, outputs, modules), region, modules,
                                op_params, loss_phi))
    rules = []
    for node, names in op_params.items():
        site = owner.get(node)
        if site is None:
            raise PlanError(f"parameter {names[0]} (op {node.name}) reaches no error site")
        rules += [ParamRule(p, node.name, registry.rule_name(node, modules), site.name,
                            params.local_key(node, p, modules, model, canonical)) for p in names]
    model_order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    rules.sort(key=lambda r: model_order[r.param])

    g = node_graph(nodes)
    site_names = {s.name for s in sites}
    order = {s.name: i for i, s in enumerate(sites)}
    from_input = input_derived(nodes)
    blocks = find_blocks(nodes, g, site_names, order, owner, op_params, from_input)
    if scope in ("block", "stage"):
        node_order = {n.name: k for k, n in enumerate(nodes)}
        units = blocks if scope == "block" else stages_of(blocks, scopes.STAGE_BLOCKS)
        derived = {n.name for n, yes in from_input.items() if yes and n.op != "placeholder"
                   and shapes.tensor_valued(n) and not _carries_no_error(n)}
        sites, rules, blocks = scopes.join_blocks(g, tuple(sites), tuple(rules), units,
                                                  [o.name for o in outputs], node_order, derived)
        site_names = {s.name for s in sites}
        order = {s.name: i for i, s in enumerate(sites)}
    downstream = {s: tuple(sorted(nearest(g, s, site_names, "down"), key=order.get))
                  for s in site_names}
    _check_batch_axes(sites, {n.name: n for n in nodes}, {o.name for o in outputs})
    members = scopes.block_members(g, sites, blocks, {o.name for o in outputs})
    graph = SiteGraph(tuple(s.name for s in sites), tuple(o.name for o in outputs),
                      downstream, blocks, members)
    return tuple(sites), tuple(rules), graph
