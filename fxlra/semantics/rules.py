"""The formulas of the contract that do not depend on the graph: output errors, inner errors,
error-synapse rules, per-depth options, and re-projection. Shared by every implementation.
"""
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..errors import InputError

LOSSES = ("cross_entropy", "mse")
LOCAL_RULES = ("hebbian", "dx")
# error rule -> (sign, which cotangent the synapse's weight-gradient takes); "bootstrap": see
# fxlra/analysis/bootstrap.py
ERROR_RULES = {"hebbian-d": (-1.0, "d"), "hebbian-z": (1.0, "z"), "derived": (-1.0, "derived"),
               "bootstrap": (1.0, "bootstrap")}
OUTPUT_PHI = {"cross_entropy": "softmax", "mse": "identity"}
# a token label that gets no error and counts in no average (F.cross_entropy's default)
IGNORE_INDEX = -100


def at_depth(value, depth):
    """A per-depth option's value: a number, or a mapping whose deepest key covers deeper sites."""
    if not isinstance(value, Mapping):
        return float(value)
    if depth in value:
        return float(value[depth])
    below = [k for k in value if k <= depth]
    return float(value[max(below)] if below else value[min(value)])


def check_batch(x, y, out_layout, loss):
    """Reject a batch before anything runs: empty or non-finite inputs, labels of the wrong
    type, shape or range for the model's output (``out_layout`` of the primary output site)."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"inputs must be a tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[0] == 0:
        raise InputError(f"the batch is empty (input shape {tuple(x.shape)})")
    if x.is_floating_point() and not all_finite(x):
        raise InputError("inputs contain NaN or infinity")
    if not isinstance(y, torch.Tensor):
        raise InputError(f"labels must be a tensor, got {type(y).__name__}")
    if y.dtype == torch.bool or y.is_complex():
        raise InputError(f"labels have dtype {y.dtype}; pass class labels as integers "
                         "(torch.long) of shape (B,) or float targets shaped like the output")
    batch, classes = x.shape[0], out_layout.channels
    if y.shape[:1] != (batch,):
        raise InputError(f"labels have shape {tuple(y.shape)} but the batch has {batch} samples; "
                         f"pass class labels of shape ({batch},) or targets of shape "
                         f"({batch}, {classes})")
    if not y.is_floating_point():
        tokens = y.dim() >= 2 and out_layout.kind == "spatial" and out_layout.channel_dim == -1
        if not tokens and (y.dim() != 1 or out_layout.kind != "vector"):
            raise InputError(f"class labels must have shape ({batch},) for an output (B, classes),"
                             f" or ({batch}, T) for token logits (B, T, classes); got labels "
                             f"{tuple(y.shape)}")
        kept = y[y != IGNORE_INDEX] if tokens else y
        if kept.numel() and (kept.min() < 0 or kept.max() >= classes):
            raise InputError(f"class labels must lie in [0, {classes - 1}]"
                             f"{f' (or be {IGNORE_INDEX}, ignored)' if tokens else ''}; got values "
                             f"from {int(kept.min())} to {int(kept.max())}")
    elif out_layout.kind == "vector" and tuple(y.shape) != (batch, classes):
        raise InputError(f"targets of shape {tuple(y.shape)} do not match the output's shape "
                         f"({batch}, {classes}); pass class labels of shape ({batch},) or "
                         f"{'one-hot rows' if loss == 'cross_entropy' else 'targets'} shaped like "
                         "the output")
    elif not all_finite(y):
        raise InputError("targets contain NaN or infinity")


def all_finite(t):
    """Whether every value of ``t`` is finite: its sum is (a NaN or infinity makes the sum
    non-finite), else an exact check, in case only the sum overflowed. The sum is the fast path:
    ``isfinite`` over a whole batch costs several times more on the CPU."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def targets_for(v, y, loss):
    """The dense target tensor for the output ``v``: one-hot rows for class labels, else ``y``.
    Values were checked by ``check_batch``; here only what differs between outputs is."""
    if y.device != v.device:
        raise InputError(f"labels are on {y.device} but the model's output is on {v.device}; "
                         "move them with y.to(device)")
    if not y.is_floating_point():
        if v.dim() > 2 and y.shape == v.shape[:-1]:        # token labels (B, T) of (B, T, V)
            keep = (y != IGNORE_INDEX).unsqueeze(-1)
            index = torch.where(keep, y.unsqueeze(-1), 0).long()
            return torch.zeros_like(v).scatter_(-1, index, 1.0) * keep
        if v.dim() != 2 or y.shape != v.shape[:1]:
            raise InputError(f"class labels of shape {tuple(y.shape)} do not fit an output of "
                             f"shape {tuple(v.shape)}")
        index = y if y.dtype in (torch.int64, torch.int32) else y.long()   # uint8, int16, ...
        return torch.zeros_like(v).scatter_(1, index.unsqueeze(1), 1.0)
    if y.shape != v.shape:
        raise InputError(f"targets of shape {tuple(y.shape)} do not match the output's shape "
                         f"{tuple(v.shape)}; pass class labels of shape ({v.shape[0]},) or "
                         f"{'one-hot rows' if loss == 'cross_entropy' else 'targets'} shaped like "
                         "the output")
    return y.to(v.dtype)


def output_error(v, target, loss):
    """e_L and the loss value: softmax(v) - onehot(y) with the mean cross-entropy, or v - y with
    the mean squared error. Token logits (B, T, V) average over the tokens as F.cross_entropy
    does: a token whose target row is zero (an ignored label) gets no error, and the others'
    errors are scaled by B / (tokens kept), so that the updates (averaged over the batch) are
    averages over the tokens."""
    if loss == "cross_entropy":
        log_p = torch.log_softmax(v, dim=-1)
        e = log_p.exp() - target
        value = -(target * log_p).sum()
        if v.dim() > 2:
            keep = target.sum(-1, keepdim=True) != 0
            kept = keep.sum().clamp(min=1)
            return e * keep * (v.shape[0] / kept), value / kept
        value = value / v.shape[0]
    else:
        e = v - target
        value = F.mse_loss(v, target)
    return e, value


LOW_PRECISION = (torch.bfloat16, torch.float16)


def error_neurons(phi, h, z, d, beta, alpha, kappa):
    """(target, error) of an inner site: y = phi(h - beta d) and e = inner_error(z, y). ``phi``
    is None for an identity site. In bfloat16 or float16, z - y would cancel to rounding noise
    (beta d is far smaller than z), so both are computed in float32 from h: e is then exact to
    float32 for the bf16 h the forward produced."""
    if z.dtype in LOW_PRECISION:
        h, d = h.float(), d.float()
        z = h if phi is None else phi(h)
    pre = torch.sub(h, d, alpha=beta)
    y = pre if phi is None else phi(pre)
    return y, inner_error(z, y, alpha, kappa)


def inner_error(z, y, alpha, kappa):
    """e = kappa * (alpha * (z - y) + (1 - alpha) * sign(z - y))."""
    diff = z - y
    if alpha != 1.0:
        diff = alpha * diff + (1.0 - alpha) * torch.sign(diff)
    return diff if kappa == 1.0 else kappa * diff


def reproject_all(updates, clip, norms=None):
    """Re-project every update in place with multi-tensor ops: one norm pass (skipped when the
    stacked ``norms`` are given), one scale pass (the scales are computed on one small vector)."""
    if clip is None or not updates:
        return updates
    if norms is None:
        norms = torch.stack(torch._foreach_norm(updates))
    scales = torch.where(norms > 0, clip / norms, torch.ones_like(norms)).clamp_(max=1.0)
    torch._foreach_mul_(updates, list(scales.to(updates[0].dtype).unbind()))
    return updates


def reproject_known(updates, clip, norms):
    """``reproject_all`` with the norms already on the host (floats): only the updates outside
    the ball are scaled, in one multi-tensor pass."""
    if clip is None:
        return updates
    outside = [(u, clip / n) for u, n in zip(updates, norms) if n > clip]
    if outside:
        torch._foreach_mul_([u for u, _ in outside], [s for _, s in outside])
    return updates


def accumulate_grads(params, updates, copy=False):
    """Write updates into ``.grad``, adding (one multi-tensor pass) where a gradient is there.
    ``copy``: a new ``.grad`` never shares memory with its update (a replayed graph's output)."""
    grads, additions = [], []
    for p, u in zip(params, updates):
        if p.grad is None:
            p.grad = u.to(p.dtype, copy=copy)
        else:
            grads.append(p.grad)
            additions.append(u.to(p.grad.dtype))
    if grads:
        torch._foreach_add_(grads, additions)
