"""GPU benchmark of fxlra's Triton kernels and of the training step (docs/gpu.md, "Performance targets"):
CUDA-event timings (medians after warm-up, L2 flushed before each kernel timing) written as JSON
with the hardware, versions, dtype, batch sizes and commit. Correctness is the tests' (``pytest
-m cuda`` on the GPU: every kernel against its reference, at these stage shapes too, the step on
streams and replayed as a CUDA graph against the eager one-stream step):

  pseudo_conv     ResNet-18's four stage shapes (batch 256, bf16, channels_last): the fused
                  pseudo-convolution against the materialised torch layer and cuDNN's 3x3 conv,
                  forward and weight update, and the memory floor (read once, write once) at
                  4.2 TB/s and at the measured copy bandwidth
  target_error    the fused target/error kernel in GB/s against a torch copy of the same bytes
  reproject       multi-tensor re-projection of ResNet-18's updates against rules.reproject_all
  profile         the ops with the most device time in the default ResNet-18 fxlra step
  steps           ResNet-18 and pResNet-18 (224x224, batch 256) and the 5x256 MLP (batch 32),
                  bf16 autocast, channels_last, AdamW: backprop eager, backprop torch.compile and
                  fxlra's prog.step (torch ops on one stream; with kernels; with kernels on 4
                  streams, the default; replayed as a CUDA graph; torch ops under
                  torch.compile), with peak memory and floor / measured against the H200
                  floors benchmarks/work.py counted; each one guarded, errors recorded; the
                  eager variants of every case before the compiled ones

Usage:
    python benchmarks/gpu.py [--out benchmarks/results/gpu.json] [--repeats 30] [--budget-s 270]
                             [--only pseudo_conv target_error reproject profile steps]
    python benchmarks/gpu.py --cpu-smoke     # tiny shapes on the CPU, Triton's interpreter

``--cpu-smoke`` runs every section at tiny shapes (torch.compile's "eager" backend) so the
script itself is checked on a machine without a GPU; its timings mean nothing.
"""
import os
import sys

SMOKE = "--cpu-smoke" in sys.argv
if SMOKE:   # before anything imports Triton (torch._dynamo does, and fxlra imports it)
    os.environ["TRITON_INTERPRET"] = "1"

import argparse                                                     # noqa: E402
import contextlib                                                   # noqa: E402
import gc                                                           # noqa: E402
import json                                                         # noqa: E402
import platform                                                     # noqa: E402
import statistics                                                   # noqa: E402
import subprocess                                                   # noqa: E402
import time                                                         # noqa: E402
import traceback                                                    # noqa: E402
from pathlib import Path                                            # noqa: E402

import torch                                                        # noqa: E402
import torch.nn.functional as F                                     # noqa: E402
from torch import nn                                                # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import fxlra                                                        # noqa: E402
from fxlra import models, rules                                     # noqa: E402
from fxlra.ops import local                                         # noqa: E402
from fxlra.nn import LEAF_MODULES, PerturbativeConv2d               # noqa: E402
from step_cpu import median_ms                   # the wall-clock timer  # noqa: E402

NOMINAL_BANDWIDTH = 4.2e12           # bytes/s, H200 HBM3e (docs/gpu.md, "Performance targets")
STAGES = [(64, 56), (128, 28), (256, 14), (512, 7)]                 # ResNet-18: channels, size
TARGETS = {  # docs/gpu.md, "Performance targets"
    "pseudo_conv fused_*_over_floor": "<= 1.3",
    "target_error *_fraction_of_copy": ">= 0.7",
    "steps resnet18 fxlra_over_backprop_compiled": "<= 0.7",
    "steps * streams_over_one_stream": "<= 1.0",
}
BACKPROP_VARIANTS = {"backprop_eager": dict(), "backprop_compiled": dict(torch_compile=True)}
# prog.step variants timed on every model: compile options added to the model's own
# (torch_compile: prog.step runs under torch.compile, as the README shows)
FXLRA_VARIANTS = {
    "fxlra_torch_one_stream": dict(kernels="torch", streams=1),   # the plain generated program
    "fxlra_one_stream": dict(streams=1),                          # + Triton kernels
    "fxlra": dict(),                                              # + 4 streams (the defaults)
    "fxlra_cuda_graph": dict(cuda_graph=True),                    # + replayed as a CUDA graph
    "fxlra_compiled": dict(kernels="torch", streams=1, torch_compile=True),  # Inductor fuses
}
COMPILE_S = 75                       # what torch.compile of a ResNet-18 step may take here
FWD_CONFIGS = [None, dict(BLOCK_O=128, BLOCK_P=64, BLOCK_K=64, num_warps=8, num_stages=3),
               dict(BLOCK_O=64, BLOCK_P=128, BLOCK_K=64, num_warps=4, num_stages=4)]
UPD_CONFIGS = [None, dict(BLOCK_O=128, BLOCK_K=128, BLOCK_P=64, num_warps=8, num_stages=3),
               dict(BLOCK_O=64, BLOCK_K=64, BLOCK_P=64, num_warps=4, num_stages=4)]


K = fxlra.kernels


# -- timing ---------------------------------------------------------------------------------------
class Clock:
    """Medians in ms: CUDA events on the GPU (L2 flushed before each run when ``flush``), the
    wall clock on the CPU. Stops taking new measurements once the time budget is spent."""

    def __init__(self, device, repeats, warmup, budget_s):
        self.device, self.repeats, self.warmup = device, repeats, warmup
        self.deadline = time.monotonic() + budget_s
        self.scratch = torch.empty(64 << 20 if device.type == "cuda" else 1, dtype=torch.int32,
                                   device=device)                    # 256 MiB: more than L2

    def left(self):
        return self.deadline - time.monotonic()

    def ms(self, fn, flush=True, repeats=None, warmup=None):
        if self.left() <= 0:
            raise TimeoutError("time budget spent")
        for _ in range(self.warmup if warmup is None else warmup):
            fn()
        repeats = repeats or self.repeats
        if self.device.type != "cuda":
            return median_ms(fn, repeats, warmup=0)
        torch.cuda.synchronize()
        events = []
        for _ in range(repeats):
            if flush:
                self.scratch.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events)


def guarded(record, key, fn):
    """record[key] = fn(), or the error (type, message, last lines of the traceback)."""
    try:
        record[key] = fn()
    except Exception as exc:                                         # noqa: BLE001
        record[key] = {"error": f"{type(exc).__name__}: {exc}"[:2000],
                       "traceback": traceback.format_exc().splitlines()[-6:]}
        print(f"  {key}: {type(exc).__name__}: {str(exc)[:200]}")
    return record[key]


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- kernels --------------------------------------------------------------------------------------
def copy_bandwidth(clock, device, nbytes):
    """Bytes per second of a torch copy that moves ``nbytes`` (reads half, writes half)."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return nbytes / (clock.ms(lambda: dst.copy_(src)) * 1e-3)


def best(record, prefix, clock, run, configs):
    """Time ``run(config)`` for every config; record each and return the fastest ms."""
    found = []
    for k, config in enumerate(configs):
        value = guarded(record, f"{prefix}_config{k}_ms", lambda: clock.ms(lambda: run(config)))
        if isinstance(value, float):
            found.append((value, k))
    if not found:
        raise RuntimeError(f"every {prefix} config failed")
    record[f"{prefix}_best_config"] = configs[min(found)[1]]
    return min(found)[0]


def pseudo_conv_section(clock, device, dtype, batch, smoke, bandwidth):
    out, nmasks = {}, 1
    stages = [(c // 16, max(s // 8, 3)) for c, s in STAGES] if smoke else STAGES
    autocast = torch.autocast(device.type, dtype=dtype) if device.type == "cuda" else \
        contextlib.nullcontext()
    for c, s in stages:
        row = out[f"{c}x{s}x{s}"] = {"batch": batch, "nmasks": nmasks}
        print(f"pseudo_conv {c}x{s}x{s}")
        m = PerturbativeConv2d(c, c, nmasks, seed=1).to(device)
        conv = nn.Conv2d(c, c, 3, padding=1, bias=False).to(device=device, dtype=dtype,
                                                             memory_format=torch.channels_last)
        x = torch.randn(batch, c, s, s, device=device, dtype=dtype).contiguous(
            memory_format=torch.channels_last)
        e = torch.randn_like(x)
        noise = m.masks(s, s, x)
        out_bytes = x.nbytes                           # the output is shaped like x here
        row["floor_forward_ms"] = (x.nbytes + out_bytes) / NOMINAL_BANDWIDTH * 1e3
        row["floor_update_ms"] = (x.nbytes + e.nbytes) / NOMINAL_BANDWIDTH * 1e3
        row["floor_forward_measured_bw_ms"] = (x.nbytes + out_bytes) / bandwidth * 1e3
        row["floor_update_measured_bw_ms"] = (x.nbytes + e.nbytes) / bandwidth * 1e3
        configs = [None] if smoke else FWD_CONFIGS
        guarded(row, "fused_forward_ms", lambda: best(
            row, "fused_forward", clock,
            lambda cfg: K.pseudo_conv_forward(x, noise, m.weight, nmasks, config=cfg), configs))

        def materialised_forward():
            with autocast:
                return m(x)
        guarded(row, "materialised_forward_ms", lambda: clock.ms(materialised_forward))
        guarded(row, "cudnn_3x3_forward_ms", lambda: clock.ms(lambda: conv(x)))
        configs = [None] if smoke else UPD_CONFIGS
        guarded(row, "fused_update_ms", lambda: best(
            row, "fused_update", clock,
            lambda cfg: K.pseudo_conv_update(x, noise, e, nmasks, scale=1 / batch, config=cfg),
            configs))

        def materialised_update():                    # fxlra.ops.local's rule (einsum)
            with autocast:
                return local.perturbative_grads(m, x, e)

        def materialised_conv_update():               # relu(x + n) then cuDNN's 1x1 dW
            u = m.perturbed(x)
            return torch.ops.aten.convolution_backward(
                e, u, m.weight.to(dtype), None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                [False, True, False])[1]
        guarded(row, "materialised_update_einsum_ms", lambda: clock.ms(materialised_update))
        guarded(row, "materialised_update_conv_ms", lambda: clock.ms(materialised_conv_update))
        guarded(row, "cudnn_3x3_update_ms", lambda: clock.ms(
            lambda: torch.ops.aten.convolution_backward(
                e, x, conv.weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                [False, True, False])[1]))
        for kind in ("forward", "update"):
            fused = row.get(f"fused_{kind}_ms")
            if isinstance(fused, float):
                row[f"fused_{kind}_over_floor"] = fused / row[f"floor_{kind}_ms"]
                row[f"fused_{kind}_over_floor_measured_bw"] = fused / row[
                    f"floor_{kind}_measured_bw_ms"]
                for other in (f"materialised_{kind}_ms", f"cudnn_3x3_{kind}_ms",
                              f"materialised_{kind}_einsum_ms", f"materialised_{kind}_conv_ms"):
                    if isinstance(row.get(other), float):
                        row[f"fused_{kind}_over_{other[:-3]}"] = fused / row[other]
        print("  " + "  ".join(f"{k} {v:.4f}" for k, v in row.items()
                               if k.endswith("_ms") and isinstance(v, float)))
        free()
    return out


def target_error_section(clock, device, dtype, batch, smoke, bandwidth_at):
    out = {}
    stages = [(c // 16, max(s // 8, 3)) for c, s in STAGES] if smoke else STAGES
    for c, s in stages:
        row = out[f"{c}x{s}x{s}"] = {"batch": batch, "activation": "relu"}
        h, d = (torch.randn(batch, c, s, s, device=device, dtype=dtype).contiguous(
            memory_format=torch.channels_last) for _ in range(2))
        z = torch.relu(h)
        d_channel = d[:, :, 0, 0].contiguous()
        size = h.nbytes
        variants = {"dense_d": (d, True, 5 * size), "dense_d_no_target": (d, False, 4 * size),
                    "channel_d": (d_channel, True, 4 * size)}
        for name, (dd, with_target, nbytes) in variants.items():
            ms = guarded(row, f"{name}_ms", lambda: clock.ms(lambda: K.target_and_error(
                h, z, dd, "relu", beta=0.1, alpha=0.9, kappa=1.0, with_target=with_target)))
            if isinstance(ms, float):
                copy = bandwidth_at(nbytes)
                row[f"{name}_GBps"] = nbytes / (ms * 1e-3) / 1e9
                row[f"{name}_copy_GBps"] = copy / 1e9
                row[f"{name}_fraction_of_copy"] = nbytes / (ms * 1e-3) / copy

        def torch_way():                            # what the generated program does now
            y = torch.relu(torch.sub(h, d, alpha=0.1))
            err = rules.inner_error(z, y, 0.9, 1.0)
            return err, torch._foreach_norm([err])
        guarded(row, "torch_ms", lambda: clock.ms(torch_way))
        print(f"target_error {c}x{s}x{s}: " + "  ".join(
            f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)))
        free()
    return out


def reproject_section(clock, device, smoke):
    model = models.mlp(2, 16, in_features=8) if smoke else models.resnet18()
    shapes = [p.shape for p in model.parameters()]
    gen = torch.Generator().manual_seed(1)
    base = [(torch.randn(s, generator=gen) * (0.5 if k % 2 else 0.001)).to(device)
            for k, s in enumerate(shapes)]
    work = [t.clone() for t in base]
    row = {"model": "mlp(2, 16)" if smoke else "resnet18", "tensors": len(base),
           "elements": sum(t.numel() for t in base), "dtype": "float32", "clip": 1.0}

    def reset():
        torch._foreach_copy_(work, base)
    guarded(row, "fused_ms", lambda: clock.ms(lambda: (reset(), K.reproject_(work, 1.0))))
    guarded(row, "torch_foreach_ms", lambda: clock.ms(
        lambda: (reset(), rules.reproject_all(work, 1.0))))
    guarded(row, "copy_only_ms", lambda: clock.ms(reset))
    guarded(row, "fused_norms_ms", lambda: clock.ms(lambda: K.frobenius_norms(work)))
    guarded(row, "torch_foreach_norm_ms", lambda: clock.ms(
        lambda: torch.stack(torch._foreach_norm(work))))
    print("reproject: " + "  ".join(f"{k} {v:.4f}" for k, v in row.items()
                                    if isinstance(v, float)))
    return row


# -- full steps -----------------------------------------------------------------------------------
def step_cases(smoke):
    """name -> (model factory, input shape, batch, compile options)."""
    if smoke:
        return {"resnet18_cifar_tiny": (lambda: models.resnet18_cifar(), (3, 16, 16), 2,
                                        dict(wiring="residual")),
                "mlp5x256": (lambda: models.mlp(), (784,), 4, dict(wiring="pairwise"))}
    return {"resnet18": (lambda: models.resnet18(), (3, 224, 224), 256, dict(wiring="residual")),
            "mlp5x256": (lambda: models.mlp(), (784,), 32, dict(wiring="pairwise")),
            "presnet18": (lambda: models.presnet18(classes=1000, cifar=False), (3, 224, 224), 256,
                          dict(wiring="residual", leaf_modules=LEAF_MODULES))}


def autocast_for(device, dtype):
    return torch.autocast("cuda", dtype=dtype) if device.type == "cuda" else \
        contextlib.nullcontext()


def step_batch(shape, batch, device):
    """The fixed batch (x, y) a step case is timed on: images channels_last, 1000 classes at
    224x224, else 10."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=gen).to(device)
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    classes = 1000 if shape[-1] == 224 else 10
    return x, torch.randint(0, classes, (batch,), generator=gen).to(device)


def fresh_model(build, device, x):
    torch.manual_seed(0)
    model = build().to(device)
    return model.to(memory_format=torch.channels_last) if x.dim() == 4 else model


def skip_reason(extra, device, compile_backend):
    """Why a step variant with these options is not timed in this run (None: it is)."""
    if extra.get("cuda_graph") and device.type != "cuda":
        return "CUDA graphs need a GPU"
    if extra.get("torch_compile") and compile_backend is None:
        return "no torch.compile in this run"
    return None


def reclra_step(build, options, x, y, autocast, torch_compile=None, **extra):
    """(one fxlra training step with AdamW on a fresh model, its program); ``torch_compile``: the
    torch.compile backend ``prog.step`` runs under, as the README shows (None: eager)."""
    prog = fxlra.compile(fresh_model(build, x.device, x), **options, **extra)
    opt = torch.optim.AdamW(prog.parameters(), lr=1e-4)
    run = torch.compile(prog.step, backend=torch_compile) if torch_compile else prog.step

    def step():
        with autocast:
            run(x, y)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, prog


def steps_section(clock, device, dtype, smoke, compile_backend):
    """Every step variant of every case; ``compile_backend``: torch.compile's backend for the
    compiled variants ("inductor"; "eager" in the smoke run; None skips them). The eager
    variants of every case run first: torch.compile takes the longest, and what the budget
    leaves out should be the compiled steps of the smaller cases."""
    autocast = autocast_for(device, dtype)
    cases = {name: case_variants(case, device, autocast, compile_backend)
             for name, case in step_cases(smoke).items()}
    for compiled in (False, True):
        for row, variants in cases.values():
            for variant, make in variants.items():
                if variant.endswith("_compiled") == compiled:
                    guarded(row, variant, lambda: measure_step(clock, device, variant, make))
                    free()
    out = {}
    for name, (row, _) in cases.items():
        out[name] = summarised(row, counted_floors(name, row))
        ms = {k: v["ms"] for k, v in row.items() if isinstance(v, dict) and "ms" in v}
        print(f"step {name}: " + "  ".join(f"{k} {v:.2f} ms" for k, v in ms.items()))
    return out


def case_variants(case, device, autocast, compile_backend):
    """(the case's result row, variant -> function that builds its step) for one step case."""
    build, shape, batch, options = case
    row = {"batch": batch, "input": list(shape), "wiring": options["wiring"]}
    x, y = step_batch(shape, batch, device)

    def backprop(torch_compile=False):
        model = fresh_model(build, device, x)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        run = torch.compile(model, backend=compile_backend) if torch_compile else model

        def step():
            with autocast:
                loss = F.cross_entropy(run(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def reclra(torch_compile=False, **extra):
        step, prog = reclra_step(build, options, x, y, autocast,
                                 compile_backend if torch_compile else None, **extra)
        row["fxlra_fallback_ops"] = list(prog.fallbacks)
        return step

    variants = {}
    for variant, extra in {**BACKPROP_VARIANTS, **FXLRA_VARIANTS}.items():
        why = skip_reason(extra, device, compile_backend)
        if why:
            row[variant] = {"skipped": why}
        else:
            make = backprop if variant in BACKPROP_VARIANTS else reclra
            variants[variant] = lambda make=make, extra=extra: make(**extra)
    return row, variants


def measure_step(clock, device, variant, make):
    """Median ms and peak memory of the step ``make()`` builds, after 3 steps that compile."""
    if variant.endswith("_compiled") and clock.left() < COMPILE_S:
        raise TimeoutError(f"less than {COMPILE_S} s of the time budget left for torch.compile")
    step = make()
    for _ in range(3):                     # compiles (torch.compile, Triton) here
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    ms = clock.ms(step, flush=False, warmup=2, repeats=max(3, clock.repeats // 2))
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return {"ms": ms, "peak_memory_bytes": peak}


# which of benchmarks/work.py's counted steps bounds each timed variant
FLOOR_OF = {"backprop_eager": "backprop", "backprop_compiled": "backprop",
            "fxlra_torch_one_stream": "fxlra_torch", "fxlra_compiled": "fxlra_torch",
            "fxlra_one_stream": "fxlra_kernels", "fxlra": "fxlra_kernels",
            "fxlra_cuda_graph": "fxlra_kernels"}


def counted_floors(name, row):
    """benchmarks/work.py's H200 floors (ms) for this case's steps, when its results hold the
    same case (model, batch, input), else {}."""
    path = ROOT / "benchmarks" / "results" / "work.json"
    try:
        counted = json.loads(path.read_text())["results"].get(name, {})
    except (OSError, ValueError, KeyError):
        return {}
    if (counted.get("batch"), counted.get("input")) != (row["batch"], row["input"]):
        return {}
    return {step: counted[step]["floor_ms"] for step in dict.fromkeys(FLOOR_OF.values())
            if step in counted}


def summarised(row, floors=None):
    """The row with the ratios the goals are stated in, and how close each variant ran to the
    floor that benchmarks/work.py counted for its kind of step (floor / measured)."""
    ms = {k: v["ms"] for k, v in row.items() if isinstance(v, dict) and "ms" in v}
    if floors:
        row["floor_ms"] = floors
        row["floor_over_measured"] = {k: floors[FLOOR_OF[k]] / v for k, v in ms.items()
                                      if FLOOR_OF.get(k) in floors}
    for base in ("backprop_eager", "backprop_compiled"):
        if "fxlra" in ms and base in ms:
            row[f"fxlra_over_{base}"] = ms["fxlra"] / ms[base]
    fxlra_ms = {k: v for k, v in ms.items() if k.startswith("fxlra")}
    if fxlra_ms and "backprop_compiled" in ms:
        fastest = min(fxlra_ms, key=fxlra_ms.get)
        row["fastest_fxlra"] = fastest
        row["fastest_fxlra_over_backprop_compiled"] = fxlra_ms[fastest] / ms["backprop_compiled"]
    if "fxlra" in ms and "fxlra_one_stream" in ms:
        row["streams_over_one_stream"] = ms["fxlra"] / ms["fxlra_one_stream"]
    return row


def profile_section(clock, device, dtype, smoke, steps=3):
    """Where the first model's default fxlra step spends its time: the ops with the most self
    device time (CPU time on the CPU) over ``steps`` profiled steps, per step."""
    name, (build, shape, batch, options) = next(iter(step_cases(smoke).items()))
    if clock.left() < 20:
        raise TimeoutError("less than 20 s of the time budget left for the profile")
    x, y = step_batch(shape, batch, device)
    step, _ = reclra_step(build, options, x, y, autocast_for(device, dtype))
    for _ in range(3):
        step()
    cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + \
        ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()

    def self_us(event):
        if not cuda:
            return event.self_cpu_time_total
        return getattr(event, "self_device_time_total", None) or \
            getattr(event, "self_cuda_time_total", 0)
    events = sorted(prof.key_averages(), key=self_us, reverse=True)
    total = sum(self_us(e) for e in events)
    top = [{"op": e.key, "calls_per_step": e.count / steps, "self_ms_per_step":
            self_us(e) / 1e3 / steps, "share": self_us(e) / total if total else None}
           for e in events[:25]]
    print(f"profile {name}: {total / 1e3 / steps:.2f} ms of {'device' if cuda else 'CPU'} time "
          f"per step; top: " + ", ".join(f"{t['op']} {t['self_ms_per_step']:.2f}" for t in top[:5]))
    return {"model": name, "variant": "fxlra", "steps": steps, "self_ms_per_step": total / 1e3 /
            steps, "top": top}


# -- metadata -------------------------------------------------------------------------------------
def commit():
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("FXLRA_COMMIT", "unknown")
    return (head + ("-dirty" if dirty else "")) if head else os.environ.get("FXLRA_COMMIT",
                                                                            "unknown")


def metadata(device, dtype, args):
    import triton
    meta = {"python": platform.python_version(), "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda, "commit": commit(),
            "dtype": str(dtype).replace("torch.", ""), "repeats": 2 if SMOKE else args.repeats,
            "smoke": SMOKE, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "nominal_bandwidth_Bps": NOMINAL_BANDWIDTH, "targets": TARGETS}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta["hardware"] = {"gpu": props.name, "capability": f"{props.major}.{props.minor}",
                            "sms": props.multi_processor_count,
                            "memory_bytes": props.total_memory, "cudnn":
                            torch.backends.cudnn.version()}
    else:
        meta["hardware"] = {"cpu": platform.processor() or platform.machine(),
                            "threads": torch.get_num_threads()}
    return meta


SECTIONS = ("pseudo_conv", "target_error", "reproject", "profile", "steps")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny shapes on the CPU under TRITON_INTERPRET (checks the script)")
    parser.add_argument("--out", default=None, help="JSON path (default "
                        "benchmarks/results/gpu.json; none with --cpu-smoke)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--only", nargs="*", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--budget-s", type=float, default=270,
                        help="stop starting new measurements after this many seconds")
    args = parser.parse_args()
    if not SMOKE and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --cpu-smoke to check the script on the CPU")
    device = torch.device("cpu" if SMOKE else "cuda")
    dtype = torch.float32 if SMOKE else torch.bfloat16
    repeats = 2 if SMOKE else args.repeats
    torch.backends.cudnn.benchmark = True
    clock = Clock(device, repeats, 1 if SMOKE else 5, args.budget_s)
    result = {"meta": metadata(device, dtype, args)}
    print(f"device {result['meta']['hardware']}, commit {result['meta']['commit']}")
    batch = 2 if SMOKE else 256
    bandwidths = {}

    def bandwidth_at(nbytes):
        if nbytes not in bandwidths:
            bandwidths[nbytes] = copy_bandwidth(clock, device, nbytes)
        return bandwidths[nbytes]
    big = 1 << 20 if SMOKE else 1 << 30
    copy_bw = guarded(result, "copy_bandwidth_Bps", lambda: bandwidth_at(big))
    copy_bw = copy_bw if isinstance(copy_bw, float) else NOMINAL_BANDWIDTH
    sections = {
        "pseudo_conv": lambda: pseudo_conv_section(clock, device, dtype, batch, SMOKE, copy_bw),
        "target_error": lambda: target_error_section(clock, device, dtype, batch, SMOKE,
                                                     bandwidth_at),
        "reproject": lambda: reproject_section(clock, device, SMOKE),
        "steps": lambda: steps_section(clock, device, dtype, SMOKE, None if args.no_compile
                                       else "eager" if SMOKE else "inductor"),
        "profile": lambda: profile_section(clock, device, dtype, SMOKE),
    }
    out = args.out or (None if SMOKE else str(ROOT / "benchmarks" / "results" / "gpu.json"))
    for name in args.only:           # written after every section: a killed run keeps the rest
        guarded(result, name, sections[name])
        result["meta"]["seconds_left_of_budget"] = clock.left()
        save(result, out)
    if out:
        print(f"wrote {out}")


def save(result, out):
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out + ".part", "w") as f:
            json.dump(result, f, indent=1, default=str)
        os.replace(out + ".part", out)


if __name__ == "__main__":
    main()
