"""Placing independent error subtrees on different devices (``fxlra.compile(devices=[...])``).

A depth-1 site and the sites whose error comes only through it form a subtree of the error graph
that needs nothing from the other subtrees: its displacements, targets, errors and error-synapse
updates can run on another device while the rest of the step goes on. The model, its forward and
the forward-weight updates stay on the first device (home, where the model is); each subtree's
error synapses live on its device, and the generated program copies a value between devices once,
where a statement needs it (``err_x__on1 = err_x.to(DEVICES[1], non_blocking=True)``).

Subtrees are assigned greedily, largest first, to the least-loaded device, with the cost of a
site being its number of features per sample (what its error stage reads and writes).
"""
import torch

from ..errors import OptionError


def check_devices(devices):
    """The devices as ``torch.device``s (the first is home); OptionError when unusable."""
    if devices is None:
        return None
    if isinstance(devices, (str, torch.device)) or not len(devices):
        raise OptionError(f"devices= takes a non-empty list of devices, the model's first, got "
                          f"{devices!r}")
    try:
        return [torch.device(d) for d in devices]
    except (RuntimeError, TypeError) as exc:
        raise OptionError(f"devices= has an entry torch does not know: {exc}") from None


def subtrees(plan):
    """{depth-1 site: [its sites]}: every non-output site below the output sites belongs to the
    subtree of the first of its parents in error-graph order."""
    owner, trees = {}, {}
    for site in plan.error_order():
        if site in plan.outputs:
            continue
        parents = plan.parents(site)
        root = site if any(p in plan.outputs for p in parents) else owner[parents[0]]
        owner[site] = root
        trees.setdefault(root, []).append(site)
    return trees


def place(plan, sizes, n_devices):
    """{site: device index} for the sites moved off home (index 0); ``sizes`` maps a site to
    its cost (features per sample)."""
    if n_devices < 2:
        return {}
    trees = subtrees(plan)
    load = [sum(sizes.get(s, 0) for s in plan.outputs)] + [0] * (n_devices - 1)
    where = {}
    for root, sites in sorted(trees.items(), key=lambda kv: -sum(sizes[s] for s in kv[1])):
        k = min(range(n_devices), key=lambda d: (load[d], d))
        load[k] += sum(sizes[s] for s in sites)
        where.update({s: k for s in sites if k})
    return where
