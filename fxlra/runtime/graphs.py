"""CUDA-graph replay of the update program (``fxlra.compile(..., cuda_graph=True)``).

The first step with a new batch shape copies the batch into static buffers, runs the program a
few times on a side stream (warm-up: cuDNN and Triton choose their kernels), captures one run
as a CUDA graph, and puts the buffers the forward writes (normalisation statistics) and the RNG
state back as they were before the warm-up. Every step then copies the batch into the static
buffers and replays the graph, whose outputs (loss, errors, updates, their norms) live at the
same addresses every time: ``prog.step`` copies what it keeps. One graph is kept per input
shape, dtype, train/eval mode and autocast state, so a smaller last batch captures a second one.
Parameters must stay the same tensors (optimizers update them in place); moving the program
to another device drops the graphs.
"""
import torch

from . import health
from ..errors import OptionError

WARMUP_RUNS = 2


class CudaGraphs:
    """Capture and replay with ``torch.cuda.CUDAGraph``."""

    def __init__(self, device):
        self.device = device

    def warm_up(self, fn, runs):
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), _uncached_autocast():
            for _ in range(runs):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)

    def capture(self, fn):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), _uncached_autocast():
            out = fn()
        return graph, out

    def replay(self, graph, out):
        graph.replay()
        return out

    def rng_state(self):
        return torch.cuda.get_rng_state(self.device)

    def set_rng_state(self, state):
        torch.cuda.set_rng_state(state, self.device)


def _uncached_autocast():
    """The caller's autocast state without its cache of cast weights: a cast done in the
    warm-up and reused by the capture would leave it out of the graph, and every replay would
    read the weights as they were at capture."""
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                          enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)


def backend_for(device):
    """The capture backend for ``device``, or None where CUDA graphs do not exist."""
    return CudaGraphs(device) if device.type == "cuda" else None


class GraphCache:
    """One captured graph per batch signature; ``run`` replays it on a new batch."""

    def __init__(self, backend):
        self.backend = backend
        self.graphs = {}

    def __len__(self):
        return len(self.graphs)

    @staticmethod
    def signature(inputs, labels, training):
        cast = torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda")
        tensors = tuple((tuple(t.shape), t.dtype, t.device) for t in (*inputs, labels))
        return tensors, training, cast

    def run(self, fn, inputs, labels, training, buffers):
        """``fn(*inputs, labels)``'s outputs for this batch, from a graph replay."""
        key = self.signature(inputs, labels, training)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(fn, inputs, labels, buffers)
        static_inputs, static_labels, graph, out = entry
        for static, t in zip((*static_inputs, static_labels), (*inputs, labels)):
            static.copy_(t, non_blocking=True)
        return self.backend.replay(graph, out)

    def _capture(self, fn, inputs, labels, buffers):
        static_inputs = [t.clone() for t in inputs]
        static_labels = labels.clone()
        snapshot = health.BufferSnapshot(buffers)
        rng = self.backend.rng_state()

        def call():
            return fn(*static_inputs, static_labels)
        self.backend.warm_up(call, WARMUP_RUNS)
        graph, out = self.backend.capture(call)
        snapshot.restore()              # the warm-up's statistics updates are not a step
        self.backend.set_rng_state(rng)
        return static_inputs, static_labels, graph, out


def check_usable(cache, device, reducer):
    """OptionError when a program on ``device`` (compiled with cuda_graph=True, its graph
    ``cache`` None where graphs do not exist) cannot replay graphs."""
    if cache is None:
        raise OptionError(f"cuda_graph=True needs the program on a CUDA device; it is on "
                          f"{device}. Move it with prog.to('cuda') or compile with "
                          "cuda_graph=False")
    if reducer is not None:
        raise OptionError("cuda_graph=True cannot be combined with data-parallel training "
                          "(the all-reduce of the updates is not captured); compile with "
                          "cuda_graph=False")
