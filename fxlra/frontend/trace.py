"""Tracing: turn any ``nn.Module`` into an ``fx.GraphModule``, or explain why it cannot be done.

Standard ``torch.nn`` modules stay leaves (fx's default); ``leaf_modules`` adds classes or
qualified module names, ``concrete_args`` is passed through. A library's own registry of
modules and functions not to trace (timm's, when timm is imported) is used too. A tracing failure becomes a
:class:`~fxlra.errors.TraceError` naming the user's file and line, the kind of problem and the fixes.
"""
import inspect
import os
import sys
import traceback

import torch
from torch import fx, nn
from torch.fx._symbolic_trace import PHBase

from .containers import traced_forward
from ..errors import TraceError, UnsupportedError
from ..ops.registry import (registered_activation_functions, registered_activation_modules,
                  rule_module_types)

# (substring of the fx/torch message, kind of problem, the fix that applies first)
_PROBLEMS = (
    ("cannot be used as inputs to control flow",
     "control flow on a tensor (an `if`, `while` or `assert` on a traced value)",
     "pass the deciding argument in concrete_args=, or make the enclosing module a leaf "
     "(leaf_modules=[...]) and fxlra will treat it as one op"),
    ("cannot be iterated",
     "iteration over a traced value (a loop or unpacking of a tensor)",
     "index the tensor explicitly, or make the enclosing module a leaf (leaf_modules=[...])"),
    ("'len' is not supported",
     "len() of a traced value",
     "use x.shape[0] inside a function wrapped with torch.fx.wrap, or make the module a leaf"),
    ("cannot be interpreted as an integer",
     "a shape used as a Python value (for example range(x.size(0)))",
     "move that code into a function decorated with torch.fx.wrap, or make the module a leaf"),
    ("as an index",
     "a shape used as a Python value (a traced value used as an index)",
     "move that code into a function decorated with torch.fx.wrap, or make the module a leaf"),
)
_DEFAULT_PROBLEM = ("an operation torch.fx cannot trace",
                    "make the module that does it a leaf (leaf_modules=[...]), wrap the function "
                    "with torch.fx.wrap, or fix its Python-valued arguments with concrete_args=")

_LIBRARY_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, fx))
_OWN_DIR = os.path.dirname(__file__) + os.sep


# libraries that keep their own registry of modules and functions fx must not trace through
# (the ones their feature extraction uses): (module, its modules getter, its functions getter);
# read only when the library is already imported, so a model built with it gets its leaves
_LIBRARY_REGISTRIES = (("timm.layers", "get_notrace_modules", "get_notrace_functions"),)


def library_leaves():
    """(module classes, functions) that imported libraries ask tracers to keep as one op."""
    classes, functions = [], []
    for name, get_modules, get_functions in _LIBRARY_REGISTRIES:
        lib = sys.modules.get(name)
        if lib is None:
            continue
        classes += [c for c in getattr(lib, get_modules, list)() if isinstance(c, type)]
        functions += [f for f in getattr(lib, get_functions, list)() if callable(f)]
    return tuple(classes), tuple(functions)


class _Tracer(fx.Tracer):
    def __init__(self, leaf_modules=()):
        classes, functions = library_leaves()
        super().__init__(autowrap_functions=tuple(registered_activation_functions()) + functions)
        self._leaf_types = tuple(t for t in leaf_modules if isinstance(t, type)) + classes
        self._leaf_types += tuple(registered_activation_modules()) + tuple(rule_module_types())
        self._leaf_names = {n for n in leaf_modules if isinstance(n, str)}

    def is_leaf_module(self, m, qualname):
        if isinstance(m, self._leaf_types) or qualname in self._leaf_names:
            return True
        if traced_forward(m) is not None:            # nn.TransformerEncoder and its kin
            return False
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        through = traced_forward(m)
        if through is not None and not self.is_leaf_module(m, self.path_of_module(m)):
            forward = through
        return super().call_module(m, forward, args, kwargs)


def _user_frame(exc):
    """The innermost traceback frame that belongs to neither torch nor fxlra."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        name = frame.filename
        if not name.startswith(_LIBRARY_DIRS + (_OWN_DIR,)) and not name.startswith("<"):
            return frame
    return frames[-1] if frames else None


def _explain(exc):
    text = str(exc)
    for needle, kind, fix in _PROBLEMS:
        if needle in text:
            return kind, fix
    return _DEFAULT_PROBLEM


def trace(model, leaf_modules=(), concrete_args=None):
    """Symbolically trace ``model`` into a GraphModule whose submodules are the model's own."""
    if not isinstance(model, nn.Module):
        raise TraceError(f"fxlra.compile expects an nn.Module, got {type(model).__name__}")
    leaf_modules = tuple(leaf_modules or ())
    bad = [x for x in leaf_modules if not (isinstance(x, str) or
                                             (isinstance(x, type) and issubclass(x, nn.Module)))]
    if bad:
        raise TraceError(f"leaf_modules= takes nn.Module classes or qualified module names; "
                         f"got {bad!r}")
    tracer = _Tracer(leaf_modules)
    tracer.record_stack_traces = True
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # fx raises many kinds; each becomes one clear message
        kind, fix = _explain(exc)
        frame = _user_frame(exc)
        where = f"{frame.filename}:{frame.lineno} ({frame.line.strip() if frame.line else ''})" \
            if frame else "an unknown place"
        error = TraceError(
            f"fxlra could not trace {type(model).__name__}: {kind} at {where}. "
            f"Fix: {fix}. (torch.fx said: {type(exc).__name__}: {exc})")
        error.kind = kind          # what compile(frontend="auto") says of why it fell back
        raise error from None
    _bind_concrete_args(model, graph, concrete_args or {})
    _check_inputs(model, graph)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _check_inputs(model, graph):
    """The program's signature is forward's: it needs at least one input, and no ``*args`` or
    ``**kwargs`` (the program would bind a batch to the tuple or dict itself)."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    variadic = [n.target for n in placeholders if n.target.startswith("*")]
    required = [n.target for n in placeholders if not n.args and not n.target.startswith("*")]
    if required and not variadic:
        return
    problem = f"takes variable arguments ({', '.join(variadic)})" if variadic else \
        "takes no input"
    raise UnsupportedError(
        f"{type(model).__name__}.forward {problem}; fxlra's step(x, y) and prog(x) feed named "
        f"inputs. Fix: define forward(self, x), fix other arguments with "
        f"concrete_args={{name: value}}, or wrap the model in a module whose forward(x) calls it")


def _is_literal(value):
    """Whether ``repr(value)`` is Python source for it (a placeholder default must be)."""
    if isinstance(value, (tuple, list)):
        return all(_is_literal(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, complex, str))


def _bind_concrete_args(model, graph, concrete_args):
    """Make each specialised argument's placeholder default to its concrete value, so that the
    program is called with the remaining inputs only (fx keeps a guard that checks a literal
    value; a tensor or other object is inlined as a constant and its placeholder left unused,
    so it defaults to None)."""
    names = list(inspect.signature(model.forward).parameters)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for name, node in zip(names, placeholders):
        if name not in concrete_args or isinstance(concrete_args[name], PHBase):
            continue
        value = concrete_args[name]
        if not _is_literal(value) and node.users:
            raise TraceError(f"concrete_args[{name!r}] is a {type(value).__name__} that torch.fx "
                             f"kept as an input of the traced graph; pass a tensor, or a Python "
                             f"number, string, bool or None (or tuples of them)")
        node.args = (value if _is_literal(value) else None,)
