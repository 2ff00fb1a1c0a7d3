"""Shapes: run a traced graph on fake tensors (on real ones for small inputs, where they are
cheaper, and for ops that need values) and store every node's tensor metadata and batch axis,
probing input shapes from the model's first layer when no example batch is given. The model's
buffers are left unchanged.
"""
import logging

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

from ..errors import PlanError

_PROBE_SIZES = (64, 32, 28, 224, 299, 96, 128)
_SMALL_SAMPLE = 3 * 64 * 64       # elements per sample up to which real tensors are cheaper
_SMALL_MODEL = 50_000_000         # ... for models of up to this many parameters

# ops that can move the batch axis from the front or merge it with another; a graph without one
# keeps every value batch-first, and its batch axes need no second run
_AXIS_METHODS = frozenset(("permute", "transpose", "movedim", "swapaxes", "unbind", "reshape",
                           "view", "unflatten", "t", "mT", "expand", "repeat"))
_AXIS_FUNCTIONS = frozenset((torch.permute, torch.transpose, torch.movedim, torch.swapaxes,
                             torch.unbind, torch.reshape, torch.unflatten, torch.einsum,
                             torch.t))
_AXIS_MODULES = (nn.MultiheadAttention, nn.modules.rnn.RNNBase, nn.Unflatten)
_aten = torch.ops.aten
_AXIS_ATEN = frozenset((_aten.permute, _aten.transpose, _aten.movedim, _aten.swapaxes,
                        _aten.unbind, _aten.reshape, _aten.view, _aten._unsafe_view,
                        _aten.unflatten, _aten.flatten, _aten.t, _aten.expand, _aten.repeat,
                        _aten.einsum))


def _flattens_batch(n, modules):
    """A flatten that starts at axis 0 (``x.flatten(1)`` and ``nn.Flatten()`` keep the batch)."""
    if n.op == "call_module":
        return isinstance(modules[n.target], nn.Flatten) and modules[n.target].start_dim == 0
    if (n.op, n.target) not in (("call_method", "flatten"), ("call_function", torch.flatten)):
        return False
    return n.kwargs.get("start_dim", n.args[1] if len(n.args) > 1 else 0) == 0


def _may_move_batch_axis(gm):
    modules = dict(gm.named_modules())
    return any((n.op == "call_method" and n.target in _AXIS_METHODS) or
               (n.op == "call_function" and (n.target in _AXIS_FUNCTIONS or
                                             getattr(n.target, "overloadpacket", 0) in _AXIS_ATEN)) or
               (n.op == "call_module" and isinstance(modules[n.target], _AXIS_MODULES)) or
               _flattens_batch(n, modules) for n in gm.graph.nodes)


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph on fake tensors and stores each node's tensor metadata."""

    def run_node(self, n):
        result = super().run_node(n)
        n.meta["tensor_meta"] = torch.utils._pytree.tree_map(
            lambda v: _extract_tensor_metadata(v) if isinstance(v, torch.Tensor) else v, result)
        return result


def _probe_candidates(gm, modules):
    """Example input shapes to try, from the first parametrised module that reads the input."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder" and not n.args]
    if len(inputs) != 1:
        return []
    frontier, seen = [inputs[0]], set()
    while frontier:
        node = frontier.pop(0)
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module":
            m = modules[node.target]
            rank = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}.get(type(m))
            like = dict(dtype=m.weight.dtype, device=m.weight.device) if rank or \
                isinstance(m, nn.Linear) else {}
            if rank:
                return [torch.zeros((2, m.in_channels) + (s,) * rank, **like)
                        for s in _PROBE_SIZES]
            if isinstance(m, nn.Linear):
                return [torch.zeros(2, m.in_features, **like)]
            size = getattr(m, "input_size", None)
            if size is not None and isinstance(getattr(m, "in_channels", None), int):
                weight = next(m.parameters())
                return [torch.zeros((2, m.in_channels) + tuple(size), dtype=weight.dtype,
                                    device=weight.device)]
            if isinstance(m, nn.Embedding):
                return [torch.zeros(2, 16, dtype=torch.long)]
        frontier.extend(node.users)
    return []


class _BatchAxisRecorder(fx.Interpreter):
    """Runs the graph again on a batch one larger and marks, per single-tensor node, whether
    its first axis is the batch axis: the only one that grew, from B to B + 1 (not a batch
    merged with another axis, B * T)."""

    def __init__(self, gm, batch):
        super().__init__(gm)
        self.batch = batch

    def run_node(self, n):
        result = super().run_node(n)
        before = tensor_meta(n)
        if isinstance(result, torch.Tensor) and before is not None:
            old, new = tuple(before.shape), tuple(result.shape)
            first = len(old) > 0 and old[1:] == new[1:] and old[0] != new[0]
            n.meta["batch_first"] = True if len(old) != len(new) else \
                "merged" if first and old[0] != self.batch else first
        return result


def _run(recorder, args, fake):
    if not fake:        # the random generators are restored: compiling draws nothing
        cuda = sorted({a.device.index or 0 for a in args
                       if isinstance(a, torch.Tensor) and a.is_cuda})
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            recorder.run(*args)
        return
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    values = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    with mode:
        recorder.run(*values)


def _small(args, gm):
    """Whether real tensors are cheaper than fake ones for these inputs: fake tensors' per-op
    overhead dominates for small inputs to models of moderate size (a GhostNet at 64 x 64:
    0.05 s real, 0.9 s fake; not a 600M-parameter RegNet), and a GPU computes a batch at once."""
    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.dim() > 0]
    if tensors and all(a.is_cuda for a in tensors):
        return True
    return sum(p.numel() for p in gm.parameters()) <= _SMALL_MODEL and \
        all(a[0].numel() <= _SMALL_SAMPLE for a in tensors)


def _record_shapes(gm, args, fake):
    _run(_ShapeRecorder(gm), args, fake)
    _record_batch_axes(gm, args, fake)


def _record_batch_axes(gm, args, fake):
    """``node.meta["batch_first"]``: rerun at batch B + 1 (each input's first sample appended)
    and see which axis grows. A model that accepts only its example's batch size keeps the
    convention that every tensor is batch-first (nothing is marked)."""
    for n in gm.graph.nodes:
        n.meta.pop("batch_first", None)
    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.dim() > 0]
    if not tensors or not _may_move_batch_axis(gm):
        return
    batch = tensors[0].shape[0]
    grown = tuple(torch.cat([a, a[:1]]) if isinstance(a, torch.Tensor) and a.dim() > 0
                  and a.shape[0] == batch else a for a in args)
    try:
        _run(_BatchAxisRecorder(gm, batch), grown, fake)
    except Exception:   # a fixed batch size (a reshape to a literal); no batch axes are known
        for n in gm.graph.nodes:
            n.meta.pop("batch_first", None)


def propagate_shapes(gm, example_inputs=None):
    """Fill ``node.meta['tensor_meta']`` and ``node.meta['batch_first']``."""
    modules = dict(gm.named_modules())
    if example_inputs is not None:
        candidates = [example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)]
    else:
        candidates = [(x,) for x in _probe_candidates(gm, modules)]
    errors = []
    quiet = logging.getLogger("torch._subclasses.fake_tensor")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)      # a rejected probe shape is expected, not an error
    saved = {n: b.clone() for n, b in gm.named_buffers()}
    try:
        # fake tensors first (no compute); real ones for ops that need values (a leaf module
        # with data-dependent control flow); the model's buffers are restored either way
        for fake, args in [(not _small(a, gm), a) for a in candidates] + \
                [(False, a) for a in candidates if not _small(a, gm)]:
            try:
                _record_shapes(gm, args, fake)
                return
            except Exception as exc:  # a shape the model rejects; try the next candidate
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                errors.append(f"input {tuple(args[0].shape) if args else ()}: {first}")
    finally:
        quiet.setLevel(level)
        with torch.no_grad():
            for n, b in gm.named_buffers():
                if b.shape == saved[n].shape:
                    b.copy_(saved[n])
                else:            # a buffer sized by its first forward (noise masks)
                    b.data = saved[n]
    detail = "; ".join(errors[-2:]) or "its first layer does not tell the input's channel count"
    fix = "Check that example_inputs is a batch the model accepts" if example_inputs is not None \
        else "Pass one example batch: fxlra.compile(model, example_inputs=x)"
    error = PlanError(f"fxlra cannot infer the tensor shapes of {gm.__class__.__name__} "
                      f"({detail}). {fix}")
    error.detail = detail                # what the graph failed with (compiler: export instead)
    raise error


def tensor_meta(node):
    """The node's TensorMetadata (shape, dtype, ...) if it computes one tensor, else None."""
    meta = node.meta.get("tensor_meta")
    return meta if isinstance(meta, TensorMetadata) else None


def batch_first(node, merged=False):
    """Whether the node's first axis is its batch axis (True where unknown). A value whose batch
    axis moved (attention's permuted q, k, v) cannot hold a site's neurons; with ``merged``, a
    first axis that is the batch merged with another (B * windows) counts too."""
    mark = node.meta.get("batch_first", True)
    return mark is True or (merged and mark == "merged")


def shape_of(node):
    meta = tensor_meta(node)
    return tuple(meta.shape) if meta is not None else None


def tensor_valued(node):
    """Whether a node computes tensors, alone or in (nested) tuples, not shapes, ints or other
    Python values."""
    meta = node.meta.get("tensor_meta")
    leaves = torch.utils._pytree.tree_leaves(meta, is_leaf=lambda m: isinstance(m, TensorMetadata))
    return any(isinstance(m, TensorMetadata) for m in leaves)
