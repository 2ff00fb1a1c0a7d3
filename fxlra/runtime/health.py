"""Numerical health of a step: nothing changes unless the whole step is finite.

``prog.step`` snapshots the buffers its forward mutates (running statistics of normalisation
layers), runs the update program, and checks the loss, every error and every update with one
fused test on their norms. A non-finite value restores the buffers and, by the program's
``nonfinite`` option, raises :class:`~fxlra.errors.NumericalError` naming the step and the first
site in the order of the error graph where it appeared, or skips the step (up to ``max_skips``
in a row). A forward that fails on a batch unlike the one the program was compiled for becomes
an :class:`~fxlra.errors.InputError` naming the difference.
"""
import math

import torch
from torch import nn

from ..errors import InputError, NumericalError

# nonfinite option -> whether the step checks, and what it does when a value is not finite
NONFINITE = {"raise": "raise", "skip": "skip", "unchecked": None}

# module types whose forward writes into their own buffers in train mode
MUTATING = (nn.modules.batchnorm._NormBase,)


def mutable_buffers(model):
    """The buffers a forward in train mode may write (normalisation layers' running stats)."""
    return [b for m in model.modules() if isinstance(m, MUTATING) and m.training
            for b in m.buffers(recurse=False)]


class BufferSnapshot:
    """Copies of the mutable buffers, restorable in place."""

    def __init__(self, buffers):
        self.buffers = buffers
        self.saved = [b.clone() for b in buffers]

    def restore(self):
        with torch.no_grad():
            for b, s in zip(self.buffers, self.saved):
                b.copy_(s)


def host_norms(loss, error_norms, update_norms):
    """One host sync: the loss, then every error norm, then every update norm, as floats."""
    parts = [loss.detach().reshape(1).double(), error_norms.double()]
    if update_norms is not None:
        parts.append(update_norms.double())
    return torch.cat(parts).tolist()


def finite(values):
    """Whether every host value (from ``host_norms``) is finite."""
    return all(map(math.isfinite, values))


def first_bad_site(plan, loss, errors, error_norms, names, updates, update_norms):
    """(site, what) for the first non-finite value, or finite tensor whose norm overflows, in
    the error graph's order."""
    if not torch.isfinite(loss).all():
        return plan.outputs[0], "the loss"
    owner = {f"model.{r.param}": r.site for r in plan.params}
    owner.update({f"synapses.{e.key}.": e.child for e in plan.edges})

    def site_of(name):
        return owner.get(name) or next(s for k, s in owner.items() if name.startswith(k))

    bad = {}
    for name, u, norm in zip(names, updates, update_norms if updates else ()):
        if not torch.isfinite(norm):
            what = "the update" if not torch.isfinite(u).all() else "the norm of the update"
            bad.setdefault(site_of(name), f"{what} of {name}")
    for (site, e), norm in zip(errors.items(), error_norms):
        if not torch.isfinite(norm):
            bad[site] = "its error" if not torch.isfinite(e).all() else "the norm of its error"
    for site in plan.error_order():
        if site in bad:
            return site, bad[site]
    raise AssertionError("a norm was not finite but no value was")


def nonfinite_error(step, site, what, skipped=0):
    after = f" (after {skipped} skipped steps in a row, the limit max_skips)" if skipped else ""
    return NumericalError(
        f"step {step}: {what} at site {site!r} is not finite (NaN or infinity){after}; nothing "
        "was changed. Lower the learning rate or beta, check the inputs, or compile with "
        "nonfinite='skip' to skip such steps")


def input_mismatch(placeholder_meta, x, exc):
    """An InputError when ``x`` differs from the compile-time example in dtype or non-batch
    shape, else None (the failure is not the input's)."""
    if placeholder_meta is None or not isinstance(x, torch.Tensor):
        return None
    want_shape, want_dtype = tuple(placeholder_meta.shape), placeholder_meta.dtype
    got_shape = tuple(x.shape)
    diffs = []
    if len(got_shape) != len(want_shape):
        diffs.append(f"{len(got_shape)} dimensions instead of {len(want_shape)}")
    elif got_shape[1:2] != want_shape[1:2]:
        diffs.append(f"{got_shape[1] if len(got_shape) > 1 else None} channels/features instead "
                     f"of {want_shape[1] if len(want_shape) > 1 else None}")
    if x.dtype != want_dtype:
        diffs.append(f"dtype {x.dtype} instead of {want_dtype}")
    if not diffs:
        return None
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return InputError(
        f"the model's forward failed on inputs of shape {got_shape} and dtype {x.dtype} "
        f"({'; '.join(diffs)}; the program was compiled for inputs like "
        f"{('B',) + want_shape[1:]} {want_dtype}): {first}. Nothing was changed")
