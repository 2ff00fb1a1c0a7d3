"""Diagnostics of a compiled program on one batch: how far rec-LRA's updates point from
backprop's gradients (the paper's Figure 3), the per-site discrepancies, and the norms of the
weights and error synapses, as plain floats for logging.

    angles(prog, x, y)         {"model.<param>": degrees}   update vs gradient, per parameter
    site_angles(prog, x, y)    {site: degrees}              a site's parameters taken together
    discrepancies(prog, x, y)  {site: ||e_i||^2 / B}        without a step
    weight_norms(prog)         {"model.<param>": ||W||_F}
    synapse_norms(prog)        {"synapses.<key>.<param>": ||E||_F}
    report(prog, x, y)         one flat dict of floats (JSON-ready) with all of the above
    angle(a, b)                degrees between two tensors of the same size

The gradient is backprop's on the same batch and the same loss: autograd through the model for
the sum over output sites of ``rules.output_error``'s loss (the mean cross-entropy, or
``F.mse_loss`` for ``loss="mse"``), so an output layer's update (``e_L = softmax(v) - onehot(y)``
or ``v - y``) points exactly along its gradient: angle 0. Angles lie in [0, 180]; 90 means
orthogonal, and the paper's claim is that rec-LRA stays below it. An angle is NaN where either
vector is zero: with ``beta=0`` every inner error is zero, so every inner update is, and its
angle is undefined (``report``'s ``angle/mean`` averages the defined ones).

Nothing here changes the program: parameters and ``.grad`` are never written (gradients come
from ``torch.autograd.grad``), every buffer (BatchNorm running statistics, counters) is restored
after each forward, and the random-number generators are reset before each forward and restored
at the end, so rec-LRA and backprop see the same dropout masks and training continues exactly as
it would have. Each call runs forwards of its own: ``angles`` two (the update program and
backprop), ``discrepancies`` one (the reference interpreter), ``report`` three, or two when
handed the ``StepResult`` of this batch.
"""
import math
from contextlib import contextmanager

import torch
from torch import fx

from .semantics import rules
from .errors import InputError

MODEL, SYNAPSES = "model.", "synapses."


# -- geometry -------------------------------------------------------------------------------------
def angle(a, b):
    """Angle in degrees between tensors ``a`` and ``b`` taken as flat vectors, in [0, 180];
    NaN if either is zero or not finite. Computed in float64 as
    ``2 atan2(|a/|a| - b/|b||, |a/|a| + b/|b||)``, which stays exact near 0 and 180."""
    a, b = a.detach().reshape(-1).double(), b.detach().reshape(-1).to(a.device, torch.float64)
    if a.numel() != b.numel():
        raise InputError(f"angle needs two tensors of the same size, got {a.numel()} and "
                         f"{b.numel()} elements")
    norm_a, norm_b = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    if not (torch.isfinite(norm_a) and torch.isfinite(norm_b)) or norm_a == 0 or norm_b == 0:
        return math.nan
    a, b = a / norm_a, b / norm_b
    return math.degrees(2.0 * math.atan2(float(torch.linalg.vector_norm(a - b)),
                                         float(torch.linalg.vector_norm(a + b))))


def _joint_angle(pairs):
    """The angle between the concatenations of the first and of the second tensors."""
    if not pairs:
        return math.nan
    return angle(torch.cat([u.reshape(-1).double() for u, _ in pairs]),
                 torch.cat([g.reshape(-1).double() for _, g in pairs]))


# -- leaving the program as it was ----------------------------------------------------------------
def _cuda_devices(prog):
    tensors = list(prog.parameters()) + list(prog.buffers())
    return sorted({t.device.index or 0 for t in tensors if t.is_cuda})


@contextmanager
def _unchanged(prog):
    """Yield ``reset``, which puts every buffer and random-number generator back as they were on
    entry; ``reset`` runs once more on exit, however the block ends."""
    saved = [(b, b.detach().clone()) for b in prog.buffers()]
    devices = _cuda_devices(prog)
    with torch.random.fork_rng(devices=devices):
        cpu = torch.get_rng_state()
        cuda = [torch.cuda.get_rng_state(d) for d in devices]

        def reset():
            with torch.no_grad():
                for buffer, value in saved:
                    buffer.copy_(value)
            torch.set_rng_state(cpu)
            for d, state in zip(devices, cuda):
                torch.cuda.set_rng_state(state, d)
        try:
            yield reset
        finally:
            reset()


# -- rec-LRA against backprop ---------------------------------------------------------------------
def _backprop(prog, x, y, names, values=()):
    """Backprop's gradient of the summed output losses for the parameters ``names`` (keyed like
    ``prog.named_parameters()``) and at the values of the nodes ``values``, and the primary
    output's loss. Writes no ``.grad``."""
    params = dict(prog.named_parameters())
    nodes = {n.name: n for n in prog.graph_module.graph.nodes}
    interp = fx.Interpreter(prog.graph_module, garbage_collect_values=False)
    with torch.enable_grad():
        interp.run(x)
        leaves = [params[n] for n in names] + [interp.env[nodes[v]] for v in values]
        losses = []
        for site in prog.plan.outputs:
            v = interp.env[nodes[site]]
            losses.append(rules.output_error(v, rules.targets_for(v, y, prog.options["loss"]),
                                             prog.options["loss"])[1])
        grads = torch.autograd.grad(sum(losses), leaves, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads)]
    return dict(zip(list(names) + list(values), grads)), losses[0].detach()


def _compare(prog, x, y):
    """rec-LRA's raw updates and backprop's gradients of every trained model parameter, from the
    same batch, buffers and random numbers; and the primary loss."""
    with _unchanged(prog) as reset:
        updates = prog.updates(x, y)
        reset()
        trained = {n for n, p in prog.named_parameters() if p.requires_grad}
        names = [n for n in updates if n.startswith(MODEL) and n in trained]
        grads, loss = _backprop(prog, x, y, names)
    return {n: updates[n] for n in names}, grads, loss


def _per_parameter(updates, grads):
    return {n: angle(updates[n], grads[n]) for n in updates}


def _per_site(prog, updates, grads):
    out = {}
    for site in prog.sites:
        names = [MODEL + r.param for r in prog.plan.rules_of(site) if MODEL + r.param in updates]
        if names:
            out[site] = _joint_angle([(updates[n], grads[n]) for n in names])
    return out


def angles(prog, x, y):
    """{"model.<param>": angle in degrees between its rec-LRA update (``prog.updates``) and
    backprop's gradient of the same loss on the same batch}; NaN where either is zero."""
    updates, grads, _ = _compare(prog, x, y)
    return _per_parameter(updates, grads)


def site_angles(prog, x, y):
    """{site: angle in degrees between all of the site's parameter updates, flattened together,
    and their gradients}, in forward order; sites that own no trained parameter are left out."""
    updates, grads, _ = _compare(prog, x, y)
    return _per_site(prog, updates, grads)


def error_angles(prog, x, y):
    """{inner site: angle in degrees between its error e_i, which its parameters' updates start
    from, and backprop's gradient of the loss at the site's value}: how well the error synapses
    stand in for the backward pass they replace (90 for a random synapse)."""
    inner = [s for s in prog.sites if s not in prog.plan.outputs]
    with _unchanged(prog) as reset:
        errors = prog.reference_signals(x, y).errors
        reset()
        grads, _ = _backprop(prog, x, y, (), inner)
    return {s: angle(errors[s], grads[s]) for s in inner}


# -- errors and norms -----------------------------------------------------------------------------
def discrepancies(prog, x, y):
    """{site: ||e_i||^2 averaged over the batch}, the values ``prog.step`` reports, computed by
    the reference interpreter without a step (no ``.grad``, buffer or counter changes)."""
    with _unchanged(prog):
        found = prog.reference_signals(x, y).discrepancies
    return {s: float(found[s]) for s in prog.sites if s in found}


def _norms(prog, prefix):
    return {n: float(torch.linalg.vector_norm(p.detach(), dtype=torch.float64))
            for n, p in prog.named_parameters() if n.startswith(prefix)}


def weight_norms(prog):
    """{"model.<param>": Frobenius norm} for every model parameter."""
    return _norms(prog, MODEL)


def synapse_norms(prog):
    """{"synapses.<parent>__to__<child>.<param>": Frobenius norm} for every error synapse."""
    return _norms(prog, SYNAPSES)


def _summary(values):
    """(max, mean) of the finite values, NaN for none."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return max(finite), sum(finite) / len(finite)


def report(prog, x, y, step=None):
    """Everything above as one flat dict of floats, keyed for logging:

        loss                   the primary output's loss
        angle/<site>           ``site_angles``; angle/mean the mean of the defined ones
        discrepancy/<site>     ``discrepancies``, or those of ``step``
        weight_norm/max, weight_norm/mean, synapse_norm/max, synapse_norm/mean

    ``step``, the ``StepResult`` of ``prog.step`` on this batch, supplies the discrepancies and
    saves the reference interpreter's pass. Undefined values are NaN (``json.dumps`` writes
    them as ``NaN``). Changes no state."""
    updates, grads, loss = _compare(prog, x, y)
    per_site = _per_site(prog, updates, grads)
    found = discrepancies(prog, x, y) if step is None else \
        {s: float(step.discrepancies[s]) for s in prog.sites if s in step.discrepancies}
    out = {"loss": float(loss)}
    out.update({f"angle/{s}": a for s, a in per_site.items()})
    out["angle/mean"] = _summary(per_site.values())[1]
    out.update({f"discrepancy/{s}": d for s, d in found.items()})
    for key, norms in (("weight_norm", weight_norms(prog)), ("synapse_norm", synapse_norms(prog))):
        out[f"{key}/max"], out[f"{key}/mean"] = _summary(norms.values())
    return out
