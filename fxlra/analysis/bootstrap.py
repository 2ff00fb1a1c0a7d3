"""error_rule="bootstrap": the error synapse into site i is fitted by least squares, d_i -> c_i,
where c_i is the error of the sites that read z_i carried back to z_i by their own local VJP
(their region's ops, through the parameter-free ops no site owns, such as pooling between two
layers). c_i uses only the reading sites' own weights, so no error crosses a site boundary
except through a synapse; the synapse learns the map that its edge stands in for.
"""

from . import sites as analysis
from ..frontend import shapes


def boundary(gm, plan):
    """The nodes that collect a c: every synapse's child site, and every floating-point tensor
    value that no site's region owns and that is computed from the input's values (pooling,
    flattening between sites; not a random mask), through which c travels on to a child
    site. Returns (those names, the unowned ones last op first)."""
    owned = {n for s in plan.sites for n in s.region}
    free = set()
    for node, derived in analysis.input_derived(list(gm.graph.nodes)).items():
        meta = shapes.tensor_meta(node)
        if derived and node.op.startswith("call_") and node.name not in owned and \
                meta is not None and meta.dtype.is_floating_point:
            free.add(node.name)
    return {e.child for e in plan.edges} | free, tuple(
        n.name for n in reversed(gm.graph.nodes) if n.name in free)


def scale(is_output, beta):
    """The factor on a site's carried error in c: an output's error is the loss's gradient at
    its value; an inner site's, e = phi(h) - phi(h - beta d), is about beta phi'(h) d, so
    dividing by beta makes it a gradient estimate at h on the same scale (beta = 0: inner
    errors are zero and add nothing)."""
    if is_output:
        return 1.0
    return 1.0 / beta if beta else 0.0


def residual(displacement, c):
    """The synapse's cotangent: d_i - c_i (c_i absent: no site reads z_i, d_i is fitted to 0)."""
    return displacement if c is None else displacement - c
