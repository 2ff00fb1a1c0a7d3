"""Shared fixtures: every test starts from torch.manual_seed(0), plus small model factories.

The factories return fresh float32 models in train mode. ``small_cnn`` has every op kind the
analysis must handle in a CNN: Conv2d -> BatchNorm2d -> ReLU, MaxPool2d, a residual block with a
1x1-conv downsample shortcut, AdaptiveAvgPool2d, Flatten and Linear; it accepts any spatial size.
"""
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
