"""The pseudo-convolution (a perturbative layer, Juefei-Xu et al., CVPR 2018; rec-LRA section 3.3)
and ``perturbative(model)``, which swaps a model's k x k convolutions for it.

``PerturbativeConv2d`` adds ``nmasks`` fixed Gaussian noise maps (std ``level``) to every input
channel, applies ReLU, and mixes the ``in_channels * nmasks`` perturbed maps with a learned 1x1
combination:  z_c = sum_{i,m} w[c, i*nmasks + m] * relu(x_i + n_{i,m})  (+ b_c).

Choices (documented here, tested in tests/test_nn.py):
- weight shape: ``(out_channels, in_channels * nmasks, 1, 1)`` (a 1x1 conv weight), channel
  ``i * nmasks + m`` is input channel ``i`` perturbed by mask ``m``.
- noise at any input size: the masks are the top-left ``H x W`` crop of one fixed, unbounded
  noise field. The field is made of ``TILE x TILE`` tiles; tile ``(r, c)`` is drawn from a CPU
  generator seeded by ``(seed, r, c)`` only, so a mask never depends on which sizes were seen
  before or in which order. The field is materialised (in whole tiles) up to the largest size
  seen so far in the buffer ``noise`` (in ``state_dict``, with the seed in ``noise_seed``);
  loading a state_dict resizes the buffer to the saved one.
- strides: the input is average-pooled by the stride first (kernel = stride, ``ceil_mode=True``,
  so the output size is ``ceil(H / stride)``, as for a 3x3 conv with padding 1), then perturbed.
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

TILE = 8
_MASK = (1 << 63) - 1


def _tile_seed(seed, row, col):
    return (seed * 6364136223846793005 + row * 1442695040888963407
            + col * 2862933555777941757 + 1013904223) & _MASK


def noise_field(seed, channels, height, width, level):
    """The fixed noise field's top-left ``height x width`` crop, float64 on the CPU."""
    rows, cols = -(-height // TILE), -(-width // TILE)
    field = torch.empty(channels, rows * TILE, cols * TILE, dtype=torch.float64)
    gen = torch.Generator()
    for r in range(rows):
        for c in range(cols):
            gen.manual_seed(_tile_seed(seed, r, c))
            field[:, r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE] = torch.randn(
                channels, TILE, TILE, generator=gen, dtype=torch.float64)
    return field[:, :height, :width] * level


def _is_fake(x):
    from torch._subclasses.fake_tensor import is_fake
    return is_fake(x)


class PerturbativeConv2d(nn.Module):
    """A pseudo-convolution: fixed noise masks, ReLU, and a learned 1x1 combination."""

    def __init__(self, in_channels, out_channels, nmasks=64, level=0.1, stride=1, seed=None,
                 bias=False, device=None, dtype=None):
        super().__init__()
        if nmasks < 1 or level < 0:
            raise ValueError(f"PerturbativeConv2d needs nmasks >= 1 and level >= 0, got "
                             f"nmasks={nmasks}, level={level}")
        self.in_channels, self.out_channels, self.nmasks = in_channels, out_channels, nmasks
        self.level, self.stride = float(level), _pair(stride)
        if seed is None:
            seed = int(torch.randint(0, 2 ** 62, ()).item())
        like = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels * nmasks, 1, 1, **like))
        self.bias = nn.Parameter(torch.empty(out_channels, **like)) if bias else None
        self.register_buffer("noise", torch.empty(in_channels * nmasks, 0, 0, **like))
        self.register_buffer("noise_seed", torch.tensor(seed, dtype=torch.int64, device=device))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)      # nn.Conv2d's initialisation
        if self.bias is not None:
            bound = 1 / (self.weight.shape[1] ** 0.5)
            nn.init.uniform_(self.bias, -bound, bound)

    def masks(self, height, width, like=None):
        """The ``(in_channels * nmasks, height, width)`` masks, growing the stored field if
        needed (never under fake tensors, which only need the shape)."""
        like = self.noise if like is None else like
        have_h, have_w = self.noise.shape[1:]
        if height > have_h or width > have_w:
            if _is_fake(like) or _is_fake(self.noise):
                return like.new_zeros(self.noise.shape[0], height, width)
            grow_h = -(-max(height, have_h) // TILE) * TILE
            grow_w = -(-max(width, have_w) // TILE) * TILE
            field = noise_field(int(self.noise_seed), self.noise.shape[0], grow_h, grow_w,
                                self.level)
            self.noise = field.to(device=self.noise.device, dtype=self.noise.dtype)
        return self.noise[:, :height, :width]

    def perturbed(self, x):
        """relu(pool(x)_i + n_{i,m}) for every channel and mask: ``(B, in*nmasks, H', W')``."""
        if self.stride != (1, 1):
            x = F.avg_pool2d(x, self.stride, self.stride, ceil_mode=True)
        n = self.masks(x.shape[-2], x.shape[-1], x)
        x = x.repeat_interleave(self.nmasks, dim=1)
        return torch.relu(x + n.to(x.dtype))

    def forward(self, x):
        return F.conv2d(self.perturbed(x), self.weight, self.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "noise")
        if saved is not None and saved.shape != self.noise.shape:
            self.noise = torch.empty(saved.shape, device=self.noise.device,
                                     dtype=self.noise.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, nmasks={self.nmasks}, "
                f"level={self.level}, stride={self.stride}, bias={self.bias is not None}")


class Replacements(list):
    """What ``perturbative`` did: a list of ``(qualified name, old module, new module)``, plus
    ``kept`` (k x k convs left alone, with the reason); printable."""

    def __init__(self, rows=(), kept=()):
        super().__init__(rows)
        self.kept = list(kept)

    def __str__(self):
        lines = [f"replaced {len(self)} convolution(s) by pseudo-convolutions:"]
        lines += [f"  {name}: {old} -> {new}" for name, old, new in self]
        lines += [f"  kept {name}: {why}" for name, why in self.kept]
        return "\n".join(lines)


def _why_not(conv):
    """Why a k x k conv cannot become a pseudo-convolution of the same output size, or None."""
    k, pad, dil = _pair(conv.kernel_size), conv.padding, _pair(conv.dilation)
    if conv.groups != 1:
        return f"groups={conv.groups}"
    if isinstance(pad, str):
        return None if pad == "same" else f"padding={pad!r} changes the size"
    if any(p != (kk - 1) // 2 * d for p, kk, d in zip(_pair(pad), k, dil)):
        return f"padding={pad} with kernel {k} changes the size"
    return None


def perturbative(model, nmasks=64, level=0.1, keep_stem=True, seed=0):
    """A deep copy of ``model`` whose k x k (k > 1) ``nn.Conv2d`` layers are pseudo-convolutions
    (same channels, stride and bias; layer j gets noise seed ``seed + j``), and the report.

    ``keep_stem`` keeps the first such conv (in module order) a convolution.
    Returns ``(new_model, Replacements)``.
    """
    model = copy.deepcopy(model)
    convs = [(n, m) for n, m in model.named_modules()
             if type(m) is nn.Conv2d and max(_pair(m.kernel_size)) > 1]
    rows, kept = [], []
    for j, (name, conv) in enumerate(convs):
        why = "the stem (keep_stem=True)" if keep_stem and j == 0 else _why_not(conv)
        if why is not None:
            kept.append((name, why))
            continue
        new = PerturbativeConv2d(conv.in_channels, conv.out_channels, nmasks, level,
                                 conv.stride, seed=seed + j, bias=conv.bias is not None,
                                 device=conv.weight.device, dtype=conv.weight.dtype)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
        rows.append((name, conv, new))
    return model, Replacements(rows, kept)
