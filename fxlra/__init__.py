"""fxlra: train PyTorch models without backpropagation, by recursive local representation
alignment (rec-LRA), compiled from torch.fx traces."""
from . import wiring
from .checkpoint import load, save, seed_everything
from .errors import (CheckpointError, DataError, FxlraError, InputError, NumericalError, OptionError,
                     PlanError, TraceError, UnsupportedError, WiringError)
from .registry import register_activation
from .plan import Plan
from .compiler import compile
from .program import Program, StepResult

__all__ = ["compile", "save", "load", "seed_everything", "Program", "StepResult", "Plan",
           "wiring", "register_activation", "CheckpointError", "DataError", "FxlraError", "InputError",
           "NumericalError", "OptionError", "PlanError", "TraceError", "UnsupportedError",
           "WiringError"]
__version__ = "0.1.0"
