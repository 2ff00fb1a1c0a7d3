"""The exceptions fxlra raises for user mistakes.

Every message names what was wrong (the node, parameter, site or argument), what was seen and
what was expected, and how to fix it. They subclass ``ValueError`` or ``TypeError`` so that code
catching the builtin kinds keeps working.
"""


class FxlraError(Exception):
    """Base class of every error fxlra raises on purpose."""


class TraceError(FxlraError, TypeError):
    """The model could not be traced by torch.fx."""


class UnsupportedError(FxlraError, TypeError):
    """The model uses something fxlra has no rule for."""


class PlanError(FxlraError, ValueError):
    """The traced graph cannot be turned into a rec-LRA plan (unowned parameter, unknown shapes)."""


class WiringError(FxlraError, ValueError):
    """The requested error graph is not valid for this model."""


class OptionError(FxlraError, ValueError):
    """An option of ``fxlra.compile`` has a bad value."""


class InputError(FxlraError, ValueError):
    """A batch handed to ``step``/``updates`` is not usable (wrong shape, dtype, range or values)."""


class NumericalError(FxlraError, FloatingPointError):
    """A step produced a non-finite loss, error or update; nothing was changed."""


class CheckpointError(FxlraError, ValueError):
    """A checkpoint cannot be written or loaded (unsafe contents, another model or wiring)."""


class DataError(FxlraError, FileNotFoundError):
    """A data set is missing or unreadable at the given path (fxlra never downloads data); the
    message names the path and lists the files expected there."""
