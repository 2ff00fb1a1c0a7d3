"""Shapes without compute: run a traced graph once on fake tensors (or, for ops that need
values, on real ones) and store every node's tensor metadata, probing input shapes from the
model's first layer when no example batch is given. The model's buffers are left unchanged.
"""
import logging

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

from .errors import PlanError

_PROBE_SIZES = (64, 32, 28, 224, 299, 96, 128)


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


def _record_shapes(gm, args, fake):
    if not fake:
        with torch.no_grad():
            _ShapeRecorder(gm).run(*args)
        return
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    values = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    with mode:
        _ShapeRecorder(gm).run(*values)


def propagate_shapes(gm, example_inputs=None):
    """Fill ``node.meta['tensor_meta']`` without computing anything (fake tensors)."""
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
        for fake, args in [(True, a) for a in candidates] + [(False, a) for a in candidates]:
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
                b.copy_(saved[n])
    detail = "; ".join(errors[-2:]) or "its first layer does not tell the input's channel count"
    fix = "Check that example_inputs is a batch the model accepts" if example_inputs is not None \
        else "Pass one example batch: fxlra.compile(model, example_inputs=x)"
    raise PlanError(f"fxlra cannot infer the tensor shapes of {gm.__class__.__name__} "
                    f"({detail}). {fix}")


def tensor_meta(node):
    """The node's TensorMetadata (shape, dtype, ...) if it computes one tensor, else None."""
    meta = node.meta.get("tensor_meta")
    return meta if isinstance(meta, TensorMetadata) else None


def shape_of(node):
    meta = tensor_meta(node)
    return tuple(meta.shape) if meta is not None else None


def tensor_valued(node):
    """Whether a node computes tensors, alone or in (nested) tuples, not shapes, ints or other
    Python values."""
    meta = node.meta.get("tensor_meta")
    leaves = torch.utils._pytree.tree_leaves(meta, is_leaf=lambda m: isinstance(m, TensorMetadata))
    return any(isinstance(m, TensorMetadata) for m in leaves)
