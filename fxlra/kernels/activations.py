"""The activations the fused target/error kernel knows: for each, a Triton snippet
``phi(x, p0, p1)`` on float32 blocks, the torch function it equals, and its parameters.

    ACTIVATIONS[name] = Activation(snippet, torch_fn, ((param, default), ...))

A parameter whose default is None is a tensor (one value, or one per channel), read at every call
(``nn.PReLU``'s learned slope). ``ALIASES`` maps fxlra's site names (module class names such as
``"ReLU"``, ``"LeakyReLU"``) to table names; ``activation_of(target, args, kwargs)`` maps a traced
activation call (a module, a function with its call arguments, or a method name) to
``(name, params)``, or None when the table has no row for it. ``resolve(name, params)`` fills in
defaults and rejects unknown names with the list of supported ones.

Triton has no tanh, log1p or expm1: they are written from ``exp``/``log`` here, with a Taylor
polynomial near 0 where cancellation would cost digits.
"""
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

from . import _checks as check


# -- activation snippets: phi(x, p0, p1) on float32 blocks -----------------------------------------
@triton.jit
def _max(x, y):
    """max that keeps a NaN, as torch does (tl.maximum alone may drop it)."""
    return tl.maximum(x, y, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _min(x, y):
    return tl.minimum(x, y, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _tanh(x):
    # tanh from exp: a Taylor polynomial near 0 avoids the cancellation in 1 - exp(-2|x|)
    a = tl.abs(x)
    t = tl.exp(-2.0 * a)
    big = (1.0 - t) / (1.0 + t)
    big = tl.where(x < 0, -big, big)
    x2 = x * x
    small = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333
                                                         + x2 * -0.05396825396825397)))
    return tl.where(a < 0.0625, small, big)


@triton.jit
def _log1p(u):
    return tl.where(u < 1e-4, u * (1.0 - 0.5 * u), tl.log(1.0 + u))


@triton.jit
def _softplus(x, beta, threshold):
    bx = x * beta
    return tl.where(bx > threshold, x, _log1p(tl.exp(bx)) / beta)


@triton.jit
def _identity(x, p0, p1):
    return x


@triton.jit
def _relu(x, p0, p1):
    return _max(x, 0.0)


@triton.jit
def _relu6(x, p0, p1):
    return _min(_max(x, 0.0), 6.0)


@triton.jit
def _tanh_phi(x, p0, p1):
    return _tanh(x)


@triton.jit
def _sigmoid(x, p0, p1):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _elu(x, p0, p1):
    return tl.where(x > 0, x, p0 * (tl.exp(x) - 1.0))


@triton.jit
def _celu(x, p0, p1):
    return _max(x, 0.0) + _min(p0 * (tl.exp(x / p0) - 1.0), 0.0)


@triton.jit
def _selu(x, p0, p1):
    return 1.0507009873554805 * tl.where(x > 0, x, 1.6732632423543772 * (tl.exp(x) - 1.0))


@triton.jit
def _gelu(x, p0, p1):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _gelu_tanh(x, p0, p1):
    return 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))


@triton.jit
def _silu(x, p0, p1):
    return x / (1.0 + tl.exp(-x))


@triton.jit
def _mish(x, p0, p1):
    return x * _tanh(_softplus(x, 1.0, 20.0))


@triton.jit
def _leaky_relu(x, p0, p1):
    return tl.where(x > 0, x, x * p0)


@triton.jit
def _hardtanh(x, p0, p1):
    return _min(_max(x, p0), p1)


@triton.jit
def _hardswish(x, p0, p1):
    return x * (_min(_max(x + 3.0, 0.0), 6.0) / 6.0)


@triton.jit
def _hardsigmoid(x, p0, p1):
    return _min(_max(x + 3.0, 0.0), 6.0) / 6.0


@triton.jit
def _softsign(x, p0, p1):
    return x / (1.0 + tl.abs(x))


@triton.jit
def _softplus_phi(x, p0, p1):
    return _softplus(x, p0, p1)


@triton.jit
def _tanhshrink(x, p0, p1):
    return x - _tanh(x)


@triton.jit
def _log_sigmoid(x, p0, p1):
    return _min(x, 0.0) - _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _sign(x, p0, p1):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))   # sign(NaN) = 0, as in torch


class Activation(NamedTuple):
    """One row of the activation table: the Triton snippet ``phi(x, p0, p1)``, the torch
    function it equals (``torch_fn(x, *params)``), and its parameters as (name, default); a
    default of None marks a tensor parameter (one value, or one per channel), read at every
    call (nn.PReLU's learned slope)."""
    snippet: Callable
    torch_fn: Callable
    params: tuple = ()


ACTIVATIONS = {
    "identity": Activation(_identity, lambda x: x),
    "relu": Activation(_relu, F.relu),
    "relu6": Activation(_relu6, F.relu6),
    "tanh": Activation(_tanh_phi, torch.tanh),
    "sigmoid": Activation(_sigmoid, torch.sigmoid),
    "elu": Activation(_elu, F.elu, (("alpha", 1.0),)),
    "celu": Activation(_celu, F.celu, (("alpha", 1.0),)),
    "selu": Activation(_selu, F.selu),
    "gelu": Activation(_gelu, F.gelu),
    "gelu_tanh": Activation(_gelu_tanh, lambda x: F.gelu(x, approximate="tanh")),
    "silu": Activation(_silu, F.silu),
    "mish": Activation(_mish, F.mish),
    "leaky_relu": Activation(_leaky_relu, F.leaky_relu, (("negative_slope", 0.01),)),
    "hardtanh": Activation(_hardtanh, F.hardtanh, (("min_val", -1.0), ("max_val", 1.0))),
    "hardswish": Activation(_hardswish, F.hardswish),
    "hardsigmoid": Activation(_hardsigmoid, F.hardsigmoid),
    "softsign": Activation(_softsign, F.softsign),
    "softplus": Activation(_softplus_phi, F.softplus, (("beta", 1.0), ("threshold", 20.0))),
    "tanhshrink": Activation(_tanhshrink, F.tanhshrink),
    "log_sigmoid": Activation(_log_sigmoid, F.logsigmoid),
    "sign": Activation(_sign, torch.sign),
    "prelu": Activation(_leaky_relu, F.prelu, (("weight", None),)),
}

# fxlra's site names (module class names) -> table names
ALIASES = {"ReLU": "relu", "ReLU6": "relu6", "Tanh": "tanh", "Sigmoid": "sigmoid", "ELU": "elu",
           "CELU": "celu", "SELU": "selu", "GELU": "gelu", "SiLU": "silu", "Mish": "mish",
           "LeakyReLU": "leaky_relu", "Hardtanh": "hardtanh", "Hardswish": "hardswish",
           "Hardsigmoid": "hardsigmoid", "Softsign": "softsign", "Softplus": "softplus",
           "Tanhshrink": "tanhshrink", "LogSigmoid": "log_sigmoid", "Sign": "sign",
           "PReLU": "prelu", "logsigmoid": "log_sigmoid"}

# traced activation calls -> table names (modules by class, functions by identity, methods by name)
_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid",
            nn.ELU: "elu", nn.CELU: "celu", nn.SELU: "selu", nn.GELU: "gelu", nn.SiLU: "silu",
            nn.Mish: "mish", nn.LeakyReLU: "leaky_relu", nn.Hardtanh: "hardtanh",
            nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid", nn.Softsign: "softsign",
            nn.Softplus: "softplus", nn.Tanhshrink: "tanhshrink", nn.LogSigmoid: "log_sigmoid",
            nn.PReLU: "prelu", nn.Identity: "identity"}
_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", torch.tanh: "tanh",
              F.tanh: "tanh", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", F.elu: "elu",
              F.celu: "celu", F.selu: "selu", torch.selu: "selu", F.gelu: "gelu", F.silu: "silu",
              F.mish: "mish", F.leaky_relu: "leaky_relu", F.hardtanh: "hardtanh",
              F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid", F.softsign: "softsign",
              F.softplus: "softplus", torch.sign: "sign", F.logsigmoid: "log_sigmoid",
              F.tanhshrink: "tanhshrink", F.prelu: "prelu"}
_METHODS = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid", "sign": "sign"}
# a string option that selects another table row: name -> (option, default, {value: row})
_VARIANTS = {"gelu": ("approximate", "none", {"none": "gelu", "tanh": "gelu_tanh"})}


def supported():
    """The activation names the kernel accepts (table names, then fxlra's aliases)."""
    return sorted(ACTIVATIONS) + sorted(ALIASES)


def resolve(activation, params=(), where="target_and_error"):
    """``(table row name, values)`` for a name and its parameters, defaults filled in: one value
    per parameter of the row, a float, or a tensor for a tensor parameter."""
    name = ALIASES.get(activation, activation)
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"{where}: activation {activation!r} is not supported; expected one of "
                         f"{', '.join(supported())}")
    spec = ACTIVATIONS[name].params
    params = tuple(params)
    if len(params) > len(spec):
        check.fail(where, "params", "length", len(params),
                   f"at most {len(spec)} for {name} ({', '.join(p for p, _ in spec) or 'none'})")
    values = []
    for k, (pname, default) in enumerate(spec):
        value = params[k] if k < len(params) else default
        if default is None:
            if not isinstance(value, torch.Tensor):
                check.fail(where, f"params[{k}]", "type", type(value).__name__,
                           f"a tensor ({name}'s {pname}: one value or one per channel)")
        else:
            value = float(value)
        values.append(value)
    return name, tuple(values)


def activation_of(target, args=(), kwargs=None):
    """``(name, params)`` for a traced activation call: an ``nn.Module`` instance, a function
    (``args``/``kwargs`` as in the call, the input first) or a method name; None when the table
    has no row for it (the caller keeps its torch code)."""
    kwargs = kwargs or {}
    if isinstance(target, nn.Module):
        name = _MODULES.get(type(target))         # exact class: a subclass may change forward
        if name in _VARIANTS:
            option, default, rows = _VARIANTS[name]
            name = rows.get(getattr(target, option, default))
        if name is None:
            return None
        return name, tuple(getattr(target, p, d) for p, d in ACTIVATIONS[name].params)
    if isinstance(target, str):
        name = _METHODS.get(target)
        return None if name is None else (name, ())
    try:
        name = _FUNCTIONS.get(target)
    except TypeError:                                          # unhashable
        name = None
    if name is None:
        return None
    if name in _VARIANTS:
        option, default, rows = _VARIANTS[name]
        name = rows.get(kwargs.get(option, args[1] if len(args) > 1 else default))
        if name is None:
            return None
        args = args[:1]
    spec = ACTIVATIONS[name].params
    values = [kwargs.get(p, args[k + 1] if len(args) > k + 1 else d)
              for k, (p, d) in enumerate(spec)]
    return name, tuple(values)


__all__ = ["ACTIVATIONS", "ALIASES", "Activation", "activation_of", "resolve", "supported"]
