"""Argument checks shared by the kernel launchers.

Every failure is a ``ValueError`` whose message reads
``"<launcher>: <argument> has <property> <seen>; expected <expected>"``, so that a caller sees
which argument was wrong, what it was and what the kernel needs. Nothing here imports Triton.
"""
import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _dtype_names(dtypes):
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def fail(where, arg, prop, seen, expected):
    raise ValueError(f"{where}: {arg} has {prop} {seen}; expected {expected}")


def tensor(where, arg, value):
    if not isinstance(value, torch.Tensor):
        fail(where, arg, "type", type(value).__name__, "a torch.Tensor")
    return value


def dtype(where, arg, t, allowed=FLOAT_DTYPES, like=None):
    """``t``'s dtype is one of ``allowed`` and, with ``like=(name, tensor)``, equals its dtype."""
    if t.dtype not in allowed:
        fail(where, arg, "dtype", str(t.dtype).replace("torch.", ""),
             f"one of {_dtype_names(allowed)}")
    if like is not None and t.dtype != like[1].dtype:
        fail(where, arg, "dtype", str(t.dtype).replace("torch.", ""),
             f"{str(like[1].dtype).replace('torch.', '')} (the dtype of {like[0]})")


def shape(where, arg, t, expected, what=None):
    """``t.shape == expected``; ``what`` says where the expected shape comes from."""
    if tuple(t.shape) != tuple(expected):
        note = f" ({what})" if what else ""
        fail(where, arg, "shape", tuple(t.shape), f"{tuple(expected)}{note}")


def ndim(where, arg, t, expected, layout):
    if t.dim() != expected:
        fail(where, arg, "shape", tuple(t.shape), f"{expected} dimensions {layout}")


def device(where, arg, t, like=None, interpreted=False):
    """``t`` lives where the kernel can run (CUDA, or the CPU under the Triton interpreter) and,
    with ``like=(name, tensor)``, on that tensor's device."""
    if like is not None and t.device != like[1].device:
        fail(where, arg, "device", t.device, f"{like[1].device} (the device of {like[0]})")
    if t.device.type != "cuda" and not interpreted:
        fail(where, arg, "device", t.device,
             "a CUDA device (CPU tensors run only under the Triton interpreter: set "
             "TRITON_INTERPRET=1 before fxlra.kernels is imported)")


def is_interpreted(kernel):
    """Whether a ``@triton.jit`` kernel was built under ``TRITON_INTERPRET=1``."""
    return type(kernel).__name__ == "InterpretedFunction"


def is_dense(t):
    """True when ``t``'s elements fill ``[data_ptr, data_ptr + numel)`` exactly once (contiguous
    in some order of its dims: row-major, channels_last, a transposed contiguous tensor, ...)."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True
