"""Re-projection of a list of update tensors onto the ball of radius ``clip``, in place, in one
multi-tensor pass per dtype (the appendix's Gaussian-ball re-projection)::

    n_i = ||D_i||_F                                           float32 accumulation
    s_i = clip / n_i  if n_i > 0  else 1,   then  s_i = min(s_i, 1)
    D_i *= s_i                                                 (skipped where s_i == 1)

which is ``fxlra.rules.reproject_all``: a zero tensor keeps scale 1 (never 0/0), ``clip=None`` or
an empty list changes nothing, and a tensor inside the ball is left bit for bit as it was. The
scales stay float32 for every tensor (``reproject_all`` rounds them to the first update's dtype;
on float32 lists the two agree to float32 rounding: the norms are summed in another order).

Shapes: any number of tensors of any shapes, float32, bfloat16 or float16, on one device, each
dense (contiguous in some order of its dims: row-major, channels_last, a transposed contiguous
tensor). Each tensor is cut into chunks of ``CHUNK`` elements; a table of base addresses (int64)
and one of (tensor, chunk) rows let one launch visit every chunk of every tensor of a dtype:
pass 1 writes each chunk's sum of squares into a (tensors, max chunks) float32 matrix, torch
turns its row sums into the scales, pass 2 multiplies. ``frobenius_norms`` is pass 1 alone (the
step's finiteness check needs the norms first); ``reproject_(updates, clip, norms)`` then skips
it. The tables are cached by the tensors' addresses and sizes (the caching allocator hands the
same blocks back step after step).
"""
from collections import OrderedDict

import torch
import triton
import triton.language as tl

from . import _checks as check

WHERE = "reproject_"
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_TABLES = OrderedDict()           # cache key -> tables; a few entries
_CACHE_SIZE = 8


@triton.jit
def _sum_squares_kernel(addresses, numels, chunk_tensor, chunk_index, partial, max_chunks,
                        ELEM: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    t = tl.load(chunk_tensor + row)
    j = tl.load(chunk_index + row)
    base = tl.load(addresses + t).to(tl.pointer_type(ELEM))
    n = tl.load(numels + t)
    start = j.to(tl.int64) * CHUNK
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, CHUNK, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        v = tl.load(base + offs, mask=offs < n, other=0.0).to(tl.float32)
        acc += v * v
    tl.store(partial + t.to(tl.int64) * max_chunks + j, tl.sum(acc, 0))


@triton.jit
def _scale_kernel(addresses, numels, chunk_tensor, chunk_index, scales,
                  ELEM: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    t = tl.load(chunk_tensor + row)
    s = tl.load(scales + t)
    if s < 1.0:
        j = tl.load(chunk_index + row)
        base = tl.load(addresses + t).to(tl.pointer_type(ELEM))
        n = tl.load(numels + t)
        start = j.to(tl.int64) * CHUNK
        for i in range(0, CHUNK, BLOCK):
            offs = start + i + tl.arange(0, BLOCK)
            mask = offs < n
            v = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(base + offs, (v * s).to(ELEM), mask=mask)


def _tables(tensors, chunk, device):
    """The base addresses and sizes of every tensor (int64), the largest chunk count, and per
    dtype the (tensor, chunk) rows of its chunks; cached by addresses, sizes and dtypes."""
    key = (device, chunk) + tuple((t.data_ptr(), t.numel(), t.dtype) for t in tensors)
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        return hit
    counts = [triton.cdiv(t.numel(), chunk) for t in tensors]
    rows = {}
    for i, t in enumerate(tensors):
        rows.setdefault(t.dtype, ([], []))
        rows[t.dtype][0].extend([i] * counts[i])
        rows[t.dtype][1].extend(range(counts[i]))
    as_long = dict(dtype=torch.int64, device=device)
    as_int = dict(dtype=torch.int32, device=device)
    result = (torch.tensor([t.data_ptr() for t in tensors], **as_long),
              torch.tensor([t.numel() for t in tensors], **as_long),
              max(counts + [1]),
              [(dtype, torch.tensor(ts, **as_int), torch.tensor(js, **as_int))
               for dtype, (ts, js) in rows.items() if ts])
    _TABLES[key] = result
    if len(_TABLES) > _CACHE_SIZE:
        _TABLES.popitem(last=False)
    return result


def _prepare(where, tensors, chunk, block, name="updates"):
    """Check the tensors; the kernel tables and the (chunk, block) sizes."""
    interpreted = check.is_interpreted(_scale_kernel)
    first = tensors[0]
    for k, t in enumerate(tensors):
        arg = f"{name}[{k}]"
        check.tensor(where, arg, t)
        check.dtype(where, arg, t)
        check.device(where, arg, t, like=None if k == 0 else (f"{name}[0]", first),
                     interpreted=interpreted)
        if not check.is_dense(t):
            check.fail(where, arg, "strides", t.stride(),
                       f"a dense tensor of shape {tuple(t.shape)} (contiguous in some order of "
                       "its dims); pass t.contiguous()")
    block = block or (256 if interpreted else 1024)
    chunk = chunk or (4 * block if interpreted else 16 * block)
    if chunk % block or block & (block - 1):
        check.fail(where, "chunk", "value", chunk, f"a multiple of block={block}, a power of two")
    return _tables(tensors, chunk, first.device), chunk, block


def _sum_squares(tables, count, chunk, block, device):
    addresses, numels, max_chunks, groups = tables
    partial = torch.zeros(count, max_chunks, dtype=torch.float32, device=device)
    for dtype, rows_t, rows_j in groups:
        _sum_squares_kernel[(rows_t.numel(),)](
            addresses, numels, rows_t, rows_j, partial, max_chunks,
            ELEM=_TL_DTYPES[dtype], CHUNK=chunk, BLOCK=block)
    return partial.sum(1)


def frobenius_norms(tensors, *, chunk=None, block=None):
    """``torch.stack(torch._foreach_norm(tensors))`` in one pass per dtype: a float32 vector of
    the tensors' Frobenius norms (float32 accumulation)."""
    if not tensors:
        return torch.zeros(0)
    tables, chunk, block = _prepare("frobenius_norms", tensors, chunk, block, "tensors")
    return _sum_squares(tables, len(tensors), chunk, block, tensors[0].device).sqrt()


def reproject_(updates, clip, norms=None, *, chunk=None, block=None):
    """Scale every tensor of ``updates`` in place by ``min(1, clip / ||D||_F)`` (1 for a zero
    tensor) and return the list, like ``fxlra.rules.reproject_all``; with ``norms`` (their
    stacked Frobenius norms, already computed) the norm pass is skipped. ``chunk`` and
    ``block`` (powers of two) override the elements per program and per load."""
    if clip is None or not updates:
        return updates
    if not isinstance(clip, (int, float)) or isinstance(clip, bool) or not clip > 0:
        check.fail(WHERE, "clip", "value", repr(clip), "a positive number or None")
    tables, chunk, block = _prepare(WHERE, updates, chunk, block)
    device = updates[0].device
    if norms is None:
        norms = _sum_squares(tables, len(updates), chunk, block, device).sqrt()
    else:
        check.tensor(WHERE, "norms", norms)
        check.shape(WHERE, "norms", norms, (len(updates),), "one norm per update")
        check.device(WHERE, "norms", norms, like=("updates[0]", updates[0]), interpreted=True)
        norms = norms.float()
    scales = torch.where(norms > 0, clip / norms, torch.ones_like(norms)).clamp_(max=1.0)
    addresses, numels, _, groups = tables
    for dtype, rows_t, rows_j in groups:
        _scale_kernel[(rows_t.numel(),)](
            addresses, numels, rows_t, rows_j, scales,
            ELEM=_TL_DTYPES[dtype], CHUNK=chunk, BLOCK=block)
    return updates


def frobenius_norms_ref(tensors):
    """``frobenius_norms`` in plain torch."""
    if not tensors:
        return torch.zeros(0)
    return torch.stack([t.float().pow(2).sum().sqrt() for t in tensors])


def reproject_ref(updates, clip, norms=None):
    """``reproject_`` in plain torch: float32 norms, float32 scales, one multiply per tensor."""
    if clip is None or not updates:
        return updates
    norms = frobenius_norms_ref(updates) if norms is None else norms.float()
    for t, norm in zip(updates, norms):
        scale = torch.where(norm > 0, clip / norm, torch.ones_like(norm)).clamp(max=1.0)
        if scale < 1:
            t.copy_((t.float() * scale).to(t.dtype))
    return updates


__all__ = ["reproject_", "reproject_ref", "frobenius_norms", "frobenius_norms_ref"]
