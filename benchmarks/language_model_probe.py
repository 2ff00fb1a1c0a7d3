"""Which error can train the lower GPT-2 block? A probe beside the language-model benchmark.

rec-LRA gives the first transformer block (and the embedding below it) an error that its error
synapse computes from the output error at the same token: a linear map of ``softmax(v) - y``.
This probe trains the benchmark's model by backprop, except that the gradient arriving at block
0's output is replaced (everything below it, the embedding included, then gets that error):

- ``bp``: unchanged;
- ``bp-noise``: plus random noise orthogonal to it, 30 degrees off, fresh every step;
- ``bp-fit-batch``: the least-squares fit of the gradient by a linear map of the same token's
  output error, fitted on the same batch (what no synapse can know before the step);
- ``bp-fit-running``: the same fit from running (EMA 0.9) normal equations of the batches
  before: the best per-token linear error synapse, fitted before the step as a synapse is;

and against it rec-LRA (fxlra's default options) as trained, and rec-LRA with block 0 and the
position embedding given no updates. Every row: the same model, initial weights, Adam and
token windows as ``benchmarks/language_model.py``.

    python3 benchmarks/language_model_probe.py                  # 600 steps per row
    python3 benchmarks/language_model_probe.py --steps 200 --rows bp bp-fit-running
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

import fxlra

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import language_model as lm  # noqa: E402

RESULTS = os.path.join(lm.HERE, "results", "language_model_probe.json")
ROWS = ("bp", "bp-noise", "bp-fit-batch", "bp-fit-running", "rec-lra", "rec-lra-frozen-block0")


class _Replace:
    """Replaces the gradient at block 0's output with the chosen error (a tensor hook)."""

    def __init__(self, row, vocab):
        self.row, self.vocab, self.e_out, self.normal, self.weight = row, vocab, None, None, None
        self.cosines = []

    def __call__(self, module, inputs, out):
        h = out[0] if isinstance(out, tuple) else out
        if h.requires_grad and self.row != "bp":
            h.register_hook(self.error)

    def error(self, g):
        e = self.e_out.reshape(-1, self.vocab).double()
        flat = g.reshape(-1, g.shape[-1]).double()
        if self.row == "bp-noise":
            n = torch.randn_like(flat)
            n = n - (n * flat).sum() / (flat * flat).sum() * flat
            out = flat + n * (flat.norm() / n.norm() * torch.tan(torch.tensor(0.5236)))
        elif self.row == "bp-fit-batch":
            out = e @ torch.linalg.lstsq(e, flat).solution
        else:                                   # bp-fit-running: the fit of the batches before
            out = torch.zeros_like(flat) if self.weight is None else e @ self.weight
            stats = (e.T @ e, e.T @ flat)
            if self.normal is not None:
                stats = tuple(0.9 * a + 0.1 * b for a, b in zip(self.normal, stats))
            self.normal = stats
            ridge = 1e-3 * stats[0].diagonal().mean() * torch.eye(self.vocab, dtype=e.dtype)
            self.weight = torch.linalg.solve(stats[0] + ridge, stats[1])
        self.cosines.append(float(F.cosine_similarity(out.flatten(), flat.flatten(), 0)))
        return out.to(g.dtype).view_as(g)


def run(row, args, data):
    train, held_x, held_y = data
    model = lm.make_model(args, args.seed)
    params = dict(model.named_parameters())
    prog = replace = None
    if row.startswith("rec-lra"):
        prog = fxlra.compile(model, example_inputs=held_x[:2])
        params = dict(prog.named_parameters())
    else:
        replace = _Replace(row, 256)
        model.transformer.h[0].register_forward_hook(replace)
    frozen = [p for n, p in params.items() if ".h.0." in n or "wpe" in n] \
        if row == "rec-lra-frozen-block0" else []
    opt = torch.optim.Adam(params.values(), lr=args.lr)
    order = torch.Generator().manual_seed(args.seed)
    curve, start = [], time.time()
    for step in range(args.steps + 1):
        if step % args.every == 0:
            curve.append(lm.held_out_loss(model, held_x, held_y))
        if step == args.steps:
            break
        starts = torch.randint(0, len(train) - args.context - 1, (args.batch,), generator=order)
        x, y = lm.windows(train, starts, args.context)
        if prog is not None:
            prog.step(x, y)
        else:
            logits = model(x)[0]
            with torch.no_grad():       # the output error, as F.cross_entropy's mean scales it
                replace.e_out = (logits.softmax(-1) - F.one_hot(y, 256)) / y.numel()
            F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
        for p in frozen:
            p.grad = None
        opt.step()
        opt.zero_grad(set_to_none=True)
    cos = replace.cosines[len(replace.cosines) // 2:] if replace and replace.cosines else []
    return {"row": row, "held_out_loss": curve, "seconds": time.time() - start,
            "angle_to_gradient": (float(torch.tensor(cos).mean().clamp(-1, 1).acos().rad2deg())
                                  if cos else None)}


def table(results, unigram, every):
    steps = [k * every for k in range(len(results[0]["held_out_loss"]))]
    lines = ["| row | " + " | ".join(f"step {s}" for s in steps) +
             " | angle at block 0 (2nd half) |", "|" + "---|" * (len(steps) + 2)]
    for r in results:
        angle = "" if r["angle_to_gradient"] is None else f"{r['angle_to_gradient']:.0f}"
        lines.append(f"| {r['row']} | " + " | ".join(f"{v:.3f}" for v in r["held_out_loss"]) +
                     f" | {angle} |")
    lines.append(f"| unigram baseline | {unigram:.3f} | |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--every", type=int, default=200)
    lm.add_model_args(p, RESULTS)
    args = p.parse_args(argv)
    train, _, held_x, held_y, unigram, _ = lm.setup(args)
    results = []
    for row in args.rows:
        results.append(run(row, args, (train, held_x, held_y)))
        print(f"{row}: {results[-1]['held_out_loss']}", file=sys.stderr, flush=True)
    print(table(results, unigram, args.every))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"settings": vars(args), "unigram": unigram, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
