"""Error synapses: modules that map a parent site's error to a displacement shaped like the
child site's z. Their kind follows the two layouts, so their size depends on feature counts only.

    vector  -> vector   "dense"      d = e W^T                              W: (C_i, C_j)
    vector  -> spatial  "spatial"    dense to the child's C_i x H x W map, or (where that is
                                     larger than SPATIAL_BUDGET weights) to a coarser C_i x h x w
                                     grid, upsampled to H x W (nearest)     W: (C_i h w, C_j)
    vector  -> spatial  "broadcast"  dense to C_i channels, broadcast over space (the paper's;
                                     chosen for maps whose channels are not on axis 1)
    spatial -> spatial  "pointwise"  1x1 map over channels, then resized to the child's space
    spatial -> vector   "pool"       global average over space, then dense
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..frontend import shapes
from ..errors import OptionError, WiringError
from ..ops.local import compute_dtype
from ..analysis.plan import Edge

KIND_BY_LAYOUT = {("vector", "vector"): "dense", ("vector", "spatial"): "broadcast",
                  ("spatial", "spatial"): "pointwise", ("spatial", "vector"): "pool"}


def _resize(x, size):
    """Resize the spatial dims of (B, C, *S) to ``size``: average when shrinking, nearest
    neighbour when growing; differing spatial ranks are flattened to one sequence axis."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    if x.dim() - 2 != len(size) or len(size) > 3:
        flat = x.flatten(2)
        return _resize(flat, (math.prod(size),)).reshape(*x.shape[:2], *size)
    if all(s <= t for s, t in zip(size, x.shape[2:])):
        pool = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[len(size) - 1]
        return pool(x, size)
    return F.interpolate(x, size=tuple(size), mode="nearest")


# the most weights one "spatial" synapse may have; past it, its grid is coarsened
SPATIAL_BUDGET = 1 << 20


def spatial_grid(in_features, channels, size, budget=SPATIAL_BUDGET):
    """The grid of a "spatial" synapse onto a map of ``size`` (H, W, ...): the full map when
    ``in_features x channels x H x W`` fits the budget, else the map shrunk by the smallest
    integer factor that fits (down to one cell: a broadcast)."""
    size = tuple(int(n) for n in size)
    for factor in range(1, max(size, default=1) + 1):
        grid = tuple(-(-n // factor) for n in size)
        if in_features * channels * math.prod(grid) <= budget:
            return grid
    return tuple(1 for _ in size)


class Synapse(nn.Module):
    """E_{j->i}: ``forward(e_j, shape_i)`` returns d shaped like z_i. ``weight`` is (C_i, C_j),
    or (C_i * prod(grid), C_j) for a "spatial" synapse."""

    def __init__(self, kind, in_features, out_features, parent_dim=1, child_dim=1, std=0.05,
                 grid=None):
        super().__init__()
        if kind not in _APPLY:
            raise OptionError(f"unknown synapse kind {kind!r}; choose one of {sorted(_APPLY)}")
        if (kind == "spatial") != (grid is not None):
            raise OptionError("a 'spatial' synapse needs its grid (and only it takes one)")
        self.kind, self.parent_dim, self.child_dim = kind, parent_dim, child_dim
        self.grid = tuple(grid) if grid is not None else None
        rows = out_features * (math.prod(self.grid) if self.grid else 1)
        self.weight = nn.Parameter(torch.randn(rows, in_features) * std)

    def forward(self, e, shape):
        return _APPLY[self.kind](self, e, tuple(shape))

    def extra_repr(self):
        out, inp = self.weight.shape
        if self.grid:
            return f"{self.kind}, {inp} -> {out // math.prod(self.grid)}x" + \
                "x".join(map(str, self.grid))
        return f"{self.kind}, {inp} -> {out}"


def place(d, kind, shape, child_dim):
    """Lay a (B, C_i) displacement out like the child: as is (dense) or over its space."""
    if kind == "dense":
        return d.reshape(shape)
    view = [1] * len(shape)
    view[0], view[child_dim] = shape[0], shape[child_dim]
    return d.reshape(view).expand(shape)


def through_norm(d, z, kind, eps):
    """``d`` carried back through the input-VJP of a norm over the last axis of ``z`` (without
    its affine weight), at z's own statistics: "layer" (LayerNorm), "rms" (RMSNorm; eps None:
    the dtype's). The map is symmetric, so a synapse's weight-gradient through it is its own
    weight-gradient of ``through_norm(c)``."""
    if eps is None:                          # the norm's own default: its input's dtype's
        eps = torch.finfo(z.dtype).eps
    z = z.to(d.dtype)
    if kind == "layer":
        z = z - z.mean(-1, keepdim=True)
        d = d - d.mean(-1, keepdim=True)
    rstd = torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps)
    n = z * rstd
    return (d - n * (d * n).mean(-1, keepdim=True)) * rstd


def _spatial(syn, e, shape):
    d = (e @ syn.weight.t()).reshape(shape[0], shape[1], *syn.grid)
    return _resize(d, shape[2:])


def _dense(syn, e, shape):
    return place(e @ syn.weight.t(), "dense", shape, syn.child_dim)


def _broadcast(syn, e, shape):
    return place(e @ syn.weight.t(), "broadcast", shape, syn.child_dim)


_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def _pointwise(syn, e, shape):
    if syn.parent_dim == 1 and e.dim() in _CONV:                 # maps: a 1x1 convolution
        w = syn.weight.view(*syn.weight.shape, *([1] * (e.dim() - 2)))
        d = _CONV[e.dim()](e, w)                                 # (B, C_i, *S_j)
    else:
        d = e.movedim(syn.parent_dim, -1) @ syn.weight.t()      # (B, *S_j, C_i)
        d = d.movedim(-1, 1)                                     # (B, C_i, *S_j)
    child = list(shape)
    channels = child.pop(syn.child_dim)
    d = _resize(d, child[1:])
    assert d.shape[1] == channels
    return d.movedim(1, syn.child_dim)


def _pool(syn, e, shape):
    spatial = [d for d in range(1, e.dim()) if d != syn.parent_dim % e.dim()]
    return e.mean(dim=spatial) @ syn.weight.t()


_APPLY = {"dense": _dense, "broadcast": _broadcast, "pointwise": _pointwise, "pool": _pool,
          "spatial": _spatial}


# -- explicit weight-gradients (summed over the batch), for the generated program ---------------
def _dense_grad(syn, e, c):
    return c.reshape(c.shape[0], -1).t() @ e


def _resize_adjoint(c, size):
    """The transpose of ``_resize(., c.shape[2:])`` applied to ``c``, from (B, C, *size):
    adaptive average pooling's or nearest upsampling's backward (2-d maps; None otherwise)."""
    if tuple(c.shape[2:]) == tuple(size):
        return c
    if c.dim() != 4 or len(size) != 2:
        return None
    source = [c.shape[0], c.shape[1], *size]
    if all(t <= s for t, s in zip(c.shape[2:], size)):
        return torch.ops.aten._adaptive_avg_pool2d_backward(c, c.new_empty(source))
    return torch.ops.aten.upsample_nearest2d_backward(c, list(c.shape[2:]), source)


def _spatial_grad(syn, e, c):
    c = _resize_adjoint(c, syn.grid)
    if c is None:
        return None                         # a 1-d or 3-d map resized: torch.func
    return c.reshape(c.shape[0], -1).t() @ e


def _broadcast_grad(syn, e, c):
    spatial = [d for d in range(1, c.dim()) if d != syn.child_dim % c.dim()]
    return c.sum(spatial).t() @ e


def _pool_grad(syn, e, c):
    spatial = [d for d in range(1, e.dim()) if d != syn.parent_dim % e.dim()]
    return c.t() @ e.mean(dim=spatial)


def _pointwise_grad(syn, e, c):
    child_spatial = [n for k, n in enumerate(c.shape[1:], 1) if k != syn.child_dim % c.dim()]
    parent_spatial = [n for k, n in enumerate(e.shape[1:], 1) if k != syn.parent_dim % e.dim()]
    if child_spatial != parent_spatial:
        return None
    if syn.parent_dim == 1 and syn.child_dim == 1 and e.dim() in _CONV:
        dtype = compute_dtype(e, c)
        c, e = c.to(dtype), e.to(dtype)
        w = syn.weight.to(dtype).view(*syn.weight.shape, *([1] * (e.dim() - 2)))
        _, dw, _ = torch.ops.aten.convolution_backward(
            c, e, w, None, [1] * (e.dim() - 2), [0] * (e.dim() - 2), [1] * (e.dim() - 2),
            False, [0] * (e.dim() - 2), 1, [False, True, False])
        return dw.view(syn.weight.shape)
    c2 = c.movedim(syn.child_dim, -1).reshape(-1, c.shape[syn.child_dim])
    e2 = e.movedim(syn.parent_dim, -1).reshape(-1, e.shape[syn.parent_dim])
    return c2.t() @ e2


_GRADS = {"dense": _dense_grad, "broadcast": _broadcast_grad, "pool": _pool_grad,
          "pointwise": _pointwise_grad, "spatial": _spatial_grad}


def weight_grads(synapse, e, c):
    """VJP_E(c): the synapse's parameter gradients at input ``e`` for the cotangent ``c``,
    summed over the batch, as a list in ``named_parameters`` order. Explicit for fxlra's kinds
    (a resizing pointwise synapse and user modules use torch.func on the synapse alone)."""
    if isinstance(synapse, Synapse):
        grad = _GRADS[synapse.kind](synapse, e, c)
        if grad is not None:
            return [grad]
    params = dict(synapse.named_parameters())
    shape = tuple(c.shape)
    _, pullback = torch.func.vjp(lambda p: apply(synapse, e, shape, p), params)
    (grads,) = pullback(c)
    return [grads[n] for n in params]


MAP_SYNAPSES = ("spatial", "broadcast")


def default_kind(parent_layout, child_layout, child_shape, map_synapse="spatial"):
    """The kind an edge gets by its layouts: "spatial" (``map_synapse``) from a vector to a
    channels-first map, else the kind of ``KIND_BY_LAYOUT``."""
    kind = KIND_BY_LAYOUT[(parent_layout.kind, child_layout.kind)]
    if kind == "broadcast" and map_synapse == "spatial" and child_layout.channel_dim == 1 and \
            len(child_shape) >= 3:
        return "spatial"
    return kind


def make(parent_layout, child_layout, std, override=None, child_shape=None,
         map_synapse="spatial"):
    """The synapse module of an edge: the default for its layouts (and the child's shape), a
    kind named in ``override``, or the user's own module."""
    if isinstance(override, nn.Module):
        return override
    shape = tuple(child_shape or ())
    kind = override or default_kind(parent_layout, child_layout, shape, map_synapse)
    if kind == "spatial" and (child_layout.kind != "spatial" or child_layout.channel_dim != 1
                              or len(shape) < 3 or parent_layout.kind != "vector"):
        raise OptionError(f"a 'spatial' synapse maps a vector error onto a channels-first map "
                          f"(B, C, H, ...); this edge goes from {parent_layout} to {child_layout}"
                          f"; use 'broadcast' or 'pointwise'")
    grid = spatial_grid(parent_layout.channels, child_layout.channels, shape[2:]) \
        if kind == "spatial" else None
    return Synapse(kind, parent_layout.channels, child_layout.channels,
                   parent_layout.channel_dim, child_layout.channel_dim, std, grid)


def apply(synapse, e, shape, params=None):
    """Run any synapse (fxlra's or a user's module), optionally with other parameter tensors,
    and check the displacement's shape."""
    args = (e, tuple(shape)) if isinstance(synapse, Synapse) else (e,)
    d = synapse(*args) if params is None else torch.func.functional_call(synapse, params, args)
    if tuple(d.shape) != tuple(shape):
        raise OptionError(f"error synapse {type(synapse).__name__} returned shape "
                          f"{tuple(d.shape)} but its child site has shape {tuple(shape)}")
    return d


def _node(gm, name):
    return next(n for n in gm.graph.nodes if n.name == name)


def build_edges(plan_sites, graph, overrides, std, gm=None, map_synapse="spatial"):
    """Edges of the error graph with their synapse modules, in a deterministic order."""
    index = {s.name: s for s in plan_sites}
    position = {s.name: k for k, s in enumerate(plan_sites)}
    pairs = sorted(graph.edges(), key=lambda e: (position[e[1]], position[e[0]]))
    overrides = dict(overrides or {})
    unknown = [k for k in overrides if tuple(k) not in set(pairs)]
    if unknown:
        raise WiringError(f"synapses= names edges {unknown} that are not in the error graph")
    edges, modules = [], {}
    for parent, child in pairs:
        override = overrides.get((parent, child))
        shape = shapes.shape_of(_node(gm, child)) if gm is not None else None
        module = make(index[parent].layout, index[child].layout, std, override, shape,
                          map_synapse)
        kind = module.kind if isinstance(module, Synapse) else "custom"
        edge = Edge(parent, child, kind, index[parent].layout.channels,
                    index[child].layout.channels)
        edges.append(edge)
        modules[edge.key] = module
    return tuple(edges), modules
