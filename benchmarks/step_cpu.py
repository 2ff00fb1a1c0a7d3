"""Step time on the CPU: the generated rec-LRA program, the reference interpreter and plain
backprop (eager, and both under torch.compile with --compile), for the paper's 5x256 MLP
(batch 32) and ResNet-18 at 32x32 (batch 32). Prints medians and ratios to backprop from one run
and writes JSON (``--out``). Usage: python benchmarks/step_cpu.py [--repeats 20] [--compile] [--alternate]
[--profile] [--out FILE]
"""
import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fxlra


def mlp():
    layers, width = [], 784
    for _ in range(5):
        layers += [nn.Linear(width, 256), nn.Tanh()]
        width = 256
    return nn.Sequential(*layers, nn.Linear(256, 10)), torch.randn(32, 784)


def resnet18_cifar():
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model, torch.randn(32, 3, 32, 32)


MODELS = {"mlp5x256-pairwise": (mlp, "pairwise"), "mlp5x256-direct": (mlp, "direct"),
          "resnet18_32x32": (resnet18_cifar, "residual")}


def median_ms(fn, repeats, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def alternating_ms(first, second, repeats, warmup=20):
    """Medians of two steps timed alternately (so both see the same machine load)."""
    for _ in range(warmup):
        first()
        second()
    a, b = [], []
    for _ in range(repeats):
        for fn, out in ((first, a), (second, b)):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(a), statistics.median(b)


def backprop_step(model, opt, x, y):
    def step():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return step


def fxlra_step(prog, opt, x, y, reference=False, run=None):
    """One fxlra step: ``run`` (default ``prog.step``), or the reference interpreter's updates."""
    run = run or prog.step

    def step():
        if reference:
            updates = prog.reference_updates(x, y)
            for name, p in prog.named_parameters():
                p.grad = updates[name]
        else:
            run(x, y)
        opt.step()
        opt.zero_grad()
    return step


def profile(step, name, rows=8):
    """Where the time of one rec-LRA step goes: the ops with the most self time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(f"-- {name}: fxlra step, top ops by self time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def run(args):
    torch.manual_seed(0)
    results = {}
    for name, (build, wiring) in MODELS.items():
        if args.only and not any(part in name for part in args.only):
            continue
        model, x = build()
        y = torch.randint(0, 10, (x.shape[0],))
        prog = fxlra.compile(model, wiring=wiring)
        rows = {}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=args.foreach)
        rows["backprop"] = median_ms(backprop_step(model, opt, x, y), args.repeats)
        if args.compile:
            compiled = torch.compile(model)
            rows["backprop_compiled"] = median_ms(backprop_step(compiled, opt, x, y), args.repeats)
        popt = torch.optim.AdamW(prog.parameters(), lr=1e-4, foreach=args.foreach)
        if args.alternate:
            twin = copy.deepcopy(model)
            topt = torch.optim.AdamW(twin.parameters(), lr=1e-4, foreach=args.foreach)
            rows["backprop"], rows["fxlra"] = alternating_ms(
                backprop_step(twin, topt, x, y), fxlra_step(prog, popt, x, y), args.repeats)
        else:
            rows["fxlra"] = median_ms(fxlra_step(prog, popt, x, y), args.repeats)
        if args.compile:
            rows["fxlra_compiled"] = median_ms(
                fxlra_step(prog, popt, x, y, run=torch.compile(prog.step)), args.repeats)
        rows["reference"] = median_ms(fxlra_step(prog, popt, x, y, True), max(3, args.repeats // 4))
        if args.profile:
            profile(fxlra_step(prog, popt, x, y), name)
        base = rows["backprop"]
        results[name] = {"ms": rows, "ratio_to_backprop": {k: v / base for k, v in rows.items()},
                         "batch": x.shape[0], "wiring": wiring, "fallback_ops": list(prog.fallbacks)}
        print(f"{name:16s} " + "  ".join(f"{k} {v:7.2f} ms ({v / base:4.2f}x)" for k, v in rows.items()))
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--compile", action="store_true",
                        help="also time backprop and prog.step under torch.compile")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile", action="store_true", help="print where the time goes")
    parser.add_argument("--only", nargs="*", help="run the models whose name contains one of these")
    parser.add_argument("--alternate", action="store_true",
                        help="time backprop and fxlra alternately (same load for both)")
    parser.add_argument("--foreach", action="store_true",
                        help="multi-tensor AdamW for both (torch's default on CUDA, not on CPU)")
    parser.add_argument("--out", default="benchmarks/results/step_cpu.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(args)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    meta = {"hardware": platform.processor() or platform.machine(), "threads":
            torch.get_num_threads(), "torch": torch.__version__, "dtype": "float32",
            "commit": commit, "repeats": args.repeats, "adamw_foreach": args.foreach,
            "alternate": args.alternate}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
