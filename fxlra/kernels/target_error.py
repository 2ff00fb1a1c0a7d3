"""Fused target and error of one error site (the contract's step, one pass over memory).

For a site with pre-activation ``h``, output ``z = phi(h)`` and displacement ``d``::

    y  = phi(h - beta * d)                                                   target
    e  = kappa * (alpha * (z - y) + (1 - alpha) * sign(z - y))               error neurons
    sq[b] = sum over every element of sample b of e^2                        float32, (B,)

Shapes: ``h`` and ``z`` are ``(B, ...)`` of one float dtype (float32, bfloat16 or float16), either
contiguous or channels_last (any other layout is copied to contiguous first); ``d`` is shaped like
``h`` (any float dtype), or ``(B, C)`` with ``C = h.shape[channel_dim]``: one value per sample and
channel, broadcast over the other dims (a vector-to-map synapse; an expanded ``(B, C, 1, 1)``
view shaped like ``h`` is recognised as one). ``y`` and ``e`` come back in ``h``'s dtype and
memory format; the math is float32, ``y`` is rounded once when stored and ``e`` is formed from
the float32 target. ``||e||^2`` of the site is ``sq.sum()``; fxlra's discrepancy is
``sq.sum() / B``.

``phi`` comes from ``ACTIVATIONS``: a table from name to a Triton snippet, the torch function it
equals and its parameters (``leaky_relu``'s ``negative_slope``, ``hardtanh``'s ``min_val`` and
``max_val``, ...; ``prelu``'s ``weight`` is a tensor of 1 or C values, read at every call, so an
optimizer's changes are seen). fxlra's site names (``"ReLU"``, ``"LeakyReLU"``, ``"log_sigmoid"``,
...) are accepted through ``ALIASES``; ``activation_of(module_or_function, args, kwargs)`` turns a
traced activation call into ``(name, params)`` (``nn.GELU(approximate="tanh")`` becomes
``"gelu_tanh"``), or None when the table has no row for it (the caller keeps its torch code).

Grid: ``(cdiv(N, BLOCK), B)`` with ``N = numel / B``; each program writes its partial sum of
``e^2`` and the partials are added by torch (deterministic, no atomics).
"""
import torch
import triton
import triton.language as tl

from . import _checks as check
from .activations import ACTIVATIONS, ALIASES, Activation, activation_of, resolve, supported

WHERE = "target_and_error"


# -- the kernel -----------------------------------------------------------------------------------
@triton.jit
def _target_error_kernel(h_ptr, z_ptr, d_ptr, y_ptr, e_ptr, part_ptr, w_ptr,
                         n, d_stride_b, d_stride_c, w_stride,
                         beta, alpha, kappa, p0, p1,
                         PHI: tl.constexpr, CHANNEL_D: tl.constexpr, TENSOR_P0: tl.constexpr,
                         STORE_Y: tl.constexpr, RECOMPUTE_Z: tl.constexpr, BLOCK: tl.constexpr,
                         INNER: tl.constexpr, CHANNELS: tl.constexpr):
    blk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    r = blk * BLOCK + tl.arange(0, BLOCK)
    mask = r < n
    offs = b * n + r
    h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    c = (r // INNER) % CHANNELS          # each value's channel: constants, so no division
    if CHANNEL_D:
        d = tl.load(d_ptr + b * d_stride_b + c * d_stride_c, mask=mask, other=0.0)
    else:
        d = tl.load(d_ptr + offs, mask=mask, other=0.0)
    x = h - beta * d.to(tl.float32)
    if TENSOR_P0:
        w = tl.load(w_ptr + c * w_stride, mask=mask, other=0.0).to(tl.float32)
        y = PHI(x, w, p1)
        if RECOMPUTE_Z:
            z = PHI(h, w, p1)
        else:
            z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        y = PHI(x, p0, p1)
        if RECOMPUTE_Z:
            z = PHI(h, p0, p1)
        else:
            z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if STORE_Y:
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    diff = z - y
    sign = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
    e = (kappa * (alpha * diff + (1.0 - alpha) * sign)).to(e_ptr.dtype.element_ty)
    tl.store(e_ptr + offs, e, mask=mask)
    e32 = e.to(tl.float32)
    tl.store(part_ptr + b * tl.num_programs(0) + blk, tl.sum(tl.where(mask, e32 * e32, 0.0), 0))


# -- launcher -------------------------------------------------------------------------------------
def _memory_format(t):
    if t.is_contiguous():
        return torch.contiguous_format
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None


def _channel_view(d, h, channel_dim):
    """d as (B, C) when it is one value per sample and channel: given so, or an expanded view
    shaped like h whose other dims have stride 0 (what fxlra.semantics.synapses.place returns)."""
    if d.dim() == 2 and h.dim() > 2 and tuple(d.shape) == (h.shape[0], h.shape[channel_dim]):
        return d
    if tuple(d.shape) == tuple(h.shape) and h.dim() > 2 and all(
            d.stride(k) == 0 or d.shape[k] == 1
            for k in range(1, d.dim()) if k != channel_dim):
        return d.as_strided((d.shape[0], d.shape[channel_dim]),
                            (d.stride(0), d.stride(channel_dim)))
    return None


def _config(n, interpreted):
    block = min(1024 if interpreted else 2048, triton.next_power_of_2(max(n, 16)))
    return block, (4 if block <= 1024 else 8)


def target_and_error(h, z, d, activation="identity", *, beta=0.1, alpha=1.0, kappa=1.0,
                     params=(), channel_dim=1, with_target=True, recompute_z=False):
    """The target ``y``, the error ``e`` and the per-sample ``sq = sum(e^2)`` of one site, in one
    pass. Returns ``(y, e, sq)`` (``y`` is None when ``with_target=False``; fxlra needs only
    ``e``). ``params`` are the activation's parameters in the table's order (defaults filled in).
    ``recompute_z=True`` forms ``z = phi(h)`` in float32 instead of reading ``z`` (what fxlra
    uses: in bfloat16 the rounding of a stored ``z`` would swamp ``z - y``; one read fewer)."""
    for arg, value in (("h", h), ("z", z), ("d", d)):
        check.tensor(WHERE, arg, value)
    interpreted = check.is_interpreted(_target_error_kernel)
    check.dtype(WHERE, "h", h)
    check.device(WHERE, "h", h, interpreted=interpreted)
    if h.dim() < 1:
        check.fail(WHERE, "h", "shape", tuple(h.shape), "(B, ...) with a batch dimension")
    check.shape(WHERE, "z", z, h.shape, "the shape of h")
    check.dtype(WHERE, "z", z, like=("h", h))
    check.device(WHERE, "z", z, like=("h", h), interpreted=interpreted)
    check.dtype(WHERE, "d", d)
    check.device(WHERE, "d", d, like=("h", h), interpreted=interpreted)
    if h.dim() > 2 and not -h.dim() < channel_dim < h.dim():
        check.fail(WHERE, "channel_dim", "value", channel_dim, f"a dim of h (h has {h.dim()})")
    channel_dim %= max(h.dim(), 1)
    name, values = resolve(activation, params)
    scalars = [v if not isinstance(v, torch.Tensor) else 0.0 for v in values]
    p0, p1 = (scalars + [0.0, 0.0])[:2]
    weight = values[0] if values and isinstance(values[0], torch.Tensor) else None

    fmt = _memory_format(h)
    if fmt is None:
        fmt = torch.contiguous_format
        h = h.contiguous()
    if z.stride() != h.stride():
        z = z.contiguous(memory_format=fmt)
    d_channel = _channel_view(d, h, channel_dim)
    if d_channel is None:
        if tuple(d.shape) != tuple(h.shape):
            channels = h.shape[channel_dim] if h.dim() > 2 else None
            also = f" or {(h.shape[0], channels)} (one value per sample and channel)" \
                if channels is not None else ""
            check.fail(WHERE, "d", "shape", tuple(d.shape), f"{tuple(h.shape)}{also}")
        if d.stride() != h.stride():
            d = d.contiguous(memory_format=fmt)
    channels = h.shape[channel_dim] if h.dim() > 1 else 1
    inner = h.stride(channel_dim) if h.dim() > 1 else 1
    if weight is not None:
        if weight.numel() not in (1, channels):
            check.fail(WHERE, "params[0]", "shape", tuple(weight.shape),
                       f"1 or {channels} values (one per channel of h)")
        check.dtype(WHERE, "params[0]", weight, check.FLOAT_DTYPES + (torch.float64,))
        check.device(WHERE, "params[0]", weight, like=("h", h), interpreted=interpreted)
        weight = weight.reshape(-1)

    batch = h.shape[0]
    n = h.numel() // batch if batch else 0
    e = torch.empty_like(h)
    y = torch.empty_like(h) if with_target else None
    if n == 0:
        return y, e, torch.zeros(batch, dtype=torch.float32, device=h.device)
    block, warps = _config(n, interpreted)
    per_channel = d_channel is not None or (weight is not None and weight.numel() > 1)
    grid = (triton.cdiv(n, block), batch)
    partial = torch.empty(batch, grid[0], dtype=torch.float32, device=h.device)
    d_arg, d_strides = (d, (0, 0)) if d_channel is None else (
        d_channel, (d_channel.stride(0), d_channel.stride(1)))
    w_arg, w_stride = (e, 0) if weight is None else (weight, 0 if weight.numel() == 1 else
                                                     weight.stride(0))
    _target_error_kernel[grid](
        h, z, d_arg, y if with_target else e, e, partial, w_arg,
        n, d_strides[0], d_strides[1], w_stride,
        float(beta), float(alpha), float(kappa), p0, p1,
        PHI=ACTIVATIONS[name].snippet, CHANNEL_D=d_channel is not None,
        TENSOR_P0=weight is not None, STORE_Y=with_target, RECOMPUTE_Z=bool(recompute_z),
        BLOCK=block, INNER=inner if per_channel else 1, CHANNELS=channels if per_channel else 1,
        num_warps=warps)
    sq = partial[:, 0] if grid[0] == 1 else partial.sum(1)
    return y, e, sq


# -- reference ------------------------------------------------------------------------------------
def target_and_error_ref(h, z, d, activation="identity", *, beta=0.1, alpha=1.0, kappa=1.0,
                         params=(), channel_dim=1, with_target=True, recompute_z=False):
    """What ``target_and_error`` computes, in plain torch (float32 math, results in h's dtype):
    the activation's own torch function at ``torch.sub(h, d, alpha=beta)``, then
    ``fxlra.rules.inner_error``'s formula."""
    name, values = resolve(activation, params)
    h32, z32, d32 = h.float(), z.float(), d.float()
    if tuple(d.shape) != tuple(h.shape):
        view = [1] * h.dim()
        view[0], view[channel_dim] = h.shape[0], h.shape[channel_dim]
        d32 = d32.reshape(view).expand(h.shape)
    values = [v.float() if isinstance(v, torch.Tensor) else v for v in values]
    y32 = ACTIVATIONS[name].torch_fn(torch.sub(h32, d32, alpha=beta), *values)
    if recompute_z:
        z32 = ACTIVATIONS[name].torch_fn(h32, *values)
    diff = z32 - y32
    e32 = kappa * (alpha * diff + (1.0 - alpha) * torch.sign(diff))
    e = e32.to(h.dtype)
    batch = h.shape[0]
    sq = e.float().reshape(batch, -1).pow(2).sum(1) if batch else torch.zeros(0)
    return (y32.to(h.dtype) if with_target else None), e, sq


__all__ = ["target_and_error", "target_and_error_ref", "ACTIVATIONS", "ALIASES", "Activation",
           "activation_of", "resolve", "supported"]
