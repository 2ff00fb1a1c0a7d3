"""Explicit local rules for the generated program, without autograd: the weight-gradient of
every parametrised op kind (at its recorded input, for the cotangent at its output), the helpers
the generated code calls to carry an error (broadcast sums, concatenation, functional norms;
the per-op carry rules are in ``fxlra.ops.carry``) and the derivatives of activations. Which op
kind takes which function is ``fxlra.ops.registry``'s rows; an op without one falls back to
``torch.func`` on that single op (``fxlra.ops.fallback``).
"""
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import UnsupportedError
# the generated code calls the torch.func fallback as local.local_vjp, local.module_param_vjp
from .fallback import add_cotangents, local_vjp, module_param_vjp  # noqa: F401

aten = torch.ops.aten


def compute_dtype(x, c):
    """The dtype a weight-gradient op computes in: its inputs', or under autocast (where the
    recorded input and the error may differ) the autocast dtype, as autograd's backward would."""
    if x.dtype == c.dtype:
        return x.dtype
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return torch.promote_types(x.dtype, c.dtype)


# -- weight-gradients: rule(module, x, c) -> {local parameter name: summed gradient} -------------
def linear_grads(m, x, c, with_input=False):
    """weight: c^T x, bias: sum(c); ``with_input``: also the input-VJP c W (key "input"),
    which carries the error on through the op inside a block (scope="block")."""
    c2, x2 = c.reshape(-1, c.shape[-1]), x.reshape(-1, x.shape[-1])
    grads = {"weight": c2.t() @ x2}
    if m.bias is not None:
        grads["bias"] = c2.sum(0)
    if with_input:
        grads["input"] = (c2 @ m.weight.to(c2.dtype)).reshape(x.shape)
    return grads


def fuses_input_vjp(m):
    """Whether ``conv_grads`` can return the input-VJP too (zero padding given as numbers; other
    padding modes pad the input first, and their input-VJP comes from torch.func)."""
    return not isinstance(m, nn.modules.conv._ConvNd) or (
        m.padding_mode == "zeros" and not isinstance(m.padding, str))


def conv_grads(m, x, c, with_input=False):
    """weight and bias by ATen's convolution backward; ``with_input``: also the input-VJP from
    the same call (key "input"; only where ``fuses_input_vjp(m)``)."""
    dtype = compute_dtype(x, c)
    x, c = x.to(dtype), c.to(dtype)
    padding = m.padding
    if m.padding_mode != "zeros" or isinstance(padding, str):
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * (x.dim() - 2)
    bias = [m.out_channels] if m.bias is not None else None
    dx, dw, db = aten.convolution_backward(c, x, m.weight.to(dtype), bias, m.stride, padding,
                                           m.dilation, False, [0] * (x.dim() - 2), m.groups,
                                           [with_input, True, m.bias is not None])
    grads = {"weight": dw}
    if m.bias is not None:
        grads["bias"] = db
    if with_input:
        grads["input"] = dx
    return grads


def _affine_grads(m, xhat, c, dims):
    grads = {}
    if getattr(m, "weight", None) is not None:
        grads["weight"] = (c * xhat).sum(dims)
    if getattr(m, "bias", None) is not None:
        grads["bias"] = c.sum(dims)
    return grads


# BatchNorm classes whose forward ``batchnorm_forward`` performs (a subclass may change it)
BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def batchnorm_forward(m, x):
    """``m(x)`` for a torch.nn BatchNorm (the same steps and ATen call as its forward), and the
    batch statistics ``(mean, invstd)`` it normalised with, or None when it used the running
    ones: ``batchnorm_grads`` takes them instead of reading ``x`` again to recompute them."""
    m._check_input_dim(x)
    factor = 0.0 if m.momentum is None else m.momentum
    if m.training and m.track_running_stats and m.num_batches_tracked is not None:
        m.num_batches_tracked.add_(1)
        if m.momentum is None:                        # cumulative moving average
            factor = 1.0 / float(m.num_batches_tracked)
    train = m.training or (m.running_mean is None and m.running_var is None)
    tracked = not m.training or m.track_running_stats
    if train:
        F._verify_batch_size(x.size())
    out, mean, invstd, _, _ = torch._batch_norm_impl_index(
        x, m.weight, m.bias, m.running_mean if tracked else None,
        m.running_var if tracked else None, train, factor, m.eps, torch.backends.cudnn.enabled)
    return out, ((mean, invstd) if train else None)


def batchnorm_grads(m, x, c, stats=None, with_input=False):
    """gamma: sum(c * xhat), beta: sum(c), over batch and space, by ATen's batch-norm backward
    with the batch statistics in training (``stats`` from ``batchnorm_forward``, else recomputed
    from ``x``), the running ones in eval. ``with_input``: also the input-VJP (key "input"),
    from the same backward call, which carries the site's error through the norm."""
    if m.weight is None and m.bias is None and not with_input:
        return {}
    train = m.training or m.running_mean is None
    save_mean = save_invstd = None
    weight = m.weight if m.weight is not None else torch.ones(
        x.shape[1], dtype=x.dtype if m.running_mean is None else m.running_mean.dtype,
        device=x.device)
    if train and stats is not None:
        save_mean, save_invstd = stats
    elif train:    # statistics in the parameters' dtype (mixed precision under autocast)
        dims = [0] + list(range(2, x.dim()))
        var, save_mean = torch.var_mean(x.to(weight.dtype), dims, correction=0)
        save_invstd = torch.rsqrt(var + m.eps)
    dx, dw, db = aten.native_batch_norm_backward(
        c.to(x.dtype), x, weight, m.running_mean, m.running_var, save_mean, save_invstd, train,
        m.eps, [with_input, m.weight is not None, m.bias is not None])
    grads = {}
    if m.weight is not None:
        grads["weight"] = dw
    if m.bias is not None:
        grads["bias"] = db
    if with_input:
        grads["input"] = dx
    return grads


def layernorm_grads(m, x, c):
    norm_dims = list(range(x.dim() - len(m.normalized_shape), x.dim()))
    mean = x.mean(norm_dims, keepdim=True)
    var = x.var(norm_dims, unbiased=False, keepdim=True)
    return _affine_grads(m, (x - mean) * torch.rsqrt(var + m.eps), c,
                         list(range(x.dim() - len(m.normalized_shape))))


def groupnorm_grads(m, x, c):
    xhat = F.group_norm(x, m.num_groups, None, None, m.eps)
    return _affine_grads(m, xhat, c, [0] + list(range(2, x.dim())))


def embedding_grads(m, idx, c):
    flat = c.reshape(-1, c.shape[-1])
    grad = torch.zeros_like(m.weight).index_add_(0, idx.reshape(-1), flat)
    if m.padding_idx is not None:
        grad[m.padding_idx] = 0
    return {"weight": grad}


# -- weight-gradients of function ops (torch.export's ATen ops, F.linear on parameters):
# rule(args, c) -> {position of a parameter among the positional arguments: summed gradient};
# each reads its arguments as the module rule above reads its module's attributes
def linear_arg_grads(args, c):
    """``linear(x, weight, bias=None)``."""
    bias = args[2] if len(args) > 2 else None
    grads = linear_grads(SimpleNamespace(weight=args[1], bias=bias), args[0], c)
    return {1: grads["weight"], 2: grads.get("bias")}


def addmm_arg_grads(args, c):
    """``addmm(bias, x, weight)``, ``bias + x @ weight`` with weight (in, out) (GPT-2's Conv1D)."""
    bias, x = args[0], args[1]
    return {0: reduce_to(c, bias.shape), 2: x.t() @ c}


def batchnorm_arg_grads(args, c):
    """``batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps, ...)``:
    the module rule, with the batch statistics in training and the running ones in eval."""
    x, weight, bias, mean, var, training, _, eps = args[:8]
    grads = batchnorm_grads(SimpleNamespace(weight=weight, bias=bias, running_mean=mean,
                                            running_var=var, training=training, eps=eps), x, c)
    return {1: grads.get("weight"), 2: grads.get("bias")}


def conv_arg_grads(args, c):
    """``conv{1,2,3}d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1)``, padding
    as numbers or "valid" / "same" (ATen's conv2d.padding), by the module rule."""
    weight, n = args[1], args[1].dim() - 2
    arg = [None, None, None, 1, 0, 1, 1]
    arg[:len(args)] = args

    def each(v):
        v = tuple(v) if isinstance(v, (list, tuple)) else (v,)
        return v * n if len(v) == 1 else v
    m = SimpleNamespace(weight=weight, bias=arg[2], stride=each(arg[3]), dilation=each(arg[5]),
                        groups=arg[6], padding_mode="zeros", out_channels=weight.shape[0],
                        padding=arg[4] if isinstance(arg[4], str) else each(arg[4]))
    if isinstance(m.padding, str):            # nn.Conv's split of "same": the odd one after
        totals = [0] * n if m.padding == "valid" else [
            d * (k - 1) for d, k in zip(m.dilation, weight.shape[2:])]
        m._reversed_padding_repeated_twice = [p for t in reversed(totals)
                                              for p in (t // 2, t - t // 2)]
    grads = conv_grads(m, args[0], c)
    return {1: grads["weight"], 2: grads.get("bias")}


def linear_arg_carry(args, c, k):
    """``linear(x, weight, bias=None)``'s error at x: c W."""
    return c @ args[1].to(c.dtype)


def addmm_arg_carry(args, c, k):
    """``addmm(bias, x, weight)``'s error at x: c W^T."""
    return c @ args[2].to(c.dtype).t()


def matmul_arg_carry(args, c, k):
    """``x @ w``'s error at x: c w^T (over w's last two axes; c w^T's outer product for a
    vector w), summed over what broadcast."""
    w = args[1].to(c.dtype)
    carried = c.unsqueeze(-1) * w if w.dim() == 1 else c @ w.transpose(-1, -2)
    return reduce_to(carried, args[0].shape)


def pow_arg_carry(args, c, k):
    """``x ** e``'s error at x: c e x^(e - 1)."""
    x, e = args[0], args[1]
    return reduce_to(c * e * x.to(c.dtype) ** (e - 1), x.shape)


def slice_arg_carry(args, c, k):
    """``aten.slice(x, dim=0, start=None, end=None, step=1)``'s error at x: c in its slice,
    zero elsewhere."""
    x, dim, start, end, step = list(args) + [0, None, None, 1][len(args) - 1:]
    end = x.shape[dim] if end is None else end
    return aten.slice_backward(c, list(x.shape), dim, start or 0, end, step)


def split_arg_carry(args, c, k):
    """``split(x, size or sizes, dim=0)``'s error at x, for the errors of its parts ({part:
    error}): the parts' errors side by side, zero for a part that has none."""
    x, dim = args[0], args[2] if len(args) > 2 else 0
    dtype = next(iter(c.values())).dtype
    parts = torch.split(x, args[1], dim)
    return torch.cat([c[i] if i in c else torch.zeros_like(p, dtype=dtype)
                      for i, p in enumerate(parts)], dim)


def embedding_arg_grads(args, c):
    """``aten.embedding(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse)``; a
    dense gradient also where ``sparse`` asks autograd for a sparse one."""
    weight, idx = args[0], args[1]
    padding = args[2] if len(args) > 2 else -1
    grad = embedding_grads(SimpleNamespace(weight=weight.to(c.dtype), padding_idx=None
                                           if padding < 0 else padding), idx, c)["weight"]
    if len(args) > 3 and args[3]:           # each row over how often its index is in the batch
        counts = torch.bincount(idx.reshape(-1), minlength=weight.shape[0]).clamp_(min=1)
        grad = grad / counts.unsqueeze(1).to(grad.dtype)
    return {0: grad}


def layernorm_arg_grads(args, c):
    """``layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5)``."""
    x, shape = args[0], tuple(args[1])
    weight = args[2] if len(args) > 2 else None
    bias = args[3] if len(args) > 3 else None
    eps = args[4] if len(args) > 4 else 1e-5
    grads = layernorm_grads(SimpleNamespace(normalized_shape=shape, weight=weight, bias=bias,
                                            eps=eps), x, c)
    return {2: grads.get("weight"), 3: grads.get("bias")}


def perturbative_grads(m, x, c):
    """fxlra.nn.PerturbativeConv2d: dw[o, k] = sum over batch and space of e_o * relu(x + n)_k
    (the paper's pseudo-convolution rule), db = sum(e)."""
    u = m.perturbed(x)
    grads = {"weight": torch.einsum("bohw,bkhw->ok", c, u)[:, :, None, None]}
    if m.bias is not None:
        grads["bias"] = c.sum((0, 2, 3))
    return grads


def locally_connected_grads(m, x, c):
    """fxlra.nn.LocallyConnected2d: dW[l] = sum over the batch of e[:, :, l]^T cols[:, :, l]
    at every output position l, db = sum(e) over the batch."""
    cols = m.columns(x)
    grads = {"weight": torch.einsum("bol,bkl->lok", c.reshape(c.shape[0], c.shape[1], -1),
                                    cols)}
    if m.bias is not None:
        grads["bias"] = c.sum(0)
    return grads


# -- helpers of the generated code for carrying an error (the carry rules: fxlra.ops.carry) ----------
def reduce_to(c, shape):
    """Sum a cotangent over the axes that were broadcast to reach it."""
    if tuple(c.shape) == tuple(shape):
        return c
    while c.dim() > len(shape):
        c = c.sum(0)
    dims = [k for k, n in enumerate(shape) if n == 1 and c.shape[k] != 1]
    return c.sum(dims, keepdim=True) if dims else c


def sliced_parts(c, index, parts):
    """The VJP of ``parts[index]`` (a tuple sliced, ``chunks[::-1]``) for its cotangent
    {position in the slice: cotangent}: the same cotangents at the tuple's own positions."""
    positions = range(len(parts))[index]
    return {positions[k]: v for k, v in c.items()}


def cat_part(c, dim, inputs, k):
    """The VJP of torch.cat for its k-th input: that input's slice of the cotangent."""
    start = sum(t.shape[dim] for t in inputs[:k])
    return c.narrow(dim, start, inputs[k].shape[dim])


def functional_norm_vjp(call, args, kwargs, c):
    """The input-VJP of F.batch_norm / F.layer_norm / F.group_norm at its recorded arguments;
    the other tensors (running statistics, affine parameters) are copies, so nothing moves."""
    x, rest = args[0], [a.clone() if isinstance(a, torch.Tensor) else a for a in args[1:]]
    kw = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    _, pullback = torch.func.vjp(lambda v: call.target(v, *rest, **kw), x)
    return pullback(c.to(x.dtype))[0]


# -- derivatives of activations (phi'), used by local_rule="dx" and error_rule="derived" ---------
def leaky_prime(call, h):
    slope = call.module.negative_slope if call.module is not None else call.arg(
        "negative_slope", 1, 0.01)
    return torch.where(h > 0, torch.ones_like(h), torch.full_like(h, slope))


def tanh_prime(call, h):
    return 1 - torch.tanh(h) ** 2


def sigmoid_prime(call, h):
    s = torch.sigmoid(h)
    return s * (1 - s)


def relu_prime(call, h):
    return (h > 0).to(h.dtype)


def sign_prime(call, h):
    return torch.zeros_like(h)


def recorded_prime(call, h):
    """phi'(h) of an activation function by forward mode on the op alone, at its recorded
    constant arguments (F.elu(h, alpha=3.0) differentiates elu with alpha 3, not 1)."""
    return torch.func.jvp(call.apply_to, (h,), (torch.ones_like(h),))[1]


def attribute(root, target):
    """``root``'s attribute by its qualified name (a ``get_attr`` node's target)."""
    value = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


class OpCall:
    """One fx node's op, with its recorded call form, for the rules above and the fallbacks."""

    def __init__(self, node, modules):
        self.name, self.op, self.target = node.name, node.op, node.target
        self.module = modules[node.target] if node.op == "call_module" else None
        self.args, self.kwargs = node.args, node.kwargs
        self._root = modules[""]                       # the model: get_attr targets
        self.input_names = [a.name for a in node.all_input_nodes]

    def arg(self, name, position, default):
        if name in self.kwargs:
            return self.kwargs[name]
        return self.args[position] if len(self.args) > position else default

    def apply_to(self, h):
        """The op with ``h`` in place of its first input and its other recorded arguments,
        which must be constants or the model's own tensors (an activation's phi(h):
        F.elu(h, alpha=3.0); torch.export's aten.prelu(h, weight))."""
        if self.module is not None:
            return self.module(h)
        rest = torch.utils._pytree.tree_leaves((self.args[1:], self.kwargs))
        tensors = [a.name for a in rest if isinstance(a, fx.Node) and a.op != "get_attr"]
        if tensors:
            raise UnsupportedError(f"{self.name} ({self.target}) reads other tensors "
                                   f"({', '.join(tensors)}) besides its input; fxlra cannot "
                                   "apply it as an activation. Register it with "
                                   "fxlra.register_activation(fn, derivative)")
        args, kwargs = fx.node.map_arg((self.args[1:], self.kwargs), self._attribute)
        return self(h, *args, **kwargs)

    def _attribute(self, node):
        return attribute(self._root, node.target)

    def __call__(self, *args, **kwargs):
        if self.module is not None:
            return self.module(*args, **kwargs)
        if self.op == "call_function":
            return self.target(*args, **kwargs)
        return getattr(args[0], self.target)(*args[1:], **kwargs)

    def __repr__(self):
        return f"<op {self.name}>"
