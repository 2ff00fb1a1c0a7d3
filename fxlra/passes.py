"""Graph passes that keep numerics identical and make the graph safe to record.

``make_out_of_place`` turns in-place ops (``ReLU(inplace=True)``, ``+=``, ``x.relu_()``,
``F.relu(x, inplace=True)``) into their out-of-place forms, so that a recorded pre-activation
is never overwritten. Later readers of the mutated tensor are pointed at the new value.
"""
import copy
import operator

import torch

from .errors import UnsupportedError

_INPLACE_OPERATORS = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, operator.iand: operator.and_, operator.ior: operator.or_,
}
_INPLACE_TORCH = {torch.relu_: torch.relu, torch.sigmoid_: torch.sigmoid, torch.tanh_: torch.tanh}


def _inplace_replacement(node, modules):
    """(how to rewrite, the mutated input node) for an in-place node, or None."""
    if node.op == "call_function":
        if node.target in _INPLACE_OPERATORS:
            return ("target", _INPLACE_OPERATORS[node.target]), node.args[0]
        if node.target in _INPLACE_TORCH:
            return ("target", _INPLACE_TORCH[node.target]), node.args[0]
        if node.kwargs.get("inplace"):
            return ("kwarg", None), node.args[0]
    elif node.op == "call_method":
        name = node.target
        if name.endswith("_") and not name.endswith("__") and hasattr(torch.Tensor, name[:-1]):
            return ("method", name[:-1]), node.args[0]
    elif node.op == "call_module" and getattr(modules[node.target], "inplace", False):
        return ("module", None), node.args[0]
    return None


_VIEW_METHODS = {"view", "narrow", "select", "transpose", "permute", "expand", "unsqueeze",
                 "squeeze", "t", "diagonal", "as_strided", "unflatten", "view_as", "unbind",
                 "split", "chunk"}


def _is_view(node):
    """Whether a node may share memory with another tensor (so mutating it mutates that one)."""
    if node.op == "call_function":
        return node.target is operator.getitem or getattr(node.target, "__name__", "") in \
            _VIEW_METHODS
    return node.op == "call_method" and node.target in _VIEW_METHODS


def make_out_of_place(gm):
    """Rewrite every in-place op of ``gm`` (in place on the GraphModule) and return it."""
    modules = dict(gm.named_modules())
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        found = _inplace_replacement(node, modules)
        if found is None:
            continue
        (how, value), mutated = found
        if isinstance(mutated, torch.fx.Node) and _is_view(mutated):
            where = [line for line in (node.stack_trace or "").splitlines()
                     if line.strip().startswith("File")][-1:]
            raise UnsupportedError(
                f"in-place op {node.name} ({node.target}) writes into {mutated.name}, a view of "
                f"another tensor{': ' + ' '.join(w.strip() for w in where) if where else ''}. "
                "fxlra records values and cannot keep that aliasing; write it out of place "
                "(for example torch.cat or torch.where) or make the module a leaf")
        if how == "target":
            node.target = value
        elif how == "method":
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
        if isinstance(mutated, torch.fx.Node):
            for user in list(mutated.users):
                if user is not node and order[user] > order[node]:
                    user.replace_input_with(mutated, node)
    gm.graph.lint()
    gm.recompile()
    return gm
