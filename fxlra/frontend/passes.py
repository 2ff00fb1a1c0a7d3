"""Graph passes that keep numerics identical and make the graph safe to record.

``make_out_of_place`` turns in-place ops (``ReLU(inplace=True)``, ``+=``, ``x.relu_()``,
``F.relu(x, inplace=True)``) into their out-of-place forms, so that a recorded pre-activation
is never overwritten. Later readers of the mutated tensor are pointed at the new value.
Once shapes are known, ``fields_to_indices`` reads the fields of the named tuples ops return
(``torch.sort(x).values``) by index, as every other tuple is read, and
``unpack_tuple_arguments`` hands a tuple of tensors to the op that takes it
(``torch.cat(h.chunk(2), 1)``) as a list of its items.
"""
import copy
import operator
import os

import torch
from torch.fx.passes.shape_prop import TensorMetadata

from ..errors import UnsupportedError

_INPLACE_OPERATORS = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, operator.iand: operator.and_, operator.ior: operator.or_,
}
_INPLACE_TORCH = {torch.relu_: torch.relu, torch.sigmoid_: torch.sigmoid, torch.tanh_: torch.tanh}


# in-place methods that change no values: the node becomes its input
_NO_OP_METHODS = {"requires_grad_", "retain_grad"}


def _inplace_replacement(node, modules):
    """(how to rewrite, the mutated input node) for an in-place node, or None."""
    if node.op == "call_function":
        aten = _aten_out_of_place(node)
        if aten is not None:
            return ("target", aten), node.args[0]
        if node.target in _INPLACE_OPERATORS:
            return ("target", _INPLACE_OPERATORS[node.target]), node.args[0]
        if node.target in _INPLACE_TORCH:
            return ("target", _INPLACE_TORCH[node.target]), node.args[0]
        if node.kwargs.get("inplace"):
            return ("kwarg", None), node.args[0]
    elif node.op == "call_method":
        name = node.target
        if name in _NO_OP_METHODS:
            return ("identity", None), node.args[0]
        if name.endswith("_") and not name.endswith("__"):
            if callable(getattr(torch.Tensor, name[:-1], None)):
                return ("method", name[:-1]), node.args[0]
            return ("none", None), node.args[0]
    elif node.op == "call_module" and getattr(modules[node.target], "inplace", False):
        return ("module", None), node.args[0]
    return None


def _aten_out_of_place(node):
    """The out-of-place overload of an in-place ATen op on a value computed from the input
    (``aten.relu_.default`` -> ``aten.relu.default``); None for any other node, and for one
    that updates the model's state (``aten.add_`` on BatchNorm's ``num_batches_tracked``)."""
    packet = getattr(node.target, "overloadpacket", None)
    name = getattr(packet, "__name__", "")
    if not name.endswith("_") or name.endswith("__") or not node.args or \
            not isinstance(node.args[0], torch.fx.Node) or not _from_input(node.args[0]):
        return None
    plain = getattr(torch.ops.aten, name[:-1], None)
    return getattr(plain, node.target._overloadname, None) if plain is not None else None


_VIEW_METHODS = {"view", "narrow", "select", "transpose", "permute", "expand", "unsqueeze",
                 "squeeze", "t", "diagonal", "as_strided", "unflatten", "view_as", "unbind",
                 "split", "chunk"}
_LIBRARY_DIRS = (os.path.dirname(torch.__file__) + os.sep,)
_OWN_DIR = os.path.dirname(__file__) + os.sep


def _is_view(node):
    """Whether a node may share memory with another tensor (so mutating it mutates that one)."""
    if node.op == "call_function":
        return node.target is operator.getitem or getattr(node.target, "__name__", "") in \
            _VIEW_METHODS
    return node.op == "call_method" and node.target in _VIEW_METHODS


def _from_input(node):
    """Whether a node's value is computed from a model input."""
    frontier, seen = [node], {node}
    while frontier:
        n = frontier.pop()
        if n.op == "placeholder":
            return True
        fresh = [a for a in n.all_input_nodes if a not in seen]
        seen.update(fresh)
        frontier += fresh
    return False


def _where(node):
    """The user's line that made ``node``, from its recorded stack trace (torch's and fxlra's
    own frames skipped)."""
    lines = (node.stack_trace or "").splitlines()
    for k in reversed(range(len(lines))):
        line = lines[k].strip()
        if line.startswith("File") and not any(f'"{d}' in line for d in
                                               _LIBRARY_DIRS + (_OWN_DIR,)):
            code = lines[k + 1].strip() if k + 1 < len(lines) else ""
            return f": {line}{' (' + code + ')' if code else ''}"
    return ""


def _unsupported(node, mutated, why, fix):
    return UnsupportedError(f"in-place op {node.name} ({node.target}) writes into "
                            f"{mutated.name}, {why}{_where(node)}. fxlra records values and "
                            f"cannot keep that; {fix}")


def make_out_of_place(gm):
    """Rewrite every in-place op of ``gm`` (in place on the GraphModule) and return it."""
    modules = dict(gm.named_modules())
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        found = _inplace_replacement(node, modules)
        if found is None:
            continue
        (how, value), mutated = found
        is_node = isinstance(mutated, torch.fx.Node)
        if how == "identity":
            node.replace_all_uses_with(mutated)
            gm.graph.erase_node(node)
            continue
        if is_node and _is_view(mutated):
            raise _unsupported(node, mutated, "a view of another tensor",
                               "write it out of place (for example torch.cat or torch.where) or "
                               "make the module a leaf")
        if how == "none":
            if is_node and _from_input(mutated):
                raise _unsupported(node, mutated, "a value computed from the input, and it has "
                                   "no out-of-place form", "write it out of place (for example "
                                   "torch.full_like, torch.zeros_like or torch.where) or make "
                                   "the module a leaf")
            continue
        if how in ("target", "method"):
            node.target = value
        elif how == "kwarg":
            node.kwargs = {**node.kwargs, "inplace": False}
        else:  # a parameter-free module such as ReLU(inplace=True): call a private copy,
            # registered on the GraphModule itself so that the user's model is not changed
            replacement = copy.deepcopy(modules[node.target])
            replacement.inplace = False
            name = f"_out_of_place_{node.name}"
            gm.add_submodule(name, replacement)
            modules[name] = replacement
            node.target = name
        if is_node:
            for user in list(mutated.users):
                if user is not node and order[user] > order[node]:
                    user.replace_input_with(mutated, node)
    gm.graph.lint()
    gm.recompile()
    return gm


def _field_names(meta):
    """The field names of the named tuple an op returned (torch.return_types.sort, max, topk),
    from its recorded metadata; () for a tensor (whose TensorMetadata is a named tuple too)."""
    if not isinstance(meta, tuple) or isinstance(meta, TensorMetadata):
        return ()
    return tuple(getattr(type(meta), "_fields", None) or
                 getattr(type(meta), "__match_args__", None) or ())


def fields_to_indices(gm):
    """Rewrite ``getattr(t, "values")`` on a named tuple an op returned as ``t[0]``, so that an
    error is carried back through a tuple by index alone (needs ``tensor_meta`` from shapes)."""
    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not getattr or \
                not isinstance(node.args[0], torch.fx.Node):
            continue
        fields = _field_names(node.args[0].meta.get("tensor_meta"))
        if node.args[1] in fields:
            node.target = operator.getitem
            node.args = (node.args[0], fields.index(node.args[1]))
            changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm


def _tensor_list(meta):
    """The number of tensors in a tuple or list an op returned, or None."""
    if not isinstance(meta, (tuple, list)) or isinstance(meta, TensorMetadata) or \
            not all(isinstance(m, TensorMetadata) for m in meta):
        return None
    return len(meta)


def unpack_tuple_arguments(gm):
    """Pass the tensors of a tuple-valued node (``h.chunk(2)``, ``x.unbind(1)``) to the op that
    takes the whole tuple (``torch.cat(h.chunk(2), 1)``) as a list of ``t[k]``, so that every
    tensor an op reads is a node of its own (needs ``tensor_meta`` from shapes)."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method", "call_module") or \
                node.target in (operator.getitem, getattr):
            continue

        def unpack(arg):
            nonlocal changed
            count = _tensor_list(arg.meta.get("tensor_meta"))
            if count is None:
                return arg
            changed = True
            parts = []
            with gm.graph.inserting_before(node):
                for k in range(count):
                    part = gm.graph.call_function(operator.getitem, (arg, k))
                    part.meta["tensor_meta"] = arg.meta["tensor_meta"][k]
                    parts.append(part)
            return parts if isinstance(arg.meta["tensor_meta"], list) else tuple(parts)
        node.args = tuple(unpack(a) if isinstance(a, torch.fx.Node) else a for a in node.args)
        node.kwargs = {k: unpack(v) if isinstance(v, torch.fx.Node) else v
                       for k, v in node.kwargs.items()}
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm
