"""``LocallyConnected2d``: a convolution whose kernels are not shared across positions (every
output position has its own ``out_channels x in_channels*k*k`` weight), as in the locally
connected networks of Bartunov et al. (2018) that the rec-LRA paper trains.

Shapes: input ``(B, in_channels, H, W)`` with ``(H, W) == input_size`` fixed at construction;
``weight`` ``(out_h * out_w, out_channels, in_channels * k_h * k_w)`` (position-major, columns in
``F.unfold``'s order); ``bias`` ``(out_channels, out_h, out_w)``. Forward: ``F.unfold`` + einsum.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair


class LocallyConnected2d(nn.Module):
    """A 2-d locally connected layer (unshared weights per output position)."""

    def __init__(self, in_channels, out_channels, kernel_size, input_size, stride=1, padding=0,
                 bias=True, device=None, dtype=None):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.input_size = _pair(padding), _pair(input_size)
        self.output_size = tuple(
            (n + 2 * p - k) // s + 1 for n, p, k, s in
            zip(self.input_size, self.padding, self.kernel_size, self.stride))
        if min(self.output_size) < 1:
            raise ValueError(f"LocallyConnected2d: kernel {self.kernel_size} does not fit the "
                             f"input {self.input_size} with padding {self.padding}")
        positions = self.output_size[0] * self.output_size[1]
        fan_in = in_channels * self.kernel_size[0] * self.kernel_size[1]
        like = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(positions, out_channels, fan_in, **like))
        self.bias = nn.Parameter(torch.empty(out_channels, *self.output_size, **like)) \
            if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        bound = 1 / math.sqrt(self.weight.shape[-1])      # nn.Conv2d's default bound
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def columns(self, x):
        """The unfolded input ``(B, in_channels*k*k, out_h*out_w)``; checks the input size."""
        if tuple(x.shape[-2:]) != self.input_size or x.shape[-3] != self.in_channels:
            raise ValueError(f"LocallyConnected2d expects inputs (B, {self.in_channels}, "
                             f"{self.input_size[0]}, {self.input_size[1]}), got "
                             f"{tuple(x.shape)}")
        return F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride)

    def forward(self, x):
        out = torch.einsum("bkl,lok->bol", self.columns(x), self.weight)
        out = out.reshape(x.shape[0], self.out_channels, *self.output_size)
        return out if self.bias is None else out + self.bias

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"input_size={self.input_size}, stride={self.stride}, padding={self.padding}, "
                f"bias={self.bias is not None}")
