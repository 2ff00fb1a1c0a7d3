"""The sites whose value a normalisation over the feature axis reads (a pre-norm transformer's
residual stream: the next block's LayerNorm or RMSNorm reads each block's output). Under
norm_error="vjp" such a site's displacement goes through that norm's input-VJP at the site's own
statistics (``fxlra.semantics.synapses.through_norm``), the map that every error reaching the
site through the norm passes, so that the feedback changes with the input as the gradient does.
"""
from ..ops import registry


def reading_norms(gm, sites, outputs, modules):
    """((site, kind, eps), ...) for every non-output site, features last, that a feature-axis
    norm takes as its input ("layer" or "rms"; the first such reader in graph order)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    found = []
    for s in sites:
        features_last = s.layout.kind == "vector" or s.layout.channel_dim == -1
        if s.name in outputs or not features_last:
            continue
        node = nodes[s.name]
        for user in node.users:
            spec = registry.feature_norm(user, modules)
            if spec is not None and user.args and user.args[0] is node:
                found.append((s.name, *spec))
                break
    return tuple(found)
