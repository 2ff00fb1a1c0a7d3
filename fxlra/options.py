"""The options of a compiled program, checked once: ``fxlra.compile`` builds one frozen
:class:`Options` by :func:`check`, which raises :class:`~fxlra.errors.OptionError` naming the
first bad option before anything is traced. What the program computes is here; where it runs
(devices, the placement of error subtrees, streams, kernels) is passed on as arguments.
"""
from collections.abc import Mapping
from dataclasses import dataclass, fields

from .analysis import placement, scope as scope_mod
from . import presets
from .ops import registry
from .semantics import rules, synapses as syn
from .errors import OptionError
from .runtime.health import NONFINITE
from .analysis.params import SHARED_PARAMS

KERNEL_CHOICES = ("auto", "torch", "triton")


@dataclass(frozen=True)
class Options(Mapping):
    """What ``fxlra.compile`` was given, checked. Read ``options.beta``, or ``options["beta"]``
    as a read-only mapping (``prog.options`` is one)."""
    loss: str
    beta: float
    gamma: float
    alpha: object            # a number, or a mapping error-graph depth -> number
    kappa: object            # the same
    error_rule: str
    local_rule: str
    clip: object             # a positive number, or None
    nonfinite: str
    max_skips: int
    kernels: str
    streams: object          # "auto" or an int >= 1
    cuda_graph: bool
    preset: str
    scope: str
    norm_error: str
    map_synapse: str
    shared_params: str

    def __getitem__(self, key):
        if key not in _NAMES:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self):
        return iter(_NAMES)

    def __len__(self):
        return len(_NAMES)


_NAMES = tuple(f.name for f in fields(Options))


def check(*, preset, scope, norm_error, map_synapse, error_rule, error_init_std, devices,
          **given):
    """(Options, devices as ``torch.device``s or None) from ``fxlra.compile``'s keywords;
    OptionError names the first bad one, in the order of the checks below."""
    chosen = presets.resolve(preset, scope=scope, norm_error=norm_error, map_synapse=map_synapse,
                             error_rule=error_rule)
    o = Options(preset=preset or "fxlra", **chosen, **given)
    _check_rules(o, error_init_std)
    for name, allowed in (("norm_error", registry.NORM_ERRORS), ("map_synapse", syn.MAP_SYNAPSES),
                          ("scope", scope_mod.SCOPES), ("shared_params", SHARED_PARAMS)):
        check_choice(name, o[name], allowed)
    check_choice("nonfinite", o.nonfinite, NONFINITE)
    if not isinstance(o.max_skips, int) or isinstance(o.max_skips, bool) or o.max_skips < 1:
        raise OptionError(f"max_skips must be an int >= 1 (consecutive skipped steps allowed "
                          f"before the run stops), got {o.max_skips!r}")
    devices = placement.check_devices(devices)
    _check_streams(o.streams, devices, o.cuda_graph)
    check_choice("kernels", o.kernels, KERNEL_CHOICES)
    return o, devices


def _check_rules(o, error_init_std):
    for name, allowed in (("loss", rules.LOSSES), ("local_rule", rules.LOCAL_RULES),
                          ("error_rule", tuple(rules.ERROR_RULES))):
        check_choice(name, o[name], allowed)
    for name, value in (("beta", o.beta), ("gamma", o.gamma), ("error_init_std", error_init_std)):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise OptionError(f"{name} must be a number, got {value!r}")
    if error_init_std < 0:
        raise OptionError(f"error_init_std must be >= 0, got {error_init_std!r}")
    for name, value in (("alpha", o.alpha), ("kappa", o.kappa)):
        values = value.values() if isinstance(value, Mapping) else [value]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise OptionError(f"{name} must be a number or a mapping depth -> number, got {value!r}")
        if isinstance(value, Mapping) and not all(isinstance(k, int) and k >= 1 for k in value):
            raise OptionError(f"{name}'s keys are error-graph depths (ints >= 1), got {list(value)}")
    clip = o.clip
    if clip is not None and (not isinstance(clip, (int, float)) or clip <= 0):
        raise OptionError(f"clip must be a positive number or None, got {clip!r}")


def check_choice(name, value, allowed):
    """Raise OptionError unless ``value`` is one of ``allowed`` (strings)."""
    if not isinstance(value, str) or value not in allowed:
        raise OptionError(f"{name}={value!r} is not supported; choose one of {list(allowed)}")


def _check_streams(choice, devices, cuda_graph):
    if choice != "auto" and (not isinstance(choice, int) or isinstance(choice, bool) or
                             choice < 1):
        raise OptionError(f"streams={choice!r} is not supported; pass 'auto' (4 CUDA streams on "
                          "a GPU, 1 elsewhere) or the number of streams (an int >= 1)")
    if isinstance(choice, int) and choice > 1 and devices is not None and len(devices) > 1:
        raise OptionError(f"streams={choice} cannot be combined with devices= placement on "
                          f"{len(devices)} devices; pass streams=1 or 'auto'")
    if not isinstance(cuda_graph, bool):
        raise OptionError(f"cuda_graph must be True or False, got {cuda_graph!r}")
