"""The pseudo-convolution (``fxlra.nn.PerturbativeConv2d``) as fused Triton GEMMs: the perturbed
operand ``u = relu(x + noise)`` is formed while its tile is loaded, so the ``nmasks``-times-larger
tensor never exists in memory.

With ``K = C * nmasks`` perturbed channels, channel ``k = c * nmasks + m`` being input channel
``c`` under mask ``m`` (the layer's ordering), and ``p`` a spatial position of ``H x W``::

    u[b, k, p]  = relu(x[b, k // nmasks, p] + noise[k, p])
    forward:    out[b, o, p] = sum_k W[o, k] * u[b, k, p]  (+ bias[o])
    update:     dW[o, k] = scale * sum_{b, p} e[b, o, p] * u[b, k, p]
                db[o]    = scale * sum_{b, p} e[b, o, p]

Shapes: ``x`` (B, C, H, W) is the layer's input after its stride's average pool (see
``pseudo_conv_inputs``); ``noise`` (K, H, W), any strides (the layer's ``masks(H, W)`` is a crop
of a larger field); ``W`` (O, K, 1, 1) or (O, K); ``bias`` (O,); ``e`` (B, O, H, W). Any strides
for ``x``, ``e`` and the output (the output takes ``x``'s memory format, channels_last included).
Dtypes as the layer under autocast: the noise is rounded to ``x``'s dtype before the add (the
layer's ``noise.to(x.dtype)``), ``u`` and ``W`` enter the dot in ``x``'s dtype (float32 dots in
IEEE precision), accumulation is float32, the output is in ``x``'s dtype and ``dW``, ``db`` in
``out_dtype`` (float32 by default).

``scale=1`` gives the sums of ``fxlra.ops.local.perturbative_grads`` (the generated program divides by
the batch size afterwards); pass ``scale=1 / B`` to fold that in. ``perturbative_forward(m, x)``
and ``perturbative_grads(m, x, c)`` take the layer itself and match ``m(x)`` and
``fxlra.ops.local.perturbative_grads(m, x, c)``.

Grids: forward ``(O tiles, B, P tiles)`` (programs that run together share the noise and ``x``
tiles); update ``(O tiles, K tiles, splits)``: each split reduces a share of the ``B x P tiles``
steps into its own float32 partial, and the partials are added by torch (deterministic).
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _checks as check

FORWARD, UPDATE = "pseudo_conv_forward", "pseudo_conv_update"


@triton.jit
def _perturbed_tile(x_base, n_ptr, k, k_mask, x_sp, n_sp, p_mask, sxc, snk,
                    NMASKS: tl.constexpr, K_FIRST: tl.constexpr):
    """relu(x + noise) for channels ``k`` and positions with offsets ``x_sp``/``n_sp``, in x's
    dtype: (BLOCK_K, BLOCK_P) when K_FIRST, else (BLOCK_P, BLOCK_K)."""
    c = k // NMASKS
    if K_FIRST:
        mask = k_mask[:, None] & p_mask[None, :]
        xv = tl.load(x_base + c[:, None] * sxc + x_sp[None, :], mask=mask, other=0.0)
        nv = tl.load(n_ptr + k[:, None] * snk + n_sp[None, :], mask=mask, other=0.0)
    else:
        mask = p_mask[:, None] & k_mask[None, :]
        xv = tl.load(x_base + x_sp[:, None] + c[None, :] * sxc, mask=mask, other=0.0)
        nv = tl.load(n_ptr + n_sp[:, None] + k[None, :] * snk, mask=mask, other=0.0)
    s = xv.to(tl.float32) + nv.to(xv.dtype).to(tl.float32)
    return tl.maximum(s, 0.0, propagate_nan=tl.PropagateNan.ALL).to(xv.dtype)


@triton.jit
def _forward_kernel(x_ptr, n_ptr, w_ptr, bias_ptr, out_ptr,
                    O, K, P, width,
                    sxb, sxc, sxh, sxw, snk, snh, snw, swo, swk, sob, soo, soh, sow,
                    NMASKS: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_O: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    b = tl.program_id(1).to(tl.int64)
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    o_mask, p_mask = o < O, p < P
    ph, pw = p // width, p % width
    x_sp, n_sp = ph * sxh + pw * sxw, ph * snh + pw * snw
    x_base = x_ptr + b * sxb
    acc = tl.zeros((BLOCK_O, BLOCK_P), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < K
        u = _perturbed_tile(x_base, n_ptr, k, k_mask, x_sp, n_sp, p_mask, sxc, snk,
                            NMASKS, True)
        w = tl.load(w_ptr + o[:, None] * swo + k[None, :] * swk,
                    mask=o_mask[:, None] & k_mask[None, :], other=0.0).to(u.dtype)
        acc = tl.dot(w, u, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o, mask=o_mask, other=0.0).to(tl.float32)[:, None]
    out = out_ptr + b * sob + o[:, None] * soo + (ph * soh + pw * sow)[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=o_mask[:, None] & p_mask[None, :])


@triton.jit
def _update_kernel(x_ptr, n_ptr, e_ptr, dw_ptr, db_ptr,
                   O, K, P, steps, steps_per_split, scale,
                   sxb, sxc, sxh, sxw, snk, snh, snw, seb, seo, seh, sew,
                   NMASKS: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
                   WIDTH: tl.constexpr, P_TILES: tl.constexpr):
    # WIDTH and P_TILES are constants (one compile per spatial size): the positions of every
    # step come from them by multiplications, not by integer divisions in the inner loop
    o_tile, k_tile, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o = o_tile * BLOCK_O + tl.arange(0, BLOCK_O)
    k = k_tile * BLOCK_K + tl.arange(0, BLOCK_K)
    o_mask, k_mask = o < O, k < K
    acc = tl.zeros((BLOCK_O, BLOCK_K), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
    start = split * steps_per_split
    stop = tl.minimum(start + steps_per_split, steps)
    for t in range(start, stop):
        b = tl.cast(t // P_TILES, tl.int64)
        p = (t % P_TILES) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = p < P
        ph, pw = p // WIDTH, p % WIDTH
        ev = tl.load(e_ptr + b * seb + o[:, None] * seo + (ph * seh + pw * sew)[None, :],
                     mask=o_mask[:, None] & p_mask[None, :], other=0.0)
        u = _perturbed_tile(x_ptr + b * sxb, n_ptr, k, k_mask, ph * sxh + pw * sxw,
                            ph * snh + pw * snw, p_mask, sxc, snk, NMASKS, False)
        acc = tl.dot(ev, u, acc, input_precision=PRECISION)
        if HAS_BIAS:
            bias_acc += tl.sum(ev.to(tl.float32), 1)
    out = dw_ptr + split.to(tl.int64) * O * K + o[:, None] * K + k[None, :]
    tl.store(out, acc * scale, mask=o_mask[:, None] & k_mask[None, :])
    if HAS_BIAS:
        tl.store(db_ptr + split * O + o, bias_acc * scale, mask=o_mask & (k_tile == 0))


# -- launchers ------------------------------------------------------------------------------------
def _precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


def _pick(where, config, **defaults):
    """The launch configuration: ``defaults`` overridden by the caller's ``config``."""
    config = dict(config or {})
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        check.fail(where, "config", "keys", unknown, f"some of {sorted(defaults)}")
    return {**defaults, **config}


def _check_common(where, x, noise, nmasks, interpreted):
    check.tensor(where, "x", x)
    check.tensor(where, "noise", noise)
    check.dtype(where, "x", x)
    check.ndim(where, "x", x, 4, "(B, C, H, W)")
    check.device(where, "x", x, interpreted=interpreted)
    if not isinstance(nmasks, int) or isinstance(nmasks, bool) or nmasks < 1:
        check.fail(where, "nmasks", "value", repr(nmasks), "an int >= 1")
    _, channels, height, width = x.shape
    check.dtype(where, "noise", noise, check.FLOAT_DTYPES + (torch.float64,))
    check.shape(where, "noise", noise, (channels * nmasks, height, width),
                "(C * nmasks, H, W) for x of shape "
                f"{tuple(x.shape)} and nmasks={nmasks}")
    check.device(where, "noise", noise, like=("x", x), interpreted=interpreted)


def pseudo_conv_forward(x, noise, weight, nmasks, bias=None, *, config=None):
    """``out[b, o, p] = sum_k W[o, k] relu(x[b, k // nmasks, p] + noise[k, p]) (+ bias[o])``,
    shaped (B, O, H, W) in x's dtype and memory format. ``config`` overrides the tile sizes
    (``BLOCK_O``, ``BLOCK_P``, ``BLOCK_K``, ``num_warps``, ``num_stages``)."""
    interpreted = check.is_interpreted(_forward_kernel)
    _check_common(FORWARD, x, noise, nmasks, interpreted)
    check.tensor(FORWARD, "weight", weight)
    batch, channels, height, width = x.shape
    k_total = channels * nmasks
    if weight.dim() == 4 and tuple(weight.shape[2:]) == (1, 1):
        weight = weight.flatten(1)
    if weight.dim() != 2 or weight.shape[1] != k_total:
        check.fail(FORWARD, "weight", "shape", tuple(weight.shape),
                   f"(O, {k_total}, 1, 1) or (O, {k_total}): C * nmasks input channels")
    check.dtype(FORWARD, "weight", weight)
    check.device(FORWARD, "weight", weight, like=("x", x), interpreted=interpreted)
    out_channels = weight.shape[0]
    if bias is not None:
        check.tensor(FORWARD, "bias", bias)
        check.shape(FORWARD, "bias", bias, (out_channels,), "(O,) for weight of O outputs")
        check.dtype(FORWARD, "bias", bias)
        check.device(FORWARD, "bias", bias, like=("x", x), interpreted=interpreted)
    out = torch.empty((batch, out_channels, height, width), dtype=x.dtype, device=x.device,
                      memory_format=_format_of(x))
    positions = height * width
    if out.numel() == 0:
        return out
    if k_total == 0:
        return out.zero_() if bias is None else out.copy_(bias[:, None, None].expand_as(out))
    small = interpreted
    cfg = _pick(FORWARD, config, BLOCK_O=16 if small else (64 if out_channels <= 64 else 128),
                BLOCK_P=16 if small else (64 if positions <= 64 else 128),
                BLOCK_K=16 if small else 32, num_warps=4,
                num_stages=2 if x.dtype == torch.float32 else 3)
    grid = (triton.cdiv(out_channels, cfg["BLOCK_O"]), batch,
            triton.cdiv(positions, cfg["BLOCK_P"]))
    _forward_kernel[grid](
        x, noise, weight, bias if bias is not None else weight, out,
        out_channels, k_total, positions, width,
        *x.stride(), *noise.stride(), *weight.stride(), *out.stride(),
        NMASKS=nmasks, HAS_BIAS=bias is not None, PRECISION=_precision(x.dtype), **cfg)
    return out


def pseudo_conv_update(x, noise, e, nmasks, *, bias=False, scale=1.0, out_dtype=torch.float32,
                       config=None):
    """``dW[o, k] = scale * sum_{b,p} e[b, o, p] relu(x[b, k // nmasks, p] + noise[k, p])``
    shaped (O, K, 1, 1) like the layer's weight, and ``db[o] = scale * sum_{b,p} e[b, o, p]``
    when ``bias`` (else None). Returns ``(dW, db)``. ``config`` overrides ``BLOCK_O``,
    ``BLOCK_K``, ``BLOCK_P``, ``SPLIT`` (how many partial sums), ``num_warps``, ``num_stages``."""
    interpreted = check.is_interpreted(_update_kernel)
    _check_common(UPDATE, x, noise, nmasks, interpreted)
    check.tensor(UPDATE, "e", e)
    batch, channels, height, width = x.shape
    check.ndim(UPDATE, "e", e, 4, "(B, O, H, W)")
    if (e.shape[0], *e.shape[2:]) != (batch, height, width):
        check.fail(UPDATE, "e", "shape", tuple(e.shape),
                   f"({batch}, O, {height}, {width}): x's batch and spatial size")
    check.dtype(UPDATE, "e", e, like=("x", x))
    check.device(UPDATE, "e", e, like=("x", x), interpreted=interpreted)
    if out_dtype not in check.FLOAT_DTYPES + (torch.float64,):
        check.fail(UPDATE, "out_dtype", "value", out_dtype, "a floating-point dtype")
    out_channels, k_total, positions = e.shape[1], channels * nmasks, height * width
    db = None
    if out_channels * k_total == 0 or batch * positions == 0:
        dw = torch.zeros(out_channels, k_total, 1, 1, dtype=out_dtype, device=x.device)
        if bias:
            db = torch.zeros(out_channels, dtype=out_dtype, device=x.device)
        return dw, db
    small = interpreted
    cfg = _pick(UPDATE, config, BLOCK_O=16 if small else 64, BLOCK_K=16 if small else 64,
                BLOCK_P=16 if small else (64 if positions <= 64 else 128), SPLIT=None,
                num_warps=4, num_stages=2 if x.dtype == torch.float32 else 3)
    p_tiles = triton.cdiv(positions, cfg["BLOCK_P"])
    steps = batch * p_tiles
    tiles = triton.cdiv(out_channels, cfg["BLOCK_O"]) * triton.cdiv(k_total, cfg["BLOCK_K"])
    split = cfg.pop("SPLIT")
    if split is None:
        programs = 2 if small else 2 * torch.cuda.get_device_properties(
            x.device).multi_processor_count
        split = triton.cdiv(programs, tiles)
    split = max(1, min(int(split), steps))
    per_split = triton.cdiv(steps, split)
    split = triton.cdiv(steps, per_split)
    partial = torch.empty(split, out_channels, k_total, dtype=torch.float32, device=x.device)
    bias_partial = torch.empty(split, out_channels, dtype=torch.float32, device=x.device) \
        if bias else partial
    grid = (triton.cdiv(out_channels, cfg["BLOCK_O"]), triton.cdiv(k_total, cfg["BLOCK_K"]),
            split)
    _update_kernel[grid](
        x, noise, e, partial, bias_partial,
        out_channels, k_total, positions, steps, per_split, float(scale),
        *x.stride(), *noise.stride(), *e.stride(),
        NMASKS=nmasks, HAS_BIAS=bool(bias), PRECISION=_precision(x.dtype), WIDTH=width,
        P_TILES=p_tiles, **cfg)
    dw = partial[0] if split == 1 else partial.sum(0)
    dw = dw.to(out_dtype).reshape(out_channels, k_total, 1, 1)
    if bias:
        db = (bias_partial[0] if split == 1 else bias_partial.sum(0)).to(out_dtype)
    return dw, db


def _format_of(x):
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


# -- the layer ------------------------------------------------------------------------------------
def pseudo_conv_inputs(m, x):
    """The kernels' ``(x, noise)`` for a ``PerturbativeConv2d`` ``m`` at its input ``x``: x after
    the stride's average pool, and the masks at that size (a view, no copy)."""
    if m.stride != (1, 1):
        x = F.avg_pool2d(x, m.stride, m.stride, ceil_mode=True)
    return x, m.masks(x.shape[-2], x.shape[-1], x)


def perturbative_forward(m, x, *, config=None):
    """``m(x)`` for a ``PerturbativeConv2d`` through the fused kernel (weight and bias cast to
    x's dtype, as autocast does)."""
    x, noise = pseudo_conv_inputs(m, x)
    return pseudo_conv_forward(x, noise, m.weight, m.nmasks, m.bias, config=config)


def perturbative_grads(m, x, c, *, scale=1.0, config=None):
    """``fxlra.ops.local.perturbative_grads(m, x, c)`` through the fused kernel: the summed
    ``{"weight": dW, "bias": db}`` (bias only when the layer has one), in the weight's dtype."""
    x, noise = pseudo_conv_inputs(m, x)
    dw, db = pseudo_conv_update(x, noise, c, m.nmasks, bias=m.bias is not None, scale=scale,
                                out_dtype=m.weight.dtype, config=config)
    return {"weight": dw} if db is None else {"weight": dw, "bias": db}


# -- references -----------------------------------------------------------------------------------
def _perturbed_ref(x, noise, nmasks):
    u = x.repeat_interleave(nmasks, dim=1) + noise.to(x.dtype)
    return torch.relu(u)


def pseudo_conv_forward_ref(x, noise, weight, nmasks, bias=None):
    """``pseudo_conv_forward`` in plain torch: the layer's materialised ``relu(x + noise)``, then
    a float32 1x1 convolution of it (operands rounded to x's dtype), cast to x's dtype."""
    u = _perturbed_ref(x, noise, nmasks)
    w = weight.reshape(weight.shape[0], -1, 1, 1).to(x.dtype).float()
    out = F.conv2d(u.float(), w, None if bias is None else bias.float())
    return out.to(x.dtype).contiguous(memory_format=_format_of(x))


def pseudo_conv_update_ref(x, noise, e, nmasks, *, bias=False, scale=1.0,
                           out_dtype=torch.float32):
    """``pseudo_conv_update`` in plain torch: ``einsum("bohw,bkhw->ok")`` of ``e`` and the
    materialised ``relu(x + noise)`` in float32, as in ``fxlra.ops.local.perturbative_grads``."""
    u = _perturbed_ref(x, noise, nmasks).float()
    e32 = e.float()
    dw = (torch.einsum("bohw,bkhw->ok", e32, u) * scale)[:, :, None, None].to(out_dtype)
    db = (e32.sum((0, 2, 3)) * scale).to(out_dtype) if bias else None
    return dw, db


__all__ = ["pseudo_conv_forward", "pseudo_conv_update", "pseudo_conv_forward_ref",
           "pseudo_conv_update_ref", "pseudo_conv_inputs", "perturbative_forward",
           "perturbative_grads"]
