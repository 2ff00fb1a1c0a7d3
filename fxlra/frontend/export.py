"""The second way in: capture a model with ``torch.export`` (training mode, an ATen-level graph)
where ``torch.fx.symbolic_trace`` cannot trace it (data-dependent Python, library code that
checks its inputs).

The exported graph is turned into the same kind of ``fx.GraphModule`` the symbolic tracer
gives: one placeholder per tensor input (the positional example inputs, then the tensor keyword
inputs, in order; every other keyword input is fixed at its example value), the model's own
parameters and buffers read by their qualified names (``get_attr``), and the tensors it returns
in the order ``torch.utils._pytree`` flattens them (a model output's ``logits``). The batch
axis is a ``torch.export.Dim``, so one program serves every batch size; a model that computes
with its batch size as a number (``len(x)``) is captured at the example's, and
``gm.meta["fixed_batch"]`` says so. Every node keeps ``nn_module_stack``, the modules it came
from.
"""
import contextlib
import inspect
import io
import logging

import torch
from torch import fx
from torch.utils import _pytree

from ..errors import OptionError, TraceError

FRONTENDS = ("auto", "fx", "export")
# ops that only check a value's metadata at run time (and would count as a second use of it)
_CHECKS = (torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten._assert_scalar.default,
           torch.ops.aten.sym_constrain_range_for_size.default)


def builtin_module_call(node):
    """The qualified name of the torch.nn module whose call an exported ATen node is part of
    (the innermost of its ``nn_module_stack``), or None: symbolic tracing keeps such a module
    one op (its leaf), while torch.export spells it as several (Conv2d with
    ``padding_mode="reflect"``: ``aten.pad`` then ``aten.conv2d``)."""
    stack = node.meta.get("nn_module_stack")
    if not stack or not isinstance(node.target, torch._ops.OpOverload):
        return None                  # not an ATen op: symbolic tracing's stacks can be late
    path, kind = list(stack.values())[-1]
    kind = kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"
    builtin = kind.startswith("torch.nn.") and not kind.endswith(".Sequential")
    return path if builtin else None


def example_batch(example_inputs):
    """``example_inputs`` as a tuple of positional inputs."""
    if example_inputs is None:
        return ()
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else \
        (example_inputs,)


def _batch_size(args, kwargs):
    tensors = [a for a in _pytree.tree_leaves((args, kwargs))
               if isinstance(a, torch.Tensor) and a.dim() > 0]
    return tensors[0].shape[0] if tensors else None


def _dynamic_shapes(model, args, kwargs, batch):
    """Every tensor input whose first axis is the batch's gets the dynamic ``batch`` axis, by
    the name of forward's argument that takes it."""
    dim = torch.export.Dim("batch")

    def spec(a):
        if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == batch:
            return {0: dim}
        return None
    names = list(inspect.signature(model.forward).parameters)
    given = dict(zip(names, args)) | kwargs
    return {k: _pytree.tree_map(spec, v) for k, v in given.items()}


def _flatten(graph):
    """The graph with plain positional inputs and outputs: the input checks and the pytree
    (un)flattening of ``ExportedProgram.module()`` are dropped, placeholders that do not hold a
    tensor (fixed keyword inputs) removed, and the returned tensors kept in order."""
    for node in list(graph.nodes):
        if (node.op == "call_module" and node.target == "_guards_fn") or \
                (node.op == "call_function" and node.target in _CHECKS):
            graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "placeholder" and not isinstance(node.meta.get("val"), torch.Tensor) \
                and not node.users:
            graph.erase_node(node)
    out = next(n for n in graph.nodes if n.op == "output")
    leaves = [a for a in _pytree.tree_leaves(out.args[0]) if isinstance(a, fx.Node)]
    out.args = (leaves[0] if len(leaves) == 1 else tuple(leaves),)
    graph._codegen = fx.graph.CodeGen()
    graph.lint()
    return graph


def export(model, example_inputs, example_kwargs=None):
    """``model`` captured by ``torch.export`` in training mode, as a GraphModule whose
    parameters and buffers are the model's own tensors."""
    args, kwargs = example_batch(example_inputs), dict(example_kwargs or {})
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs.setdefault("use_cache", False)    # a training step keeps no key/value cache
    if not args and not kwargs:
        raise OptionError("frontend='export' needs an example batch: pass "
                          "example_inputs=x (a tensor or a tuple of the model's positional "
                          "inputs) and, for keyword inputs, example_kwargs={name: value}")
    batch = _batch_size(args, kwargs)
    if batch is not None and batch < 2:
        raise OptionError(f"the example batch has {batch} sample; torch.export fixes a batch "
                          "axis of size 1, so pass at least 2 samples in example_inputs")
    fixed = None
    try:
        with _quiet():
            try:
                ep = torch.export.export(model, args, kwargs=kwargs, strict=False,
                                         dynamic_shapes=_dynamic_shapes(model, args, kwargs,
                                                                        batch))
            except torch._dynamo.exc.UserError as exc:
                if "Constraints violated" not in str(exc):
                    raise
                fixed = batch       # the model computes with its batch size (len(x))
                ep = torch.export.export(model, args, kwargs=kwargs, strict=False)
    except Exception as exc:  # export raises many kinds; each becomes one clear message
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        error = TraceError(
            f"fxlra could not capture {type(model).__name__} with torch.export: {first}. Fix: "
            "check that the model runs on example_inputs/example_kwargs, and that it treats "
            f"every sample of a batch alike (torch.export said: {type(exc).__name__})")
        error.reason = f"{type(exc).__name__}: {first}"
        raise error from None
    unlifted = ep.module()
    gm = fx.GraphModule(unlifted, _flatten(unlifted.graph), type(model).__name__)
    gm.meta["fixed_batch"] = fixed
    return gm, _flat_inputs(model, args, kwargs)


@contextlib.contextmanager
def _quiet():
    """torch.export logs and prints the graph it had when it fails; the TraceError says what
    failed."""
    loggers = [logging.getLogger(n) for n in ("torch", "torch.fx.experimental.symbolic_shapes",
                                              "torch._dynamo", "torch.export")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def _flat_inputs(model, args, kwargs):
    """The example batch as the exported graph takes it: its tensors, the keyword ones in the
    order of ``forward``'s signature (as torch.export orders them)."""
    order = list(inspect.signature(model.forward).parameters)
    ordered = sorted(kwargs, key=lambda k: order.index(k) if k in order else len(order))
    leaves = _pytree.tree_leaves((args, {k: kwargs[k] for k in ordered}))
    tensors = tuple(a for a in leaves if isinstance(a, torch.Tensor))
    return tensors[0] if len(tensors) == 1 else tensors
