"""How a site's error is carried back through the ops of its region that have no parameter
rule of their own: the reshapes, pooling, means and transpositions, the normalisation layers'
input-VJPs (norm_error="vjp"), the pseudo-convolution's and the locally connected layer's
(error_rule="bootstrap" carries errors into the layers that read a site). Each is a function
``carry(call, x, c) -> c_x``, named by its op kind's row in ``fxlra.ops.registry``; an op kind
without one falls back to torch.func on that one op (``fxlra.ops.local.local_vjp``).
"""
import torch
import torch.nn.functional as F
from torch import nn

from .local import batchnorm_grads

aten = torch.ops.aten


def reshape_back(call, x, c):
    return c.reshape(x.shape)


def max_pool2d(call, x, c):
    m = call.module
    _, idx = F.max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, True)
    pair = nn.modules.utils._pair
    return aten.max_pool2d_with_indices_backward(c.to(x.dtype), x, pair(m.kernel_size),
                                                 pair(m.stride), pair(m.padding),
                                                 pair(m.dilation), m.ceil_mode, idx)


def avg_pool2d(call, x, c):
    m, pair = call.module, nn.modules.utils._pair
    return aten.avg_pool2d_backward(c.to(x.dtype), x, pair(m.kernel_size),
                                    pair(m.stride or m.kernel_size), pair(m.padding),
                                    m.ceil_mode, m.count_include_pad, m.divisor_override)


def adaptive_avg_pool2d(call, x, c):
    return aten._adaptive_avg_pool2d_backward(c.to(x.dtype), x)


def mean(call, x, c):
    dims = call.arg("dim", 1, None)
    keep = call.arg("keepdim", 2, False)
    if dims is None:
        return c.expand(x.shape) / x.numel()
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = sorted(d % x.dim() for d in dims)
    if not keep:
        for d in dims:
            c = c.unsqueeze(d)
    count = 1
    for d in dims:
        count *= x.shape[d]
    return c.expand(x.shape) / count


def permute(call, x, c):
    dims = call.args[1:] if len(call.args) > 2 or isinstance(call.args[1], int) else call.args[1]
    inverse = [0] * len(dims)
    for k, d in enumerate(dims):
        inverse[d % len(dims)] = k
    return c.permute(inverse)


def transpose(call, x, c):
    return c.transpose(call.args[1], call.args[2])


def perturbative_input(call, x, c):
    """fxlra.nn.PerturbativeConv2d's input-VJP: the 1x1 combination transposed, ReLU's mask
    at x + n, summed over the masks of each input channel, then the stride's average pool
    transposed."""
    m = call.module
    pooled = x if m.stride == (1, 1) else F.avg_pool2d(x, m.stride, m.stride, ceil_mode=True)
    noise = m.masks(pooled.shape[-2], pooled.shape[-1], pooled).to(pooled.dtype)
    g = torch.einsum("bohw,ok->bkhw", c.to(m.weight.dtype), m.weight[:, :, 0, 0]).to(x.dtype)
    g = g * (pooled.repeat_interleave(m.nmasks, dim=1) + noise > 0)
    g = g.reshape(g.shape[0], m.in_channels, m.nmasks, *g.shape[2:]).sum(2)
    if m.stride == (1, 1):
        return g
    return aten.avg_pool2d_backward(g, x, list(m.stride), list(m.stride), [0, 0], True, True,
                                    None)


def locally_connected_input(call, x, c):
    """fxlra.nn.LocallyConnected2d's input-VJP: each position's weights transposed, then the
    unfold folded back."""
    m = call.module
    c = c.reshape(c.shape[0], m.out_channels, -1).to(m.weight.dtype)
    cols = torch.einsum("bol,lok->bkl", c, m.weight)
    return F.fold(cols.to(x.dtype), x.shape[-2:], m.kernel_size, padding=m.padding,
                  stride=m.stride)


# -- normalisation layers' input-VJPs (norm_error="vjp"), with the statistics the forward used -----
def batchnorm_input(call, x, c):
    return batchnorm_grads(call.module, x, c, with_input=True)["input"]


def layernorm_input(call, x, c):
    m = call.module
    shape = list(m.normalized_shape)
    _, mean, rstd = aten.native_layer_norm(x, shape, m.weight, m.bias, m.eps)
    return aten.native_layer_norm_backward(c.to(x.dtype), x, shape, mean, rstd, m.weight,
                                           m.bias, [True, False, False])[0]


def groupnorm_input(call, x, c):
    m = call.module
    n, channels = x.shape[0], x.shape[1]
    spatial = x[0, 0].numel()
    _, mean, rstd = aten.native_group_norm(x, m.weight, m.bias, n, channels, spatial,
                                           m.num_groups, m.eps)
    return aten.native_group_norm_backward(c.to(x.dtype), x, mean, rstd, m.weight, n, channels,
                                           spatial, m.num_groups, [True, False, False])[0]


def module_input_vjp(call, x, c):
    """The input-VJP of a norm module without an ATen rule here (InstanceNorm, RMSNorm, LRN):
    torch.func on the module alone, its buffers copied so running statistics do not move."""
    m = call.module
    state = {**{n: p.detach() for n, p in m.named_parameters()},
             **{n: b.clone() for n, b in m.named_buffers()}}
    _, pullback = torch.func.vjp(lambda v: torch.func.functional_call(m, state, (v,)), x)
    return pullback(c.to(x.dtype))[0]
