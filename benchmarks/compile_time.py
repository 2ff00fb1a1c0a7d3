"""Compile time of fxlra.compile on torchvision's classification models, or with --timm on the
timm models of tests/timm_zoo.py (randomly initialised, 10 classes, one torch thread): prints the
slowest compiles and writes benchmarks/results/compile_time.json (compile_time_timm.json). A
benchmark, not a test.

    python3 benchmarks/compile_time.py                       # every classification model
    python3 benchmarks/compile_time.py --models densenet121 resnet50 --wiring pairwise
    python3 benchmarks/compile_time.py --timm                # timm's zoo (residual wiring)
"""
import argparse
import json
import os
import sys
import time

import torch
import torchvision

import fxlra

HERE = os.path.dirname(os.path.abspath(__file__))


def _timm_zoo():
    sys.path.insert(0, os.path.join(HERE, os.pardir, "tests"))
    import timm_zoo
    return timm_zoo


def time_compile(name, wiring, timm=False):
    """Seconds to compile one model, its sites and error synapses (None: fxlra refused it)."""
    if timm:
        zoo = _timm_zoo()
        model, kwargs = zoo.build(name), dict(example_inputs=(zoo.example(name),))
    else:
        torch.manual_seed(0)
        model, kwargs = torchvision.models.get_model(name, num_classes=10), {}
    start = time.perf_counter()
    try:
        prog = fxlra.compile(model, wiring=wiring, **kwargs)
    except fxlra.FxlraError:
        return time.perf_counter() - start, None, None
    return time.perf_counter() - start, len(prog.sites), len(prog.plan.edges)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+")
    parser.add_argument("--wiring", nargs="+")
    parser.add_argument("--timm", action="store_true", help="timm's zoo (tests/timm_zoo.py)")
    parser.add_argument("--slowest", type=int, default=5)
    args = parser.parse_args(argv)
    if args.models is None:
        args.models = list(_timm_zoo().MODELS) if args.timm else \
            torchvision.models.list_models(module=torchvision.models)
    args.wiring = args.wiring or (["residual"] if args.timm else ["residual", "pairwise"])
    torch.set_num_threads(1)
    rows = []
    for name in args.models:
        for wiring in args.wiring:
            seconds, sites, edges = time_compile(name, wiring, args.timm)
            rows.append({"model": name, "wiring": wiring, "seconds": seconds, "sites": sites,
                         "edges": edges})
            print(f"{name:>24} {wiring:>9} {seconds:6.2f} s  {sites} sites, {edges} synapses",
                  flush=True)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    out = "compile_time_timm.json" if args.timm else "compile_time.json"
    with open(os.path.join(HERE, "results", out), "w") as f:
        json.dump(rows, f, indent=1)
    print("\n| model | wiring | compile (s) | sites | error synapses |\n|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: -r["seconds"])[:args.slowest]:
        print(f"| {r['model']} | {r['wiring']} | {r['seconds']:.2f} | {r['sites']} | {r['edges']} |")


if __name__ == "__main__":
    main()
