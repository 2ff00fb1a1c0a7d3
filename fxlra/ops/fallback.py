"""The fallback for an op without an explicit rule: ``torch.func``'s VJP of that one op at its
recorded inputs (autograd's where the op mutates a tensor it captures), for the error carried
through it (``local_vjp``) or its parameters' weight-gradient (``module_param_vjp``).
``prog.explain()`` names the rule of such an op "local-vjp" and ``prog.fallbacks`` lists it.
"""
import functools
import re

import torch
import torch.nn.functional as F

from ..errors import UnsupportedError


def add_cotangents(a, b):
    """The sum of two cotangents of one tuple-valued op, each {index: cotangent} (nested as
    deep as the op's tuples), as from two ``getitem`` users inside one region."""
    if not isinstance(a, dict):
        return a + b
    merged = dict(a)
    for k, v in b.items():
        merged[k] = add_cotangents(merged[k], v) if k in merged else v
    return merged


def _cotangent_like(out, cot):
    """A cotangent for ``out``; tuple-valued ops carry theirs as {index: cotangent}, nested as
    deep as the tuples are (an LSTM's ``(output, (h, c))``); an unreached part gets zeros."""
    if isinstance(out, (tuple, list)):
        parts = {}          # by position: spx[-1] and spx[1] of a pair are the same part
        for k, c in (cot.items() if isinstance(cot, dict) else ()):
            k = k % len(out)
            parts[k] = add_cotangents(parts[k], c) if k in parts else c
        return tuple(_cotangent_like(o, parts[k]) if k in parts else _zeros_like(o)
                     for k, o in enumerate(out))
    return cot


def _zeros_like(out):
    if isinstance(out, (tuple, list)):
        return tuple(_zeros_like(o) for o in out)
    return torch.zeros_like(out)


def _tensors_only(out):
    """An op's output for torch.func, nested tuples included: a None in a tuple (attention
    without weights) or an integer tensor (the indices of torch.sort) becomes a constant that
    no cotangent reaches."""
    if isinstance(out, (tuple, list)):
        return tuple(_tensors_only(o) for o in out)
    differentiable = isinstance(out, torch.Tensor) and (out.is_floating_point() or
                                                        out.is_complex())
    return out if differentiable else torch.zeros(())


def _under_func(name, run):
    """Run one op inside a torch.func transform. It already ran in the forward on the same
    inputs, so a RuntimeError here is torch.func's: the op reads tensor storage (numpy,
    ``data_ptr``), which torch.func's wrapped tensors do not have."""
    try:
        return run()
    except RuntimeError as exc:
        if _MUTATES_CAPTURED.search(str(exc)):
            raise _MutatesCaptured() from exc
        raise UnsupportedError(
            f"{name} has no rule of its own, and torch.func cannot differentiate it (torch.func "
            f"said: {exc}); it probably leaves torch (numpy, data_ptr). Fix: write it with torch "
            "ops, or move it off the path between a parametrised op and its site") from exc


_NOT_DIFFERENTIABLE = re.compile(r"derivative for \S+ is not implemented")
_MUTATES_CAPTURED = re.compile(r"in-place operation .* captured Tensor", re.S)


class _MutatesCaptured(Exception):
    """The op writes in place into a tensor it closes over (a leaf module that updates its own
    state, adds into a temporary): torch.func refuses, autograd does not."""


def _vjp(name, fn, primals, cot):
    """VJP of ``fn`` at ``primals`` (a tuple of tensors or of dicts of them) for ``cot``:
    torch.func's, or autograd's when the op mutates a tensor it captures."""
    try:
        out, pullback = torch.func.vjp(fn, *primals)
        return _pull(name, pullback, _cotangent_like(out, cot))
    except _MutatesCaptured:
        leaves, spec = torch.utils._pytree.tree_flatten(primals)
        with torch.enable_grad():
            wanted = [p.detach().requires_grad_() for p in leaves]
            out = fn(*torch.utils._pytree.tree_unflatten(wanted, spec))
            outs, cots = _differentiable_pairs(out, _cotangent_like(out, cot))
            grads = torch.autograd.grad(outs, wanted, cots, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(wanted, grads)]
        return torch.utils._pytree.tree_unflatten(grads, spec)


def _differentiable_pairs(out, cot):
    """(output, cotangent) pairs of the outputs that autograd can differentiate."""
    outs = torch.utils._pytree.tree_leaves(out)
    cots = torch.utils._pytree.tree_leaves(cot)
    pairs = [(o, c) for o, c in zip(outs, cots) if isinstance(o, torch.Tensor) and o.requires_grad]
    return [o for o, _ in pairs], [c for _, c in pairs]


def _pull(name, pullback, cot):
    """Apply a torch.func pullback; an op without a derivative (floor division) is named."""
    try:
        return pullback(cot)
    except RuntimeError as exc:
        if not _NOT_DIFFERENTIABLE.search(str(exc)):
            raise
        raise UnsupportedError(
            f"{name} is not differentiable (torch said: {exc}), so no error can be carried back "
            "through it. Fix: apply an activation before it (its input becomes a site and no "
            "error crosses it), or write it with differentiable ops") from exc


def _tensor_free(v):
    return isinstance(v, (tuple, list)) and len(v) > 0 and not any(
        isinstance(t, torch.Tensor) for t in torch.utils._pytree.tree_leaves(v))


def local_vjp(fn, args, kwargs, cot, wrt):
    """The fallback for ops with no explicit rule: torch.func's VJP of this one op at its
    recorded inputs, for the leaves of ``(args, kwargs)`` at the flat positions ``wrt``."""
    # a tensor-free tuple or list (a constant size, or one an earlier op returned) is one leaf,
    # as in the traced arguments whose flat positions ``wrt`` counts
    leaves, spec = torch.utils._pytree.tree_flatten((_unwritten(fn, args), kwargs),
                                                    is_leaf=_tensor_free)

    def partial(*chosen):
        full = list(leaves)
        for k, v in zip(wrt, chosen):
            full[k] = v
        a, kw = torch.utils._pytree.tree_unflatten(full, spec)
        return _under_func(name, lambda: _tensors_only(fn(*a, **kw)))
    name = f"op {getattr(fn, 'name', fn)}"
    return list(_vjp(name, partial, tuple(leaves[k] for k in wrt), cot))


# ops that write into some of their positional tensors without their schema saying so: the
# running statistics of a normalisation in training mode
_WRITES = {torch.ops.aten.batch_norm.default: (3, 4), torch.ops.aten.instance_norm.default: (3, 4),
           F.batch_norm: (1, 2), F.instance_norm: (1, 2)}


@functools.lru_cache(maxsize=None)
def _schema_writes(op):
    """The positional arguments an ATen op's schema marks as written into (cached: the schema
    scan would otherwise run on every VJP)."""
    return frozenset(k for k, a in enumerate(op._schema.arguments)
                     if a.alias_info is not None and a.alias_info.is_write)


def _written_positions(fn):
    """The positional arguments ``fn`` writes into: the table's, and those its schema marks."""
    table = frozenset(_WRITES.get(fn, ())) if callable(fn) else frozenset()
    return table | _schema_writes(fn) if hasattr(fn, "_schema") else table


def _unwritten(fn, args):
    """``args`` with a copy of each tensor the op writes into (its running statistics): the
    forward already updated them once, and the VJP's second run must not again."""
    written = _written_positions(getattr(fn, "target", fn))    # an OpCall: the function it calls
    if not written:
        return args
    return [a.clone() if k in written and isinstance(a, torch.Tensor) else a
            for k, a in enumerate(args)]


def module_param_vjp(module, args, kwargs, cot):
    """The fallback weight-gradient of a module with no explicit rule (buffers are copied, so
    the module's running statistics do not change)."""
    params = dict(module.named_parameters())
    buffers = {n: b.clone() for n, b in module.named_buffers()}

    def call(p):
        return _under_func(name, lambda: _tensors_only(
            torch.func.functional_call(module, {**p, **buffers}, tuple(args), kwargs)))
    name = f"module {type(module).__name__}"
    (grads,) = _vjp(name, call, (params,), cot)
    return grads
