"""The work of one training step, counted op by op on the CPU, and what it predicts for an H200:
backprop (forward, backward, AdamW) against fxlra's ``prog.step`` plus AdamW, bf16 autocast.

    python3 benchmarks/work.py [--models resnet18 presnet18 mlp5x256] [--out FILE]

Every ATen op the step dispatches is counted: its FLOPs (torch.utils.flop_counter's formulas for
matmuls and convolutions, weight-gradients included) and the bytes it reads and writes (the
memory its tensor arguments and results span; views move nothing). This is the traffic of the
eager step with no fusion: an upper bound for a fused or compiled one. Each op's time on an H200
is bounded below by its roofline, max(FLOPs / bf16 peak, bytes / copy bandwidth); the sum over
the step is the step's floor. The counts are taken at two small batches and extrapolated per op
to the batch of benchmarks/gpu.py (every op's work is affine in the batch), so the script needs
neither a GPU nor the memory of a batch of 256.

The floors are no timings: they say how much work each step has, and so whether a goal such as
"fxlra step <= 0.7x compiled backprop" is within reach when both run equally well. The last
columns scale each floor by backprop's measured/floor ratio from the anchors in docs/gpu.md,
"Performance targets" (ResNet-18 only).
"""
import argparse
import contextlib
import json
import os
import subprocess
from collections import Counter

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

import fxlra
import fxlra.kernels as K
from fxlra import models
from fxlra.ops import local
from fxlra.nn import LEAF_MODULES

PEAK_FLOPS = 989e12          # H200 dense bf16 tensor-core peak, FLOP/s
BANDWIDTH = 4.2e12           # H200 device copy bandwidth, bytes/s (docs/gpu.md, "Performance targets")
ANCHORS_MS = {"resnet18": {"eager": 20.1, "compiled": 15.0}}       # backprop, docs/gpu.md
CASES = {   # name -> (model factory, input shape, batch, compile options)
    "resnet18": (lambda: models.resnet18(), (3, 224, 224), 256, dict(wiring="residual")),
    "presnet18": (lambda: models.presnet18(classes=1000, cifar=False), (3, 224, 224), 256,
                  dict(wiring="residual", leaf_modules=LEAF_MODULES)),
    "mlp5x256": (lambda: models.mlp(), (784,), 32, dict(wiring="pairwise")),
}
SMALL_BATCHES = (2, 4)


def span_bytes(t):
    """Bytes of memory a tensor's elements cover (an expanded tensor covers its source only)."""
    if t.numel() == 0:
        return 0
    return (1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))) * t.element_size()


def tensors(*values):
    return [t for t in tree_leaves(values) if isinstance(t, torch.Tensor)]


class OpCounter(TorchDispatchMode):
    """Records (op, FLOPs, bytes read and written) for every op dispatched under it; a fused
    kernel (``fused``) is one op that reads its inputs once and writes its outputs once."""

    active = None

    def __init__(self):
        super().__init__()
        self.ops, self.fusing = [], None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view:
            return out
        packet = func._overloadpacket
        flops = flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry \
            else 0
        if self.fusing is not None:
            self.fusing += flops
        else:
            self.ops.append((str(packet), flops, sum(map(span_bytes, tensors(args, kwargs, out)))))
        return out

    def fused(self, name, reads, run):
        self.fusing = 0
        try:
            out = run()
        finally:
            flops, self.fusing = self.fusing, None
        self.ops.append((name, flops, sum(map(span_bytes, tensors(reads, out)))))
        return out

    def __enter__(self):
        OpCounter.active = self
        return super().__enter__()

    def __exit__(self, *exc):
        OpCounter.active = None
        return super().__exit__(*exc)


def fused(name, reads, run):
    """``run()`` (a kernel's torch reference) counted as the fused kernel when counting."""
    return OpCounter.active.fused(name, reads, run) if OpCounter.active else run()


def target_and_error(h, z, d, *args, recompute_z=False, **kwargs):
    params = kwargs.get("params", ())
    return fused("kernels.target_and_error", [h, d, params] + ([] if recompute_z else [z]),
                 lambda: K.target_and_error_ref(h, z, d, *args, recompute_z=recompute_z,
                                                **kwargs))


def perturbative_forward(m, x):
    x, noise = K.pseudo_conv_inputs(m, x)
    return fused("kernels.pseudo_conv_forward", [x, noise, m.weight, m.bias],
                 lambda: K.pseudo_conv_forward_ref(x, noise, m.weight, m.nmasks, m.bias))


def perturbative_grads(m, x, c):
    reads = list(K.pseudo_conv_inputs(m, x)) + [c]
    return fused("kernels.pseudo_conv_update", reads, lambda: local.perturbative_grads(m, x, c))


# the Triton kernels the generated program calls, replaced by their references counted as one
# fused op each (the interpreter would run them, op by op, far too slowly at these shapes)
FUSED = {"target_and_error": target_and_error, "perturbative_forward": perturbative_forward,
         "perturbative_grads": perturbative_grads}


@contextlib.contextmanager
def fused_kernels():
    """The stand-ins in place of the kernels; TRITON_INTERPRET=1 lets ``kernels="triton"``
    generate its program on the CPU (no Triton kernel runs: the stand-ins replace them)."""
    saved = {name: getattr(K, name) for name in FUSED}
    env = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    for name, fn in FUSED.items():
        setattr(K, name, fn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(K, name, fn)
        if env is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = env


def counted(step):
    """The ops of one call of ``step``, after one uncounted call (optimizer state, caches)."""
    step()
    with OpCounter() as counter:
        step()
    return counter.ops


def backprop_step(model, x, y, options):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def fxlra_step(kernels):
    def make(model, x, y, options):
        prog = fxlra.compile(model, kernels=kernels, **options)
        opt = torch.optim.AdamW(prog.parameters(), lr=1e-4, foreach=True)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                prog.step(x, y)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    return make


# the steps counted: backprop, fxlra's torch path (CPU, kernels="torch") and its Triton path (the
# default on CUDA: fused target/error and pseudo-convolution kernels)
STEPS = {"backprop": backprop_step, "fxlra_torch": fxlra_step("torch"),
         "fxlra_kernels": fxlra_step("triton")}


def extrapolated(runs, batches, batch):
    """Per op (op, FLOPs, bytes) at ``batch`` from the same op sequence at two batches."""
    (b0, b1), (r0, r1) = batches, runs
    names = [op for op, _, _ in r0]
    if names != [op for op, _, _ in r1]:
        raise RuntimeError("the step ran different ops at different batch sizes")
    t = (batch - b0) / (b1 - b0)
    return [(op, f0 + t * (f1 - f0), m0 + t * (m1 - m0))
            for (op, f0, m0), (_, f1, m1) in zip(r0, r1)]


def summary(op_rows, top=8):
    """Totals of one step's ops, its floor (the sum of the ops' rooflines) and the op kinds
    with the largest share of it."""
    by_op = Counter()
    for op, f, m in op_rows:
        by_op[op] += max(f / PEAK_FLOPS, m / BANDWIDTH) * 1e3
    return {"ops": len(op_rows), "gflop": sum(f for _, f, _ in op_rows) / 1e9,
            "gbytes": sum(m for _, _, m in op_rows) / 1e9, "floor_ms": sum(by_op.values()),
            "top_floor_ms": dict(by_op.most_common(top))}


def measure(name):
    build, shape, batch, options = CASES[name]
    result = {"batch": batch, "input": list(shape), "wiring": str(options["wiring"])}
    for step_name, make in STEPS.items():
        runs = []
        for b in SMALL_BATCHES:
            torch.manual_seed(0)
            x = torch.randn(b, *shape)
            y = torch.randint(0, 1000 if shape[-1] == 224 else 10, (b,))
            with fused_kernels():
                runs.append(counted(make(build(), x, y, options)))
        result[step_name] = summary(extrapolated(runs, SMALL_BATCHES, batch))
    bp = result["backprop"]
    for step_name in list(STEPS)[1:]:
        fx = result[step_name]
        result[f"{step_name}_over_backprop"] = {k: fx[k] / bp[k] for k in ("ops", "gflop",
                                                                          "gbytes", "floor_ms")}
        for mode, ms in ANCHORS_MS.get(name, {}).items():
            result[f"{step_name}_ms_at_backprop_{mode}_efficiency"] = \
                fx["floor_ms"] * ms / bp["floor_ms"]
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="*", choices=list(CASES), default=list(CASES))
    p.add_argument("--out", default="benchmarks/results/work.json")
    args = p.parse_args(argv)
    results = {}
    print(f"{'model':<10} {'step':<14} {'ops':>5} {'GFLOP':>8} {'GB':>7} {'floor ms':>9} "
          f"{'ratios to backprop: ops':>24} {'GFLOP':>6} {'GB':>5} {'floor':>6}")
    for name in args.models:
        r = results[name] = measure(name)
        for step_name in STEPS:
            s, ratio = r[step_name], r.get(f"{step_name}_over_backprop")
            print(f"{name:<10} {step_name:<14} {s['ops']:>5} {s['gflop']:>8.1f} "
                  f"{s['gbytes']:>7.2f} {s['floor_ms']:>9.3f} " + (
                      f"{ratio['ops']:>24.2f} {ratio['gflop']:>6.2f} {ratio['gbytes']:>5.2f} "
                      f"{ratio['floor_ms']:>6.2f}" if ratio else ""))
        for step_name in list(STEPS)[1:]:
            for mode, anchor in ANCHORS_MS.get(name, {}).items():
                ms = r[f"{step_name}_ms_at_backprop_{mode}_efficiency"]
                print(f"  {step_name} at backprop {mode}'s efficiency ({anchor} ms): {ms:.1f} ms "
                      f"= {ms / ANCHORS_MS[name]['compiled']:.2f}x compiled backprop")
            if r[step_name]["floor_ms"] > 0.1:      # else launch-bound: the op count matters
                print(f"  {step_name} floor by op (ms): " + ", ".join(
                    f"{op} {ms:.2f}" for op, ms in r[step_name]["top_floor_ms"].items()))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    meta = {"torch": torch.__version__, "commit": commit, "dtype": "bfloat16 autocast",
            "peak_flops": PEAK_FLOPS, "bandwidth_Bps": BANDWIDTH, "small_batches": SMALL_BATCHES,
            "anchors_ms": ANCHORS_MS}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
