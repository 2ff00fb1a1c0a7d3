"""Triton kernels of fxlra (``fxlra.kernels``).

    target_and_error(h, z, d, activation, *, beta, alpha, kappa, params, channel_dim,
                     with_target)                      -> (y, e, sq)      target_error.py
    pseudo_conv_forward(x, noise, weight, nmasks, bias) -> out            pseudo_conv.py
    pseudo_conv_update(x, noise, e, nmasks, *, bias, scale, out_dtype) -> (dW, db)
    perturbative_forward(m, x), perturbative_grads(m, x, c)   (the layer-level forms)
    reproject_(updates, clip, norms=None)               -> updates, in place   reproject.py
    frobenius_norms(tensors)                            -> (T,) float32 norms

Each has a plain-torch ``*_ref`` beside it that states what it computes. Importing this package
does not import Triton: the names above load their module on first use, and ``available(device)``
says whether the kernels can run there (CUDA with Triton, or any device under
``TRITON_INTERPRET=1``). Triton reads ``TRITON_INTERPRET`` when it is first imported and when each
kernel is defined, so set it before anything imports Triton: importing torch._dynamo (which
``import fxlra`` does) imports Triton when it is installed.
"""
import functools
import importlib
import importlib.util
import os

import torch

_EXPORTS = {
    "target_and_error": "target_error", "target_and_error_ref": "target_error",
    "activation_of": "target_error", "ACTIVATIONS": "target_error", "ALIASES": "target_error",
    "pseudo_conv_forward": "pseudo_conv", "pseudo_conv_forward_ref": "pseudo_conv",
    "pseudo_conv_update": "pseudo_conv", "pseudo_conv_update_ref": "pseudo_conv",
    "pseudo_conv_inputs": "pseudo_conv", "perturbative_forward": "pseudo_conv",
    "perturbative_grads": "pseudo_conv",
    "reproject_": "reproject", "reproject_ref": "reproject",
    "frobenius_norms": "reproject", "frobenius_norms_ref": "reproject",
}


@functools.lru_cache(maxsize=None)
def _triton_installed():
    # found, not imported: Triton decides interpreter or compiler when it is first imported,
    # so asking must not import it
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):         # a broken or blocked install
        return False


def interpreting():
    """Whether Triton kernels built now run under its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def available(device=None):
    """Whether the Triton path can run on ``device`` (a torch.device, a string or a tensor; the
    current CUDA device when omitted): Triton is installed, and either ``TRITON_INTERPRET=1`` is
    set or the device is a CUDA device that torch can use. Triton is not imported here."""
    if isinstance(device, torch.Tensor):
        device = device.device
    device = torch.device(device if device is not None else "cuda")
    if interpreting():
        return _triton_installed()
    return device.type == "cuda" and torch.cuda.is_available() and _triton_installed()


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = ["available", "interpreting"] + list(_EXPORTS)
