"""Data parallelism on ``torch.distributed`` for rec-LRA programs.

DDP's reducer hooks into autograd, which a rec-LRA step never uses, so fxlra averages its own
updates. The generated program hands each site's finished updates to a :class:`Reducer`
(``reduce.ready``) as soon as they are computed; the reducer packs them into buckets of about
``bucket_mb`` megabytes and starts an asynchronous all-reduce per full bucket while later updates
are still being computed, and ``reduce.wait()`` finishes the rest before the updates are scaled.
Re-projection and the finiteness check then see the averaged updates, identical on every rank.

    fxlra.distributed.init()                       # env:// as torchrun sets it; NCCL or gloo
    prog = fxlra.distributed.data_parallel(fxlra.compile(model))   # same start on every rank
    sampler = torch.utils.data.DistributedSampler(dataset); sampler.set_epoch(epoch)

With equal per-rank batches, a step equals a one-process step on the concatenated batch (for
models without batch statistics; batch norm uses each rank's own statistics, as DDP does).
"""
import os

import torch
import torch.distributed as dist

from ..errors import FxlraError


def init(backend=None):
    """Join the process group torchrun describes in the environment (``env://``); a plain
    ``python`` run (no ``WORLD_SIZE``) stays a single process. Returns (rank, world size,
    device): NCCL and ``cuda:LOCAL_RANK`` when CUDA is present, else gloo and the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"),
                                init_method="env://")
    return rank(), world_size(), device


def is_active():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank():
    return dist.get_rank() if is_active() else 0


def world_size():
    return dist.get_world_size() if is_active() else 1


def is_main():
    """Whether this process prints, draws progress bars and writes files (rank 0)."""
    return rank() == 0


def barrier():
    if is_active():
        dist.barrier()


def all_reduce_sum(values):
    """Sum a list of floats (or 0-d tensors) across ranks; returns floats (metrics)."""
    flat = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if is_active():
        if dist.get_backend() == "nccl":
            flat = flat.cuda()
        dist.all_reduce(flat)
    return flat.cpu().tolist()


def broadcast_state(module, src=0):
    """Copy rank ``src``'s parameters and buffers to every rank (an identical start)."""
    if is_active():
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, src)


class Reducer:
    """Averages update tensors across ranks in buckets, asynchronously."""

    def __init__(self, group=None, bucket_mb=25.0):
        self.group = group
        self.cap = int(bucket_mb * 2 ** 20)
        self.world = dist.get_world_size(group)
        self.pending, self.pending_bytes, self.inflight = [], 0, []
        self.buckets_launched = 0

    def ready(self, tensors):
        self.pending.extend(tensors)
        self.pending_bytes += sum(t.numel() * t.element_size() for t in tensors)
        if self.pending_bytes >= self.cap:
            self._launch()

    def _launch(self):
        groups = {}
        for t in self.pending:
            groups.setdefault((t.device, t.dtype), []).append(t)
        for tensors in groups.values():
            flat = torch.cat([t.reshape(-1) for t in tensors])
            handle = dist.all_reduce(flat, group=self.group, async_op=True)
            self.inflight.append((handle, flat, tensors))
            self.buckets_launched += 1
        self.pending, self.pending_bytes = [], 0

    def wait(self):
        """Finish every all-reduce and write the averages back into the update tensors."""
        if self.pending:
            self._launch()
        for handle, flat, tensors in self.inflight:
            handle.wait()
            flat.div_(self.world)
            for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
                t.copy_(part.view(t.shape))
        self.inflight = []


def data_parallel(prog, group=None, bucket_mb=25.0):
    """Make ``prog.step`` average its updates across the ranks of ``group`` (default: all), after
    giving every rank rank 0's model, error synapses and buffers. Returns ``prog``."""
    if not (dist.is_available() and dist.is_initialized()):
        raise FxlraError("torch.distributed is not initialised: call fxlra.distributed.init() "
                         "(under torchrun) or torch.distributed.init_process_group() first")
    if not isinstance(bucket_mb, (int, float)) or bucket_mb <= 0:
        raise ValueError(f"bucket_mb must be a positive number, got {bucket_mb!r}")
    broadcast_state(prog)
    prog.reducer = Reducer(group, bucket_mb) if dist.get_world_size(group) > 1 else None
    return prog
