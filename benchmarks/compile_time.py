"""Compile time of fxlra.compile on torchvision's classification models (randomly initialised,
10 classes, one torch thread): prints the slowest compiles and writes
benchmarks/results/compile_time.json. A benchmark, not a test.

    python3 benchmarks/compile_time.py                       # every classification model
    python3 benchmarks/compile_time.py --models densenet121 resnet50 --wiring pairwise
"""
import argparse
import json
import os
import time

import torch
import torchvision

import fxlra

HERE = os.path.dirname(os.path.abspath(__file__))


def time_compile(name, wiring):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=10)
    start = time.perf_counter()
    prog = fxlra.compile(model, wiring=wiring)
    return time.perf_counter() - start, len(prog.sites), len(prog.plan.edges)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+",
                        default=torchvision.models.list_models(module=torchvision.models))
    parser.add_argument("--wiring", nargs="+", default=["residual", "pairwise"])
    parser.add_argument("--slowest", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in args.models:
        for wiring in args.wiring:
            seconds, sites, edges = time_compile(name, wiring)
            rows.append({"model": name, "wiring": wiring, "seconds": seconds, "sites": sites,
                         "edges": edges})
            print(f"{name:>24} {wiring:>9} {seconds:6.2f} s  {sites} sites, {edges} synapses",
                  flush=True)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "compile_time.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print("\n| model | wiring | compile (s) | sites | error synapses |\n|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: -r["seconds"])[:args.slowest]:
        print(f"| {r['model']} | {r['wiring']} | {r['seconds']:.2f} | {r['sites']} | {r['edges']} |")


if __name__ == "__main__":
    main()
