"""Shared fixtures: every test starts from torch.manual_seed(0), plus small model factories and
the set-up of the Triton kernel tests (tests/test_kernels_*.py).

The factories return fresh float32 models in train mode. ``small_cnn`` has every op kind the
analysis must handle in a CNN: Conv2d -> BatchNorm2d -> ReLU, MaxPool2d, a residual block with a
1x1-conv downsample shortcut, AdaptiveAvgPool2d, Flatten and Linear; it accepts any spatial size.

Triton chooses interpreter or compiler from ``TRITON_INTERPRET`` twice: when ``triton`` is first
imported (its own library functions, ``tl.sum``...) and when each ``@triton.jit`` kernel is
defined; importing fxlra imports Triton (through torch._dynamo). So without CUDA this file, which
pytest imports before any test module, sets the variable while it imports Triton and the kernel
modules, then restores it (``fxlra.kernels.available`` reads it at each call, so the rest of the
suite sees the CPU as it is). If Triton was imported in the other mode before (a script that
imported fxlra first), the kernel tests cannot run in this process: they skip and
``test_kernels_in_a_fresh_process`` runs them in a new one. Without Triton they skip.
"""
import contextlib
import functools
import importlib
import os

import pytest
import torch
from torch import nn
from torch.nn import functional as F


def needs_cuda(test, when=None):
    """A test that needs a CUDA device: skipped without one (or when ``when`` says so), and
    selected on a GPU machine by ``pytest -m cuda``."""
    skip = not torch.cuda.is_available() if when is None else when
    return pytest.mark.cuda(pytest.mark.skipif(skip, reason="needs a CUDA device")(test))


CUDA_PARAM_MARKS = [pytest.mark.cuda,
                    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


# -- the Triton kernels, loaded in this suite's mode before fxlra ---------------------------------
CUDA = torch.cuda.is_available()
INTERPRET = not CUDA or os.environ.get("TRITON_INTERPRET") == "1"
KERNEL_DEVICE = "cpu" if INTERPRET else "cuda"
KERNEL_NAMES = ("target_error", "pseudo_conv", "reproject")
kernel_gpu = functools.partial(needs_cuda, when=INTERPRET)     # compiled kernels on a GPU
KERNEL_TEST_FILES = ("test_kernels_activations.py", "test_kernels_target_error.py",
                     "test_kernels_pseudo_conv.py", "test_kernels_reproject.py",
                     "test_kernels_package.py")


@contextlib.contextmanager
def env(name, value):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _interpreted(fn):
    return type(fn).__name__ == "InterpretedFunction"


def _kernel_of(module):
    return next(v for k, v in vars(module).items() if k.endswith("_kernel"))


def _warm_up(te, pc, rp):
    """One tiny launch of every kernel: Triton imports parts of itself at the first launch, and
    those read TRITON_INTERPRET too."""
    x = torch.ones(1, 1, 2, 2)
    te.target_and_error(x, x, x, "relu")
    pc.pseudo_conv_forward(x, torch.zeros(1, 2, 2), torch.ones(1, 1), 1)
    pc.pseudo_conv_update(x, torch.zeros(1, 2, 2), x, 1)
    rp.reproject_([x.clone()], 0.5)


def _load_kernels():
    """(whether Triton and the kernel modules run in this suite's mode, {name: module}); the
    modules are {} without Triton."""
    with env("TRITON_INTERPRET", "1") if INTERPRET else contextlib.nullcontext():
        try:
            language = importlib.import_module("triton.language")
        except ImportError:
            return False, {}
        modules = {n: importlib.import_module(f"fxlra.kernels.{n}") for n in KERNEL_NAMES}
        snippets = [modules["target_error"].ACTIVATIONS["relu"].snippet]
        fresh = all(_interpreted(f) == INTERPRET for f in
                    [language.sum] + snippets + [_kernel_of(m) for m in modules.values()])
        if fresh and INTERPRET:
            _warm_up(*(modules[n] for n in KERNEL_NAMES))
    return fresh, modules


KERNELS_FRESH, KERNEL_MODULES = _load_kernels()


def kernel_modules():
    """(target_error, pseudo_conv, reproject) for a kernel test module; skips it without
    Triton."""
    if not KERNEL_MODULES:
        pytest.skip("needs triton", allow_module_level=True)
    return tuple(KERNEL_MODULES[n] for n in KERNEL_NAMES)


@pytest.fixture
def kernel_setup(request):
    """Every kernel test: skipped when the kernels are not in this suite's mode (the fresh
    process runs them), single-threaded (tiny tensors; the interpreter is Python)."""
    if not KERNELS_FRESH and request.node.originalname != "test_kernels_in_a_fresh_process":
        pytest.skip("Triton was imported in the other TRITON_INTERPRET mode before the tests; "
                    "test_kernels_in_a_fresh_process runs them")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def kernel_site(shape, name, seed=0, dtype=torch.float32, device=KERNEL_DEVICE):
    """h, z = phi(h) and a displacement d for one site."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(shape, generator=g)
    d = torch.randn(shape, generator=g)
    z = KERNEL_MODULES["target_error"].ACTIVATIONS[name].torch_fn(h)
    return tuple(t.to(device=device, dtype=dtype) for t in (h, z, d))


def expect_error(message, fn, *args, **kwargs):
    """fn(*args, **kwargs) raises a ValueError whose text is ``message`` exactly."""
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    assert str(info.value) == message


@pytest.fixture(scope="module")
def one_thread():
    """For files of tiny models: intra-op threads only add overhead, and on a shared CPU they
    can slow each op by 10-100x, so such a file runs single-threaded (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def slow_enabled(request):
    """Skips a slow-tier test unless FXLRA_SLOW=1 is set or ``-m slow`` is given."""
    markexpr = request.config.getoption("markexpr", default="") or ""
    if os.environ.get("FXLRA_SLOW") != "1" and markexpr.strip() != "slow":
        pytest.skip(f"slow tier ({request.node.name}): set FXLRA_SLOW=1 (or run with -m slow)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def make_mlp(n_in=5, widths=(8, 7, 6), n_out=4, act=nn.Tanh):
    """Linear -> act -> ... -> Linear, as an nn.Sequential."""
    layers, prev = [], n_in
    for w in widths:
        layers += [nn.Linear(prev, w), act()]
        prev = w
    layers.append(nn.Linear(prev, n_out))
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """conv-bn-relu-conv-bn, plus the input (through a 1x1-conv + bn shortcut when the shape
    changes), then relu; torchvision's BasicBlock in miniature."""

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                            nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class SmallCNN(nn.Module):
    def __init__(self, c_in=3, width=4, n_classes=5):
        super().__init__()
        self.conv = nn.Conv2d(c_in, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.block1 = ResidualBlock(width, width)
        self.block2 = ResidualBlock(width, 2 * width, stride=2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(2 * width, n_classes)

    def forward(self, x):
        x = self.pool(self.relu(self.bn(self.conv(x))))
        x = self.block2(self.block1(x))
        return self.fc(self.flatten(self.gap(x)))


def make_cnn(**kw):
    return SmallCNN(**kw)


@pytest.fixture
def mlp():
    return make_mlp()


@pytest.fixture
def cnn():
    return make_cnn()
