"""fxlra: train PyTorch models without backpropagation, by recursive local representation
alignment (rec-LRA), compiled from torch.fx traces.

The package is laid out by pipeline stage: ``frontend`` (tracing), ``ops`` (the op registry
and the local rules), ``analysis`` (error sites, wiring, the Plan), ``semantics`` (the equations
and the reference interpreter), ``codegen`` (the generated update program), ``runtime`` (the
Program, health, CUDA graphs, processes, checkpoints) and ``train`` (training loops, flags,
metrics, data). The modules users name keep their short public names (``fxlra.wiring``,
``fxlra.distributed``, ...), importable as such.
"""
import sys

from . import diagnostics, draw, kernels, models, nn
from .analysis import plan, scope, wiring
from .analysis.plan import Plan
from .codegen import streams
from .compiler import compile
from .errors import (CheckpointError, DataError, FxlraError, InputError, NumericalError, OptionError,
                     PlanError, TraceError, UnsupportedError, WiringError)
from .ops.registry import register_activation
from .runtime import checkpoint, distributed
from .runtime.checkpoint import load, save, seed_everything
from .runtime.program import Program, StepResult
from .semantics import rules
from .train import data, training

# the public module names, as the README and the examples import them (import fxlra.wiring)
PUBLIC_MODULES = {"wiring": wiring, "plan": plan, "scope": scope, "rules": rules,
                  "streams": streams, "distributed": distributed, "checkpoint": checkpoint,
                  "data": data, "training": training}
for _name, _module in PUBLIC_MODULES.items():
    sys.modules.setdefault(f"{__name__}.{_name}", _module)

__all__ = ["compile", "save", "load", "seed_everything", "Program", "StepResult", "Plan",
           "register_activation", "CheckpointError", "DataError", "FxlraError", "InputError",
           "NumericalError", "OptionError", "PlanError", "TraceError", "UnsupportedError",
           "WiringError", "diagnostics", "draw", "kernels", "models", "nn"] + list(PUBLIC_MODULES)
__version__ = "0.1.0"
