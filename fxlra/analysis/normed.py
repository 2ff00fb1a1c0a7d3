"""The sites whose value a normalisation over the feature axis reads (a pre-norm transformer's
residual stream: the next block's LayerNorm or RMSNorm reads each block's output): a norm op of
the registry's (``registry.feature_norm``), or an RMSNorm written out as Hugging Face's models
write it, ``z * rsqrt(mean(z ** 2, -1, keepdim=True) + eps)``, after an optional dtype cast. Under
norm_error="vjp" such a site's displacement goes through that norm's input-VJP at the site's own
statistics (``fxlra.semantics.synapses.through_norm``), the map that every error reaching the
site through the norm passes, so that the feedback changes with the input as the gradient does.
"""
import operator


from ..ops import registry

_CASTS = ("to", "_to_copy", "float", "type_as")


def reading_norms(gm, sites, outputs, modules):
    """((site, kind, eps), ...) for every non-output site, features last, that a feature-axis
    norm takes as its input ("layer" or "rms"; the first such reader in graph order)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    found = []
    for s in sites:
        features_last = s.layout.kind == "vector" or s.layout.channel_dim == -1
        if s.name in outputs or not features_last:
            continue
        spec = _reader_norm(nodes[s.name], modules)
        if spec is not None:
            found.append((s.name, *spec))
    return tuple(found)


def _reader_norm(node, modules):
    """(kind, eps) of the first user of ``node`` that normalises it: a norm op reading it, else
    the written-out RMSNorm of ``node`` itself, else one of a dtype cast of it."""
    written = _written_rms(node)
    for user in node.users:
        first = bool(user.args) and user.args[0] is node
        spec = (registry.feature_norm(user, modules) if first else None) or written or \
            (_written_rms(user) if first and _name(user) in _CASTS else None)
        if spec is not None:
            return spec
    return None


def _name(node):
    """An op's name whichever way the graph spells it: ``aten.mul.Tensor``, ``torch.mul``,
    ``operator.mul`` and the method ``.mul`` are all "mul"."""
    target = node.target
    if node.op == "call_method":
        return target
    if node.op != "call_function":
        return None
    packet = getattr(target, "overloadpacket", None)
    if packet is not None:
        return packet.__name__
    return {operator.mul: "mul", operator.add: "add", operator.pow: "pow"}.get(
        target, getattr(target, "__name__", None))


def _only(node, name):
    """The users of ``node`` named ``name`` that take it as their first argument."""
    return [u for u in node.users if _name(u) == name and u.args and u.args[0] is node]


def _written_rms(z):
    """("rms", eps) where ``z`` feeds ``z * rsqrt(mean(z ** 2, -1, keepdim=True) + eps)``."""
    for square in _only(z, "pow"):
        if square.args[1:2] != (2,):
            continue
        for mean in _only(square, "mean"):
            dims = mean.args[1] if len(mean.args) > 1 else mean.kwargs.get("dim")
            keep = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
            if dims not in (-1, [-1], (-1,)) or not keep:
                continue
            for shift in _only(mean, "add"):
                eps = shift.args[1] if len(shift.args) > 1 else None
                if not isinstance(eps, float):
                    continue
                for root in _only(shift, "rsqrt"):
                    if any(_name(m) == "mul" and set(m.args) == {z, root} for m in root.users):
                        return ("rms", eps)
    return None
