"""The training loop behind ``examples/train_*.py``: one model, data set, optimizer and schedule,
trained by rec-LRA (``--algo reclra``: ``prog.step``), by backprop (``--algo bp``:
``loss.backward()`` plus the same per-tensor re-projection of every gradient onto a ball of
radius ``--clip``), or both in turn (``--algo both``), from the same initial weights and batch
order.

A script builds an ``Experiment`` (its data sets and a model factory) and calls
``run(args, experiment)`` with the flags of ``parser(...)``. Into ``--output-dir`` go:

- ``metrics.csv`` and ``metrics.json``: one row per algorithm and epoch (train loss, test loss,
  accuracy, top-5 where there are more than 5 classes, macro precision, recall and F1, lr, time).
  A run replaces its own algorithm's rows and keeps the other's, so ``--algo reclra`` and
  ``--algo bp`` run one after the other into the same folder compare like ``--algo both``;
- ``curves.png``: the learning curves of every algorithm in ``metrics.json``;
- ``checkpoint-<algo>.pt``: written after every epoch (``fxlra.checkpoint.save``); ``--resume``
  continues each algorithm from its own, ``--resume PATH`` one algorithm from PATH;
- ``diagnostics.jsonl`` (rec-LRA runs, when ``fxlra.diagnostics.report`` exists): one JSON line
  per epoch of the report on a fixed batch of training data.

Every epoch reseeds the batch order and the global RNG from ``(--seed, epoch)``, so a run split
by ``--resume`` sees the same batches as an unsplit one. All printing and file writing go through
``log``, ``write_metrics``, ``write_diagnostics`` and ``save_checkpoint``: the one place where a
multi-process run keeps them to one process.
"""
import contextlib
import importlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

from ..runtime import checkpoint, distributed as fdist
from . import metrics
# the scripts' entry points (training.parser, training.parse, ...)
from .flags import (PAPER_CNN_NOTES, PAPER_CNN_VALUES, compile_options, parse,  # noqa: F401
                    parser, perturbative_flags)
from ..errors import NumericalError
from ..compiler import compile as compile_program
from ..semantics.rules import reproject_all

ALGOS = {"reclra": "rec-LRA", "bp": "backprop"}
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
              "sgd": lambda params, **kw: torch.optim.SGD(params, momentum=0.9, **kw)}
PLOT_EVERY_S = 600      # curves.png is drawn at the end of a run, and at most this often in it


@dataclass
class Experiment:
    """What a script hands to ``run``: data sets, a model factory (called after the seed is
    set, once per algorithm), the number of classes, and extra ``fxlra.compile`` keywords
    (the example inputs are always two training images)."""
    name: str
    train: object
    test: object
    build_model: object
    classes: int
    compile_kwargs: dict = field(default_factory=dict)


# -- the one place for output (a multi-process run gates these to rank 0) --------------------------
def log(message):
    """Print one line (above the progress bar when there is one), on rank 0 only."""
    if not fdist.is_main():
        return
    from tqdm import tqdm
    tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()


def write_metrics(folder, algo, history, title="", plot=False):
    """Replace ``algo``'s rows in the metrics files with ``history``; with ``plot`` redraw
    the curves."""
    if not fdist.is_main():
        return
    rows = metrics.merge_rows(metrics.read_rows(folder), algo, history)
    metrics.write_tables(folder, rows)
    if plot:
        draw_curves(folder, title)


def draw_curves(folder, title=""):
    """``curves.png`` from every algorithm's rows in ``metrics.json``."""
    rows = metrics.read_rows(folder) if fdist.is_main() else None
    if rows:
        metrics.plot_curves(rows, Path(folder) / "curves.png", title)


def write_diagnostics(folder, record=None, keep_until=None):
    """Append one JSON line to ``diagnostics.jsonl``; with ``keep_until`` first drop the
    lines of later epochs (a fresh run keeps none)."""
    if not fdist.is_main():
        return
    path = Path(folder) / "diagnostics.jsonl"
    if keep_until is not None:
        lines = path.read_text().splitlines() if path.is_file() else []
        kept = [ln for ln in lines if json.loads(ln).get("epoch", 0) <= keep_until]
        path.write_text("".join(ln + "\n" for ln in kept))
    if record is not None:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def save_checkpoint(path, trainee, optimizer, scheduler, **state):
    """Rank 0 writes; every rank waits until the file is complete."""
    if fdist.is_main():
        checkpoint.save(path, trainee, optimizer=optimizer, scheduler=scheduler, **state)
    fdist.barrier()


def load_checkpoint(path, trainee, optimizer, scheduler):
    return checkpoint.load(path, trainee, optimizer=optimizer, scheduler=scheduler)


def diagnostics_report():
    """``fxlra.diagnostics.report`` if that module exists, else None."""
    try:
        return getattr(importlib.import_module(f"{__package__}.diagnostics"), "report", None)
    except ImportError:
        return None


# -- data -----------------------------------------------------------------------------------------
def epoch_seed(seed, epoch):
    return seed * 1_000_003 + epoch


def shard(dataset, shuffle, seed, epoch):
    """This process's sample indices: a ``DistributedSampler`` (``set_epoch`` each epoch) when
    training on several processes, every ``world``-th sample for evaluation, all otherwise."""
    world, rank = fdist.world_size(), fdist.rank()
    if world == 1:
        return None
    if not shuffle:
        return list(range(rank, len(dataset), world))
    sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def batches(dataset, batch_size, shuffle, seed, workers, device, epoch=0):
    """(iterable of (x, y) batches, number of batches). In-memory tensors are indexed directly;
    other data sets go through a DataLoader seeded by ``seed`` + ``epoch``. Under torchrun each
    process sees its own shard (``shard``)."""
    indices = shard(dataset, shuffle, seed, epoch)
    size = len(dataset) if indices is None else len(indices)
    count = math.ceil(size / batch_size)
    g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    if isinstance(dataset, TensorDataset):
        order = (torch.tensor(indices, dtype=torch.long) if indices is not None
                 else torch.randperm(len(dataset), generator=g) if shuffle
                 else torch.arange(len(dataset)))
        x, y = dataset.tensors
        return ((x[i], y[i]) for i in order.to(x.device).split(batch_size)), count
    if indices is not None:
        dataset, shuffle = Subset(dataset, indices), False
    loader = DataLoader(dataset, batch_size, shuffle=shuffle, num_workers=workers, generator=g,
                        pin_memory=device.type == "cuda")
    return iter(loader), count


def place(dataset, device):
    """In-memory data sets move to the device once; others stay (their batches move)."""
    if isinstance(dataset, TensorDataset):
        return TensorDataset(*(t.to(device) for t in dataset.tensors))
    return dataset


def to_device(x, y, device, channels_last):
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def progress(iterable, total, desc):
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True,
                disable=not (sys.stdout.isatty() and fdist.is_main()))


# -- one step of each algorithm -------------------------------------------------------------------
def _step_reclra(model, prog, x, y, clip, autocast):
    with autocast:
        return prog.step(x, y).loss


def _step_bp(model, prog, x, y, clip, autocast):
    with autocast:
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    if clip:
        reproject_all([p.grad for p in model.parameters() if p.grad is not None], clip)
    return loss


STEPS = {"reclra": _step_reclra, "bp": _step_bp}


# -- epochs ---------------------------------------------------------------------------------------
@dataclass
class Run:
    """One algorithm's training state: the model, its program (rec-LRA), optimizer, schedule,
    and ``net``, what backprop calls (the model, or its DDP wrapper under torchrun)."""
    algo: str
    model: object
    prog: object
    optimizer: object
    scheduler: object
    history: list
    net: object = None

    @property
    def trainee(self):
        return self.prog if self.prog is not None else self.model


def train_epoch(run, exp, args, epoch, device, autocast):
    run.model.train()
    torch.manual_seed(epoch_seed(args.seed, epoch))
    it, count = batches(exp.train, args.batch_size, True, args.seed, args.workers, device, epoch)
    total, n = torch.zeros((), device=device), 0
    bar = progress(it, count, f"{run.algo} epoch {epoch}")
    for x, y in bar:
        x, y = to_device(x, y, device, args.channels_last)
        loss = STEPS[run.algo](run.net, run.prog, x, y, args.clip, autocast)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        total += loss.detach().float()
        n += 1
        if args.print_freq and n % args.print_freq == 0:
            running = (total / n).item()
            bar.set_postfix(loss=f"{running:.4f}")
            if bar.disable:
                log(f"{run.algo} epoch {epoch} [{n}/{count}] train loss {running:.4f}")
    total, n = fdist.all_reduce_sum([total, n])      # the mean over every process's batches
    return total / max(n, 1)


@torch.no_grad()
def evaluate(model, exp, args, device, autocast):
    model.eval()
    scores = metrics.Scores(exp.classes)
    it, count = batches(exp.test, args.eval_batch_size, False, 0, args.workers, device)
    for x, y in it:
        x, y = to_device(x, y, device, args.channels_last)
        with autocast:
            logits = model(x)
        scores.add(logits, y)
    if fdist.world_size() > 1:                       # every process scored its own shard
        scores.merge(fdist.all_reduce_sum)
    return scores.summary()


def diagnose(run, batch, report):
    """The diagnostics report on a fixed batch, as floats (``report`` changes no state)."""
    return {k: float(v) for k, v in report(run.prog, *batch).items()}


# -- setting up and running -----------------------------------------------------------------------
def setup(algo, exp, args, device):
    """A fresh Run: the model from the seed, compiled for rec-LRA, its optimizer and schedule."""
    torch.manual_seed(args.seed)
    model = exp.build_model().to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    prog = None
    if algo == "reclra":
        extra = dict(exp.compile_kwargs)
        # two training samples: the sites' shapes (and the error synapses' maps) are the data's
        extra["example_inputs"] = torch.stack([exp.train[k][0] for k in range(2)]).to(device)
        prog = compile_program(model, **compile_options(args), **extra)
        if fdist.world_size() > 1:
            fdist.data_parallel(prog)            # rank 0's start; updates averaged
    net = model
    if algo == "bp" and fdist.world_size() > 1:
        net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    params = (prog if prog is not None else model).parameters()
    opt = OPTIMIZERS[args.optimizer](params, lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, args.lr_steps, args.lr_decay)
    return Run(algo, model, prog, opt, sched, [], net)


def resume_path(args, algo):
    """The checkpoint a ``--resume`` run of ``algo`` continues from, or None."""
    if args.resume is None:
        return None
    return Path(args.output_dir) / f"checkpoint-{algo}.pt" if args.resume == "auto" \
        else Path(args.resume)


def train(algo, exp, args, device):
    """Train one algorithm to ``args.epochs``; returns its history (one row per epoch)."""
    run = setup(algo, exp, args, device)
    out = Path(args.output_dir)
    ckpt, start = out / f"checkpoint-{algo}.pt", 0
    source = resume_path(args, algo)
    if source is not None and (source.is_file() or args.resume != "auto"):
        state = load_checkpoint(source, run.trainee, run.optimizer, run.scheduler)
        start, run.history = int(state["epoch"]), list(state["history"])
        log(f"{algo}: resumed from {source} after epoch {start}")
    elif source is not None:
        log(f"{algo}: no checkpoint at {source}; starting from epoch 1")
    report = diagnostics_report() if (algo == "reclra" and args.diagnostics_batch
                                      and fdist.is_main()) else None
    if report is not None:
        write_diagnostics(out, keep_until=start)
        size = min(args.diagnostics_batch, len(exp.train))
        batch = to_device(*next(batches(exp.train, size, False, 0, 0, device)[0]), device,
                          args.channels_last)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if args.amp and device.type == "cuda"
                else contextlib.nullcontext())
    drawn = time.monotonic()
    for epoch in range(start + 1, args.epochs + 1):
        began = time.perf_counter()
        lr = run.optimizer.param_groups[0]["lr"]
        try:
            train_loss = train_epoch(run, exp, args, epoch, device, autocast)
        except NumericalError as exc:          # rec-LRA's step stops before anything changes
            log(f"{algo}: stopped in epoch {epoch}: {exc}")
            write_metrics(out, algo, run.history, exp.name, plot=True)
            break
        run.scheduler.step()
        if report is not None:
            write_diagnostics(out, {"algo": algo, "epoch": epoch, **diagnose(run, batch, report)})
        row = {"algo": algo, "epoch": epoch, "lr": lr, "train_loss": train_loss,
               **evaluate(run.model, exp, args, device, autocast),
               "seconds": round(time.perf_counter() - began, 3)}
        run.history.append(row)
        save_checkpoint(ckpt, run.trainee, run.optimizer, run.scheduler, epoch=epoch,
                        history=run.history, args=vars(args))
        finite = math.isfinite(train_loss)
        plot = not finite or time.monotonic() - drawn > PLOT_EVERY_S
        write_metrics(out, algo, run.history, exp.name, plot)
        drawn = time.monotonic() if plot else drawn
        log(format_row(row, args.epochs))
        if not finite:
            log(f"{algo}: the train loss is {train_loss} in epoch {epoch}; stopping this run "
                "(lower --lr or --beta, or use --error-rule hebbian-z)")
            break
    return run.history


def format_row(row, epochs):
    top5 = f"  top-5 {row['top5']:5.1f}%" if "top5" in row else ""
    return (f"{ALGOS[row['algo']]:>8} epoch {row['epoch']:3d}/{epochs}  "
            f"train loss {row['train_loss']:.4f}  test loss {row['test_loss']:.4f}  "
            f"acc {row['accuracy']:5.1f}%{top5}  F1 {row['f1']:5.1f}  ({row['seconds']:.1f}s)")


def run(args, exp):
    """Train every algorithm of ``--algo``; returns {algo: its last metrics row}."""
    algos = list(ALGOS) if args.algo == "both" else [args.algo]
    if args.resume not in (None, "auto") and len(algos) > 1:
        raise SystemExit("--resume PATH continues one algorithm: add --algo reclra or --algo bp "
                         "(plain --resume continues each from <output-dir>/checkpoint-<algo>.pt)")
    _, world, process_device = fdist.init()          # torchrun: join; else one process
    device = process_device if world > 1 else \
        torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        if args.amp:
            log("--amp is bf16 autocast on CUDA; on the CPU the run stays in float32")
    args.channels_last = device.type == "cuda"
    if fdist.is_main():
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    fdist.barrier()
    exp.train, exp.test = place(exp.train, device), place(exp.test, device)
    last = {}
    try:
        for algo in algos:
            history = train(algo, exp, args, device)
            if history:
                last[algo] = history[-1]
    finally:
        torch.set_num_threads(threads)
    draw_curves(args.output_dir, exp.name)
    log(" | ".join(f"{ALGOS[a]} test accuracy {r['accuracy']:.1f}%" for a, r in last.items())
        + f" ({exp.name}, {args.epochs} epochs)")
    return last
