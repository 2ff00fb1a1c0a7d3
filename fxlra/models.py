"""The paper's models, ready for ``fxlra.compile``: its MLPs (optionally residual with gap g),
ResNet-18 for 32x32 (CIFAR stem) and 224x224 inputs, pResNet-18 (pseudo-convolutions), and a
CNN of locally connected layers.

Models holding ``fxlra.nn`` layers (``presnet18``, ``lcnet``) compile with
``leaf_modules=fxlra.nn.LEAF_MODULES``; ``lcnet`` also needs ``example_inputs=`` (its first
layer does not tell fxlra the input size). ``width`` and ``channels`` arguments exist so that
tests can build small versions; the defaults are the paper's sizes.
"""
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from .nn import LocallyConnected2d, perturbative


class Sign(nn.Module):
    """The signum activation of the paper's MNIST runs (traced as ``torch.sign``)."""

    def forward(self, x):
        return torch.sign(x)


ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU, "sigmoid": nn.Sigmoid,
               "sign": Sign, "gelu": nn.GELU, "silu": nn.SiLU, "leaky_relu": nn.LeakyReLU}


class MLP(nn.Module):
    """``depth`` hidden layers of ``width`` units and a linear output layer.

    With ``residual_gap=g`` it follows the paper's Algorithm 1: hidden layer ``l`` (1-based)
    computes ``z_l = phi(W_l z_{l-1} + z_{l-g})`` when ``l % g == 0`` and ``l > g``, else
    ``z_l = phi(W_l z_{l-1})``. The input is flattened first (MNIST images work as they are).
    """

    def __init__(self, depth=5, width=256, activation="tanh", in_features=784, classes=10,
                 residual_gap=None):
        super().__init__()
        if isinstance(activation, str):
            if activation not in ACTIVATIONS:
                raise ValueError(f"unknown activation {activation!r}; choose one of "
                                 f"{sorted(ACTIVATIONS)} or pass an nn.Module class")
            activation = ACTIVATIONS[activation]
        if residual_gap is not None and residual_gap < 1:
            raise ValueError(f"residual_gap must be >= 1, got {residual_gap}")
        self.gap = residual_gap
        sizes = [in_features] + [width] * depth
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.acts = nn.ModuleList(activation() for _ in range(depth))
        self.out = nn.Linear(sizes[-1], classes)

    def forward(self, x):
        zs = [x.flatten(1)]
        for l, (linear, act) in enumerate(zip(self.hidden, self.acts), start=1):
            h = linear(zs[-1])
            if self.gap is not None and l % self.gap == 0 and l > self.gap:
                h = h + zs[l - self.gap]
            zs.append(act(h))
        return self.out(zs[-1])


def mlp(depth=5, width=256, activation="tanh", in_features=784, classes=10, residual_gap=None):
    """The paper's MLPs: ``mlp()`` is 5x256 tanh, ``mlp(8, activation="sigmoid")`` 8x256."""
    return MLP(depth, width, activation, in_features, classes, residual_gap)


class ResNet18(nn.Module):
    """ResNet-18 (torchvision's BasicBlock and module names) with base width ``width``.
    ``cifar=True``: a 3x3 stride-1 stem and no max-pool, for 32x32 inputs."""

    def __init__(self, classes=10, width=64, cifar=True, in_channels=3):
        super().__init__()
        if cifar:
            self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        c = width
        for k, mult in enumerate((1, 2, 4, 8), start=1):
            stride = 1 if k == 1 else 2
            down = None
            if stride != 1 or c != width * mult:
                down = nn.Sequential(nn.Conv2d(c, width * mult, 1, stride, bias=False),
                                     nn.BatchNorm2d(width * mult))
            blocks = [BasicBlock(c, width * mult, stride, down), BasicBlock(width * mult,
                                                                            width * mult)]
            setattr(self, f"layer{k}", nn.Sequential(*blocks))
            c = width * mult
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18_cifar(classes=10, width=64):
    """ResNet-18 for 32x32 inputs (CIFAR stem: 3x3 conv, stride 1, no max-pool)."""
    return ResNet18(classes, width, cifar=True)


def resnet18(classes=1000):
    """torchvision's ResNet-18 (224x224 inputs)."""
    return torchvision.models.resnet18(num_classes=classes)


def presnet18(classes=10, nmasks=1, cifar=True, level=0.1, width=64, seed=0):
    """pResNet-18 (the paper's Table 3): ResNet-18 whose 3x3 convs, all but the stem, are
    pseudo-convolutions with ``nmasks`` fixed noise masks per input channel.

    The paper's "64 perturbation masks" (against "64 filters" for the convolutional ResNet) is
    read as the first stage's 64 channels with one mask per input channel, the reading under
    which pResNet-18 has 1.9M parameters against ResNet-18's 11.7M; ``nmasks=64`` gives 64
    masks per input channel (78.8M parameters)."""
    base = ResNet18(classes, width, cifar=True) if cifar else (
        resnet18(classes) if width == 64 else ResNet18(classes, width, cifar=False))
    model, _ = perturbative(base, nmasks=nmasks, level=level, keep_stem=True, seed=seed)
    return model


class LCNet(nn.Module):
    """A CNN of locally connected layers, after Bartunov et al. (2018)'s locally connected
    CIFAR-10 networks (stacks of unshared-weight layers with ReLU, then a linear read-out),
    scaled to train on a CPU:

        LC 5x5, stride 2, pad 2 -> ReLU  (channels[0], 32x32 -> 16x16)
        LC 5x5, stride 2, pad 2 -> ReLU  (channels[1], 16x16 -> 8x8)
        LC 3x3, stride 1, pad 1 -> ReLU  (channels[2], 8x8 -> 8x8)
        flatten -> Linear -> classes

    With the defaults (16, 32, 32) channels it has about 1.7M parameters.
    """

    def __init__(self, classes=10, in_channels=3, input_size=32, channels=(16, 32, 32)):
        super().__init__()
        specs = [(5, 2, 2), (5, 2, 2), (3, 1, 1)]
        layers, c, size = [], in_channels, (input_size, input_size)
        for out, (k, s, p) in zip(channels, specs):
            lc = LocallyConnected2d(c, out, k, size, s, p)
            layers += [lc, nn.ReLU()]
            c, size = out, lc.output_size
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c * size[0] * size[1], classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


def lcnet(classes=10, in_channels=3, input_size=32, channels=(16, 32, 32)):
    """The locally connected CNN (see LCNet)."""
    return LCNet(classes, in_channels, input_size, channels)


MODELS = {"mlp": mlp, "resnet18_cifar": resnet18_cifar, "resnet18": resnet18,
          "presnet18": presnet18, "lcnet": lcnet}
