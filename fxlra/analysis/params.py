"""Which ops own which parameters: every trainable parameter's uses in the traced graph, by the
name ``named_parameters()`` gives it (tied weights are one parameter), with a rule at each use;
a shared parameter's updates are summed unless ``shared_params="refuse"``. Modules whose own
forward uses a parameter in several ops are found here to be traced again as one op.
"""
from ..errors import PlanError

SHARED_PARAMS = ("sum", "refuse")

# attributes and methods that read a tensor's metadata, not its values: no use of a parameter
_METADATA = frozenset(("dtype", "device", "shape", "ndim", "is_cuda", "requires_grad", "layout",
                       "size", "dim", "numel", "is_floating_point", "is_contiguous", "get_device",
                       "element_size"))


def _reads_metadata(node):
    if node.op == "call_method":
        return node.target in _METADATA
    return node.op == "call_function" and node.target is getattr and node.args[1] in _METADATA


def canonical_names(model):
    """Every name of each trainable tensor -> the name ``named_parameters()`` gives it (the first
    one): tied weights (an embedding and an output layer) are one parameter."""
    first, names = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.requires_grad:
            names[name] = first.setdefault(id(p), name)
    return names


def _param_uses(gm, modules, names):
    """Each trainable parameter's using nodes, and each node's parameters (forward order), by
    canonical name; reading a parameter's dtype or shape is no use."""
    op_params, used_by = {}, {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            found = [names.get(f"{node.target}.{n}") for n, _ in
                     modules[node.target].named_parameters(remove_duplicate=False)]
        elif node.op in ("call_function", "call_method") and not _reads_metadata(node):
            found = [names.get(a.target) for a in node.all_input_nodes if a.op == "get_attr"]
        else:
            continue
        found = list(dict.fromkeys(n for n in found if n is not None))
        for name in found:
            used_by.setdefault(name, []).append(node)
        if found:
            op_params[node] = found
    return op_params, used_by


def multi_op_modules(gm, model):
    """Modules whose own forward uses one of their parameters in several traced ops (a
    weight-standardised convolution: reshape, mean, var, conv): fxlra traces them again as one
    leaf op, whose update is its weight-gradient at its recorded input."""
    modules = dict(gm.named_modules())
    _, used_by = _param_uses(gm, modules, canonical_names(model))
    return sorted({name.rsplit(".", 1)[0] for name, users in used_by.items()
                   if len(users) > 1 and "." in name and
                   all(u.op != "call_module" for u in users)})


def local_key(node, name, modules, model, names):
    """How ``node`` reads parameter ``name``: its module's own attribute name, or the target of
    the get_attr node it takes (tied tensors: the name of this use); ``names`` is
    ``canonical_names(model)``."""
    if node.op == "call_module":
        p = model.get_parameter(name)
        return next(k for k, q in modules[node.target].named_parameters(remove_duplicate=False)
                    if q is p)
    return next(a.target for a in node.all_input_nodes
                if a.op == "get_attr" and names.get(a.target) == name)


def find_param_ops(gm, modules, model, shared_params="sum"):
    """Map each node that uses trainable parameters to their (canonical) qualified names. A
    parameter used by several ops (a shared module, tied weights) gets a rule at each use, and
    its updates are summed, unless ``shared_params="refuse"``."""
    names = canonical_names(model)
    trainable = set(names.values())
    if not trainable:
        frozen = sum(1 for _ in model.parameters())
        raise PlanError(f"{type(model).__name__} has no trainable parameter "
                        f"({f'all {frozen} are frozen' if frozen else 'it has none'}); rec-LRA "
                        "has nothing to update. Unfreeze the parameters to train "
                        "(requires_grad_(True))")
    op_params, nodes_of = _param_uses(gm, modules, names)
    used_by = {p: [n.name for n in users] for p, users in nodes_of.items()}
    shared = {p: users for p, users in used_by.items() if len(users) > 1}
    aliases = sorted(n for n, c in names.items() if n != c)
    if shared_params == "refuse" and (shared or aliases):
        p = next(iter(shared)) if shared else names[aliases[0]]
        users = used_by[p]
        also = [n for n in aliases if names[n] == p]
        tied = f" (also named {' and '.join(also)}: one tied tensor)" if also else ""
        what = f"parameter {p}{tied} is used by {len(users)} op{'s' * (len(users) > 1)} " \
               f"({', '.join(users)})"
        raise PlanError(f"{what}, and shared_params='refuse' asks for one site's error per "
                        "parameter. Give each use its own module or parameter, freeze it with "
                        "requires_grad_(False), or pass shared_params='sum' to sum the updates "
                        "of its uses (as backprop sums their gradients)")
    unused = sorted(trainable - set(used_by))
    if unused:
        raise PlanError(f"parameter {unused[0]} reaches no error site (it is not used by the "
                        f"traced forward{'; also ' + ', '.join(unused[1:4]) if unused[1:] else ''})"
                        ". Remove it, or freeze it with requires_grad_(False)")
    return op_params
