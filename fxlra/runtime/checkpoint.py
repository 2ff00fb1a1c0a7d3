"""Checkpoints: ``fxlra.save`` and ``fxlra.load``, and ``fxlra.seed_everything``.

A checkpoint holds everything the next step reads: the model or program state (weights, error
synapses, noise maps, step counters), the optimizer and scheduler, every random number
generator, a fingerprint of the program's graph, wiring and options, and whatever else the caller
passes (epoch, data position, config, metrics). It is written atomically: a temporary file in the
same folder, flushed and fsynced, then ``os.replace``; a crash while saving leaves the previous
checkpoint in place, and the leftover temporary file (``.<name>.tmp-*``) is never read.

Loading uses ``torch.load(weights_only=True)`` only: a file whose pickle would run code is
refused. Everything saved must therefore be tensors, numbers, strings, None, and lists, tuples
and dicts of them; ``save`` checks that before it writes.
"""
import os
import random
import tempfile
from pathlib import Path

import torch

from ..errors import CheckpointError

FORMAT = "fxlra-checkpoint-1"
# options that change how a run reacts, not what it computes: a run may resume with others
RUNTIME_OPTIONS = ("nonfinite", "max_skips", "kernels", "devices", "placement", "streams",
                   "cuda_graph")
SAFE_TYPES = (torch.Tensor, str, int, float, bool, type(None), torch.dtype, torch.device,
              torch.Size)


# -- fingerprints ------------------------------------------------------------------------------------
def fingerprint(model):
    """What must match for a checkpoint to fit: the parameter and buffer names and shapes, and
    for a Program its sites, error synapses, wiring and options."""
    tensors = {k: list(v.shape) for k, v in model.state_dict().items() if torch.is_tensor(v)}
    found = {"type": type(getattr(model, "model", model)).__name__, "tensors": tensors}
    plan = getattr(model, "plan", None)
    if plan is not None:
        found.update(sites=list(plan.site_names), wiring=plan.wiring,
                     edges=[f"{e.parent} -> {e.child} ({e.synapse})" for e in plan.edges],
                     options={k: _plain(v) for k, v in sorted(model.options.items())
                              if k not in RUNTIME_OPTIONS})
    return found


def _plain(value):
    return {str(k): v for k, v in value.items()} if isinstance(value, dict) else value


def _differences(saved, current):
    """Human-readable differences between two fingerprints, the most telling first."""
    out = []
    for key in ("type", "wiring", "options"):
        if saved.get(key) != current.get(key):
            out.append(f"{key}: checkpoint {saved.get(key)!r}, this program {current.get(key)!r}")
    for key in ("sites", "edges", "tensors"):
        a, b = saved.get(key) or [], current.get(key) or []
        if a == b:
            continue
        only_saved = [k for k in a if k not in b]
        only_here = [k for k in b if k not in a]
        if only_saved or only_here:
            out.append(f"{key} only in the checkpoint: {only_saved[:5]}; only in this program: "
                       f"{only_here[:5]}")
        if isinstance(a, dict):
            shapes = [f"{k} {a[k]} vs {b[k]}" for k in a if k in b and a[k] != b[k]]
            if shapes:
                out.append(f"shapes differ: {shapes[:5]}")
    return out


# -- random number generators --------------------------------------------------------------------------
def rng_state():
    state = {"torch": torch.get_rng_state(), "python": _python_state(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss]
    except ImportError:
        pass
    return state


def _python_state(state):
    version, internal, gauss = state
    return [version, torch.tensor(internal, dtype=torch.int64), gauss]


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


def seed_everything(seed, deterministic=False):
    """Seed Python, NumPy and torch (every device). ``deterministic=True`` also makes torch use
    deterministic algorithms only (and sets what cuBLAS needs for that), so that two runs with the
    same seed give identical parameters on the same machine and software."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2**32)
    except ImportError:
        pass
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


# -- save and load --------------------------------------------------------------------------------------
def _check_safe(value, where):
    """Raise CheckpointError naming the first value torch.load(weights_only=True) would refuse."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise CheckpointError(f"{where} has a key of type {type(k).__name__}; use str keys")
            _check_safe(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for k, v in enumerate(value):
            _check_safe(v, f"{where}[{k}]")
    elif not isinstance(value, SAFE_TYPES):
        raise CheckpointError(
            f"{where} is a {type(value).__name__}, which a checkpoint cannot hold (it is loaded "
            "with weights_only=True); store tensors, numbers, strings and containers of them, "
            "e.g. vars(args) instead of an argparse.Namespace")


def save(path, model, optimizer=None, scheduler=None, **state):
    """Write a checkpoint of ``model`` (a Program or any nn.Module), the optimizer, the scheduler,
    every RNG state and ``state`` (epoch, data position, config, ...) atomically to ``path``."""
    path = Path(path)
    if not path.parent.is_dir():
        raise CheckpointError(f"cannot save to {path}: the folder {path.parent} does not exist")
    payload = {"format": FORMAT, "fingerprint": fingerprint(model), "model": model.state_dict(),
               "optimizer": None if optimizer is None else optimizer.state_dict(),
               "scheduler": None if scheduler is None else scheduler.state_dict(),
               "rng": rng_state(), "state": state}
    _check_safe(payload, "the checkpoint")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_folder(path.parent)
    return path


def _fsync_folder(folder):
    """Make the rename itself durable (where the OS allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read(path):
    """The checkpoint's contents, loaded safely (weights_only=True); nothing is restored."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(
            f"refused to load {path}: it is not a checkpoint that loads safely with "
            f"weights_only=True (it may hold code or be truncated): {first}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an fxlra checkpoint (format {FORMAT!r})")
    return payload


def load(path, model, optimizer=None, scheduler=None, restore_rng=True):
    """Restore a checkpoint written by ``save`` into ``model`` (and the optimizer, scheduler
    and RNGs); return the extra ``state`` it was saved with. A checkpoint of another model,
    wiring or option set is refused, naming the differences, before anything is changed."""
    payload = read(path)
    differences = _differences(payload["fingerprint"], fingerprint(model))
    if differences:
        raise CheckpointError(f"{path} was saved from another program: " + "; ".join(differences))
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler)):
        if obj is not None and payload[name] is None:
            raise CheckpointError(f"{path} holds no {name} state; it was saved without one")
    model.load_state_dict(payload["model"])
    if optimizer is not None:
        optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(payload["scheduler"])
    if restore_rng:
        set_rng_state(payload["rng"])
    return payload["state"]
