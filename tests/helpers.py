"""Comparisons shared by the test files, each with a row of ``tolerances.TOLERANCES``.

    close(got, want, tol, what)                  one tensor pair
    assert_updates_match(got, want, tol)          two {parameter name: update} dicts, key by key
    assert_matches_reference(prog, x, y, tol)     prog.updates against prog.reference_updates

A failure names the parameter (or ``what``), the worst absolute difference and where it is, and
the row of the table it was held to.
"""
import torch

from tolerances import TOLERANCES


def _worst(got, want):
    """'worst |got - want| = ... at index ...', or why there is none."""
    try:
        diff = (got.detach().double().cpu() - want.detach().double().cpu()).abs()
    except RuntimeError as exc:                  # shapes that do not broadcast
        return f"no difference ({exc})"
    if diff.numel() == 0:
        return "no entries"
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    k = int(diff.flatten().argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(k), diff.shape))
    return f"worst |got - want| = {diff.flatten()[k].item():.3e} at index {index}"


def close(got, want, tol, what="", scale=None):
    """torch.testing.assert_close with the tolerance row ``tol``; ``scale`` divides both tensors
    first (by default, for a row with ``relative`` set, the largest ``|want|`` entry floored at
    its ``relative.floor``; assert_updates_match also applies its ``relative.share``)."""
    t = TOLERANCES[tol]
    if scale is None and t.relative:
        scale = max(want.detach().abs().max().item() if want.numel() else 0.0, t.relative.floor,
                    1e-30)
    if scale is not None:
        got, want = got / scale, want / scale
    scaled = "" if scale is None else f" (both divided by {scale:.3e})"
    torch.testing.assert_close(
        got, want, rtol=t.rtol, atol=t.atol,
        msg=lambda m: f"{what}: {_worst(got, want)}{scaled}; tolerance {tol!r} "
                      f"(rtol={t.rtol}, atol={t.atol}: {t.reason})\n{m}")


def _scales(want, relative):
    largest = max((w.detach().abs().max().item() for w in want.values() if w.numel()),
                  default=0.0)
    floor = max(relative.floor, relative.share * largest)
    return {k: max(w.detach().abs().max().item() if w.numel() else 0.0, floor)
            for k, w in want.items()}


def assert_updates_match(got, want, tol, names=None):
    """Both dicts hold the same parameters (``names`` when given) and every update of ``got``
    is within ``tol`` of ``want``'s."""
    assert set(got) == set(want), ("parameters only in got", set(got) - set(want),
                                   "only in want", set(want) - set(got))
    if names is not None:
        assert set(want) == set(names), set(want) ^ set(names)
    relative = TOLERANCES[tol].relative
    scales = _scales(want, relative) if relative else {}
    for name in want:
        close(got[name], want[name], tol, name, scales.get(name))


def assert_matches_reference(prog, x, y, tol="float64", *, seed=None):
    """Runs ``prog.updates(x, y)`` and then ``prog.reference_updates(x, y)`` (each after
    ``torch.manual_seed(seed)`` when a seed is given, so that dropout and drop-path draw the same
    masks) and checks that both give an update for every trainable parameter and that they agree
    within ``tol``. Returns (updates, reference)."""
    if seed is not None:
        torch.manual_seed(seed)
    updates = prog.updates(x, y)
    if seed is not None:
        torch.manual_seed(seed)
    reference = prog.reference_updates(x, y)
    trainable = [n for n, p in prog.named_parameters() if p.requires_grad]
    assert_updates_match(updates, reference, tol, trainable)
    return updates, reference
