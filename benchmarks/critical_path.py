"""Print the critical paths (sequential op counts) of a rec-LRA step and of backprop's step for
the paper's models and ResNet-18/50, and write them as JSON.

    python3 benchmarks/critical_path.py [--out benchmarks/results/critical_path.json]

The counts come from each model's generated program (fxlra.codegen.paths): the error stage is as deep as
the error graph, backprop's backward as deep as the network. The last columns count statements
after the forward on the program generated for 4 streams: all of them (work) and those that run
one after another when the streams run side by side (span); work / span bounds what the streams
can gain when each statement waits for the previous one on its stream.
"""
import argparse
import json

import torch
import torchvision

import fxlra
from fxlra import models
from fxlra.codegen import paths
from fxlra.nn import LEAF_MODULES

STREAMS = 4
CASES = [  # name, model factory, compile options
    ("MLP 5x256 tanh, direct", lambda: models.mlp(), dict(wiring="direct")),
    ("MLP 5x256 tanh, pairwise", lambda: models.mlp(), dict(wiring="pairwise")),
    ("MLP 8x256, blocks(2)", lambda: models.mlp(8), dict(wiring=fxlra.wiring.blocks(2))),
    ("ResNet-18 32x32, residual", lambda: models.resnet18_cifar(), dict(wiring="residual")),
    ("ResNet-18 32x32, residual depth 3", lambda: models.resnet18_cifar(),
     dict(wiring="residual", depth=3)),
    ("pResNet-18 32x32, residual", lambda: models.presnet18(),
     dict(wiring="residual", leaf_modules=LEAF_MODULES)),
    ("locally connected CNN 32x32, skip(2)", lambda: models.lcnet(),
     dict(wiring=fxlra.wiring.skip(2), leaf_modules=LEAF_MODULES,
          example_inputs=torch.zeros(2, 3, 32, 32))),
    ("ResNet-18 224x224, residual", lambda: models.resnet18(), dict(wiring="residual")),
    ("ResNet-50 224x224, residual", lambda: torchvision.models.resnet50(),
     dict(wiring="residual")),
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/critical_path.json")
    args = p.parse_args(argv)
    rows = []
    print(f"{'model':<36} {'forward':>7} {'bp backward':>11} {'rec-LRA errors+updates':>22} "
          f"{'bp step':>7} {'rec-LRA step':>12} {'4 streams: work/span':>20}")
    for name, factory, options in CASES:
        prog = fxlra.compile(factory(), streams=STREAMS, **options)
        c = prog.critical_paths()
        work, span = paths.stream_span(prog._built.rows, prog.schedule)
        c.update(streams=STREAMS, stream_work=work, stream_span=span, stream_gain=work / span)
        rows.append(dict(model=name, **c))
        print(f"{name:<36} {c['forward']:>7} {c['backprop_backward']:>11} "
              f"{c['rec_lra_errors']:>14} + {c['rec_lra_updates']:<5} {c['backprop_step']:>7} "
              f"{c['rec_lra_step']:>12} {work:>8} / {span:<4} = {work / span:.2f}")
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
