"""What holds rec-LRA back on pResNet-18 and the locally connected CNN? A probe beside the
learning benchmark (``benchmarks/learning.py``: same models, digits, Adam lr 1e-3, batch 32,
re-projection radius 1, 5 epochs, seeds, batch order).

The update program here is the reference interpreter's (``prog.reference_signals``), so that a
row can change one thing about the error synapses or the updates:

- ``default``: fxlra's defaults, the error synapses trained by the optimizer (as in learning.py);
- ``lsq``: every error synapse fitted in closed form instead, by least squares on running
  (EMA 0.99) normal equations of its input error and its bootstrap target c (the best linear
  synapse given the batches before the step, free of Adam's per-weight step noise);
- ``lsq-top``: only the synapse into the site the output reads fitted so (its c is exactly the
  head's backward), the others by the optimizer;
- ``top-only``: fxlra's defaults, but only the top site's and the head's parameters updated:
  what the lower sites' rec-LRA updates are worth;
- ``oracle-top``: the top synapse set to the head's transposed weight before every step, the
  exact map it stands in for (models whose head is one Linear reading the flattened top site).

It prints a table (test accuracy after each epoch, the median update angle per inner site after
the last epoch) and writes benchmarks/results/cnn_probe.json.

    python3 benchmarks/cnn_probe.py                          # lcnet, presnet18, resnet18; seeds 0 1
    python3 benchmarks/cnn_probe.py --models lcnet --rows default oracle-top --seeds 0 1 2
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

import fxlra
from fxlra.data import load_digits
from fxlra.semantics import synapses as syn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import learning  # noqa: E402

RESULTS = os.path.join(learning.HERE, "results", "cnn_probe.json")
ROWS = ("default", "lsq", "lsq-top", "top-only", "oracle-top")
TOP_SITE = {"lcnet": "features_5", "presnet18": "layer4_1_relu_1", "resnet18": "layer4_1_relu_1"}


class LeastSquares:
    """Closed-form error synapses: W = A (M + lam I)^-1 from running A = E[c e^T] (in the
    synapse kind's layout, by its own weight-gradient rule) and M = E[e e^T] over what each
    weight row sees (the batch, and for a map the positions one row covers)."""

    def __init__(self, prog, edges, rho=0.99, lam=1e-3):
        self.prog, self.edges, self.rho, self.lam, self.stats = prog, edges, rho, lam, {}

    def update(self, sig):
        for edge in self.edges:
            c = sig.bootstrap.get(edge.child)
            if c is None:
                continue
            module = self.prog.synapses[edge.key]
            e = sig.errors[edge.parent].detach()
            flat = e.reshape(e.shape[0], -1)
            if module.kind not in ("spatial", "broadcast", "dense"):
                raise SystemExit(f"the probe fits dense, spatial and broadcast synapses, not "
                                 f"{edge.key}'s {module.kind!r}")
            cover = {"spatial": c[0, 0].numel() / max(1, math.prod(module.grid or (1,))),
                     "broadcast": c[0].numel() / c.shape[1], "dense": 1.0}[module.kind]
            a, m = syn.weight_grads(module, e, c)[0], cover * flat.t() @ flat
            a_run, m_run = self.stats.setdefault(edge.key, (torch.zeros_like(a),
                                                            torch.zeros_like(m)))
            a_run.mul_(self.rho).add_(a, alpha=1 - self.rho)
            m_run.mul_(self.rho).add_(m, alpha=1 - self.rho)
            ridge = self.lam * m_run.diagonal().mean().clamp_min(1e-30)
            eye = torch.eye(m.shape[0], dtype=m.dtype)
            module.weight.data.copy_(torch.linalg.solve(m_run + ridge * eye, a_run.t()).t())


def run(model_name, row, seed, epochs, data):
    model, extra, (x_train, y_train, x_test, y_test) = learning.cell(model_name, seed, data)
    prog = fxlra.compile(model, **extra, example_inputs=(x_train[:2],))
    top = TOP_SITE[model_name]
    fitted = {"lsq": list(prog.plan.edges),
              "lsq-top": [e for e in prog.plan.edges if e.child == top]}.get(row, [])
    lsq = LeastSquares(prog, fitted)
    learned = [e for e in prog.plan.edges if e not in fitted]
    groups = [{"params": list(model.parameters())},
              {"params": [p for e in learned for p in prog.synapses[e.key].parameters()]}]
    opt = torch.optim.Adam(groups, lr=1e-3)
    head = prog.plan.outputs[0]
    kept = {r.param for r in prog.plan.params if row != "top-only" or r.site in (top, head)}
    oracle = next((e for e in prog.plan.edges if e.child == top and e.parent == head), None)
    named = dict(model.named_parameters())
    order = torch.Generator().manual_seed(seed)
    history, start = [], time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(x_train), generator=order)
        for k in range(0, len(x_train), 32):
            idx = perm[k:k + 32]
            if row == "oracle-top":
                prog.synapses[oracle.key].weight.data.copy_(model.fc.weight.t())
            sig = prog.reference_signals(x_train[idx], y_train[idx])
            params = [named[n] for n in sig.params if n in kept]
            updates = [sig.params[n].clone() for n in sig.params if n in kept]
            for e in learned:
                for n, u in sig.synapses[e.key].items():
                    params.append(dict(prog.synapses[e.key].named_parameters())[n])
                    updates.append(u.clone())
            fxlra.rules.reproject_all(updates, 1.0)
            for p, u in zip(params, updates):
                p.grad = u
            opt.step()
            opt.zero_grad(set_to_none=True)
            lsq.update(sig)
        history.append(learning._accuracy(model, x_test, y_test))
    angles = learning._angles(prog, model, x_train[:256], y_train[:256])
    return {"model": model_name, "row": row, "seed": seed, "accuracy": history,
            "angles": angles, "seconds": time.perf_counter() - start}


def probe_table(cells, rows, angle_head, angle_cell):
    """Markdown: per model and row, the mean accuracy after each epoch, the last epoch's per
    seed, and ``angle_cell(cells of the row)`` under ``angle_head``."""
    out = ["| model | row | accuracy after each epoch (mean over seeds) | last epoch, per seed "
           f"| {angle_head} |", "|---|---|---|---|---|"]
    for model_name in dict.fromkeys(c["model"] for c in cells):
        for row in rows:
            mine = [c for c in cells if c["model"] == model_name and c["row"] == row]
            if not mine:
                continue
            curve = " / ".join(f"{statistics.mean(v):.1f}"
                               for v in zip(*(c["accuracy"] for c in mine)))
            last = ", ".join(f"{c['accuracy'][-1]:.1f}" for c in mine)
            out.append(f"| {model_name} | {row} | {curve} | {last} | {angle_cell(mine)} |")
    return "\n".join(out)


def table(cells):
    return probe_table(cells, ROWS, "update angle per inner site, last epoch (deg, mean)",
                       lambda mine: ", ".join(
                           f"{s} {statistics.mean(c['angles'][s] for c in mine):.0f}"
                           for s in mine[0]["angles"]))


def probe_main(argv, description, models, rows, results, run, table, skip=None):
    """The probes' command line: train every (model, row, seed) cell with ``run`` (``skip``:
    cells that do not apply), write the cells to ``results`` after each, print ``table``;
    ``--table`` prints the stored one."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--models", nargs="+", default=list(models), choices=sorted(models))
    p.add_argument("--rows", nargs="+", default=list(rows), choices=list(rows))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--table", action="store_true", help="print the stored table and stop")
    args = p.parse_args(argv)
    if args.table:
        with open(results) as f:
            print(table(json.load(f)["cells"]))
        return
    torch.set_num_threads(args.threads)
    data, cells = load_digits(), []
    for model_name in args.models:
        for row in args.rows:
            if skip is not None and skip(model_name, row):
                continue
            for seed in args.seeds:
                cells.append(run(model_name, row, seed, args.epochs, data))
                print(f"{model_name} {row} seed {seed}: {cells[-1]['accuracy']}", flush=True)
                with open(results, "w") as f:
                    json.dump({"cells": cells}, f, indent=1)
    print(table(cells))


def main(argv=None):
    # oracle-top: the head must be one Linear on the flattened top site (the locally connected
    # CNN's)
    probe_main(argv, __doc__.split("\n\n")[0], ("lcnet", "presnet18", "resnet18"), ROWS,
               RESULTS, run, table, skip=lambda m, r: r == "oracle-top" and m != "lcnet")


if __name__ == "__main__":
    main()
