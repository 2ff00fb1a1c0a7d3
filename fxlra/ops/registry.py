"""The op registry: everything fxlra knows about an op kind, one row per module class, function
or method name, and one lookup, ``kind_of(node, modules)``.

A row (``OpKind``) says whether the op is an activation (an error site) and its derivative,
with which signs an error passes through it unchanged, the rule that carries an error back
through it otherwise, its weight-gradient rule, and where its features sit. An op without a
row, or without the field asked for, falls back to ``torch.func`` on that one op (its local
VJP); ``prog.explain()`` names such an op's rule "local-vjp". Adding an op is adding a row.

Function rows are keyed by the callable; ATen ops (the targets of a ``torch.export`` graph,
``aten.relu.default``) find the row of their overload packet (``aten.relu``).
"""
import dataclasses
import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torchvision.ops import StochasticDepth, stochastic_depth

from . import carry, local
from ..nn import LocallyConnected2d, PerturbativeConv2d

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class OpKind:
    """What fxlra knows about one op kind; the defaults describe an op it knows nothing of."""
    activation: bool = False             # an error site sits at its output (phi of the site)
    phi_prime: Callable | None = None    # phi'(call, h) of a built-in activation (None: jvp)
    derivative: Callable | None = None   # a registered activation's phi'(h)
    signs: tuple | None = None           # the error passes unchanged to each tensor input
    carry: Callable | None = None        # carry(call, x, c) -> the error at its input
    grads: Callable | None = None        # rule(module, x, c) -> {parameter name: gradient}
    rule: str = "local-vjp"              # the name of ``grads`` in the Plan and explain()
    arg_grads: Callable | None = None    # a function op's rule(args, c) -> {position: gradient}
    grad_args: tuple = ()                # the positions of the parameters ``arg_grads`` covers
    arg_carry: Callable | None = None    # a function op's carry(args, c, k) -> error at arg k
    carry_args: tuple = ()               # the argument positions ``arg_carry`` covers
    norm: bool = False                   # a normalisation layer (norm_error="vjp" or "pass")
    layout: bool = False                 # only moves or regroups elements
    constant: bool = False               # its value ignores its inputs' values
    concat: bool = False                 # torch.cat: each input gets its slice of the error
    channel_last: bool = False           # its output keeps its features in the last axis
    feature_axis: int = 0                # the axis of its parameters that counts its features
    broadcasts: bool = False             # elementwise arithmetic: its parameters broadcast
    input_axis: int | None = None        # the axis of its weight that counts what it reads
    feature_norm: Callable | None = None  # (node, modules) -> (kind, eps): it normalises its
                                          # input over the last axis alone (else None)

    @property
    def mixes_features(self):
        """A parametrised op that mixes features (linear, conv, attention) needs a site in
        front of it when its input carries an unresolved error; an elementwise one does not."""
        return self.signs is None and not self.norm


UNKNOWN = OpKind()
NORM_ERRORS = ("vjp", "pass")
_PASS, _ACTIVATION = dict(signs=(1,)), dict(activation=True, signs=(1,))


def _module_norm(kind):
    """A norm module's (kind, eps) where it normalises over the last axis alone."""
    def spec(node, modules):
        m = modules[node.target]
        return (kind, m.eps) if len(m.normalized_shape) == 1 else None
    return spec


def _function_norm(kind, eps_at, default):
    """``layer_norm(x, shape, weight, bias, eps)`` / ``rms_norm(x, shape, weight, eps)``'s
    (kind, eps) where ``shape`` is the last axis alone."""
    def spec(node, modules):
        shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
        eps = node.args[eps_at] if len(node.args) > eps_at else node.kwargs.get("eps", default)
        return (kind, eps) if isinstance(shape, (list, tuple)) and len(shape) == 1 else None
    return spec


_PHI_PRIME = {"relu": local.relu_prime, "ReLU": local.relu_prime, "tanh": local.tanh_prime,
              "Tanh": local.tanh_prime, "sigmoid": local.sigmoid_prime,
              "Sigmoid": local.sigmoid_prime, "sign": local.sign_prime,
              "leaky_relu": local.leaky_prime, "LeakyReLU": local.leaky_prime}

_ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.Tanh, nn.Sigmoid, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.LeakyReLU, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softsign, nn.Softplus,
    nn.Tanhshrink, nn.LogSigmoid, nn.PReLU)
_ACTIVATION_FUNCTIONS = (
    F.relu, torch.relu, F.relu6, torch.tanh, F.tanh, torch.sigmoid, F.sigmoid, F.elu, F.celu,
    F.selu, torch.selu, F.gelu, F.silu, F.mish, F.leaky_relu, F.hardtanh, F.hardswish,
    F.hardsigmoid, F.softsign, F.softplus, torch.sign, F.logsigmoid, F.prelu)
_NORM_INPUT = {nn.modules.batchnorm._BatchNorm: carry.batchnorm_input,
               nn.LayerNorm: carry.layernorm_input, nn.GroupNorm: carry.groupnorm_input,
               nn.modules.instancenorm._InstanceNorm: carry.module_input_vjp,
               nn.RMSNorm: carry.module_input_vjp, nn.LocalResponseNorm: carry.module_input_vjp}

# (keys, fields): a key in several entries gets the union of their fields
_MODULE_ROWS = [
    (_ACTIVATION_MODULES, _ACTIVATION),
    ((nn.modules.batchnorm._NormBase,) + tuple(_NORM_INPUT), dict(norm=True, signs=(1,))),
    ((nn.modules.dropout._DropoutNd, StochasticDepth, nn.Identity), _PASS),
    ((nn.Flatten,), dict(layout=True, carry=carry.reshape_back)),
    ((nn.Unflatten,), dict(layout=True)),
    ((nn.MaxPool2d,), dict(carry=carry.max_pool2d)),
    ((nn.AvgPool2d,), dict(carry=carry.avg_pool2d)),
    ((nn.AdaptiveAvgPool2d,), dict(carry=carry.adaptive_avg_pool2d)),
    ((nn.Linear,), dict(grads=local.linear_grads, rule="linear")),
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), dict(grads=local.conv_grads, rule="conv")),
    ((nn.modules.batchnorm._BatchNorm,), dict(grads=local.batchnorm_grads, rule="batchnorm")),
    ((nn.LayerNorm,), dict(grads=local.layernorm_grads, rule="layernorm")),
    ((nn.GroupNorm,), dict(grads=local.groupnorm_grads, rule="groupnorm")),
    ((nn.Embedding,), dict(grads=local.embedding_grads, rule="embedding")),
    ((PerturbativeConv2d,), dict(grads=local.perturbative_grads, rule="perturbative",
                                 carry=carry.perturbative_input)),
    ((LocallyConnected2d,), dict(grads=local.locally_connected_grads, rule="locally-connected",
                                 carry=carry.locally_connected_input)),
    ((nn.Linear, nn.Bilinear, nn.LayerNorm, nn.RMSNorm, nn.Embedding, nn.MultiheadAttention),
     dict(channel_last=True)),
    ((nn.LayerNorm,), dict(feature_norm=_module_norm("layer"))),
    ((nn.RMSNorm,), dict(feature_norm=_module_norm("rms"))),
] + [((cls,), dict(carry=fn)) for cls, fn in _NORM_INPUT.items()]

_FUNCTION_ROWS = [
    (_ACTIVATION_FUNCTIONS, _ACTIVATION),
    ((operator.add, torch.add, operator.mul, torch.mul, operator.truediv, torch.div),
     dict(signs=(1, 1), broadcasts=True)),
    ((operator.sub, torch.sub), dict(signs=(1, -1), broadcasts=True)),
    ((operator.neg, torch.neg), dict(signs=(-1,))),
    ((torch.clone, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
      stochastic_depth), _PASS),
    ((F.batch_norm, F.layer_norm, F.group_norm), dict(norm=True, signs=(1,))),
    ((F.linear, F.layer_norm), dict(channel_last=True)),
    ((F.linear, aten.linear), dict(arg_grads=local.linear_arg_grads, grad_args=(1, 2),
                                   rule="linear")),
    ((F.layer_norm, aten.layer_norm), dict(arg_grads=local.layernorm_arg_grads,
                                           grad_args=(2, 3), rule="layernorm",
                                           feature_norm=_function_norm("layer", 4, 1e-5))),
    ((F.rms_norm, aten.rms_norm), dict(feature_norm=_function_norm("rms", 3, None))),
    ((torch.addmm, aten.addmm), dict(arg_grads=local.addmm_arg_grads, grad_args=(0, 2),
                                     rule="addmm")),
    ((aten.embedding,), dict(arg_grads=local.embedding_arg_grads, grad_args=(0,),
                             rule="embedding")),
    ((F.conv1d, F.conv2d, F.conv3d, aten.conv1d, aten.conv2d, aten.conv3d),
     dict(arg_grads=local.conv_arg_grads, grad_args=(1, 2), rule="conv")),
    ((aten.batch_norm,), dict(arg_grads=local.batchnorm_arg_grads, grad_args=(1, 2),
                              rule="batchnorm")),
    # the error at a function op's input, from its other arguments' values
    ((F.linear, aten.linear), dict(arg_carry=local.linear_arg_carry, carry_args=(0,))),
    ((torch.addmm, aten.addmm), dict(arg_carry=local.addmm_arg_carry, carry_args=(1,))),
    ((torch.mm, torch.matmul, operator.matmul, aten.mm, aten.matmul),
     dict(arg_carry=local.matmul_arg_carry, carry_args=(0,))),
    ((torch.pow, operator.pow, aten.pow), dict(arg_carry=local.pow_arg_carry, carry_args=(0,))),
    ((aten.slice,), dict(arg_carry=local.slice_arg_carry, carry_args=(0,))),
    ((torch.split, aten.split, aten.split_with_sizes),
     dict(arg_carry=local.split_arg_carry, carry_args=(0,))),
    # x @ W with W (in, out): features in the output's last axis, counted by W's and the bias's
    ((torch.addmm, torch.mm, torch.bmm, torch.matmul), dict(channel_last=True, feature_axis=-1)),
    ((torch.addmm, torch.mm, torch.bmm, torch.matmul, operator.matmul, aten.addmm, aten.mm,
      aten.bmm, aten.matmul), dict(input_axis=-2)),
    ((F.linear, aten.linear, F.conv1d, F.conv2d, F.conv3d, aten.conv1d, aten.conv2d,
      aten.conv3d, aten.convolution), dict(input_axis=1)),
    ((torch.reshape, torch.flatten, torch.permute, torch.transpose, torch.swapaxes,
      torch.movedim, torch.unflatten), dict(layout=True)),
    ((torch.flatten, torch.reshape), dict(carry=carry.reshape_back)),
    ((torch.mean,), dict(carry=carry.mean)),
    ((torch.permute,), dict(carry=carry.permute)),
    ((torch.transpose,), dict(carry=carry.transpose)),
    ((torch.cat, torch.concat, torch.concatenate), dict(concat=True)),
    ((torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like,
      torch.randn_like, torch.randint_like), dict(constant=True)),
    # ATen ops, as a torch.export graph calls them
    ((aten.relu, aten.relu6, aten.tanh, aten.sigmoid, aten.elu, aten.celu, aten.selu, aten.gelu,
      aten.silu, aten.mish, aten.leaky_relu, aten.hardtanh, aten.hardswish, aten.hardsigmoid,
      aten.softplus, aten.sign, aten.log_sigmoid, aten.prelu), _ACTIVATION),
    ((aten.add, aten.mul, aten.div), dict(signs=(1, 1), broadcasts=True)),
    ((aten.sub,), dict(signs=(1, -1), broadcasts=True)),
    ((aten.neg,), dict(signs=(-1,))),
    ((aten.clone, aten.dropout, aten.alias, aten.contiguous, aten.to, aten._to_copy,
      aten.type_as), _PASS),
    ((aten.layer_norm, aten.batch_norm, aten.group_norm), dict(norm=True, signs=(1,))),
    ((aten.linear, aten.layer_norm), dict(channel_last=True)),
    ((aten.embedding,), dict(channel_last=True, feature_axis=-1)),
    ((aten.addmm, aten.mm, aten.bmm, aten.matmul), dict(channel_last=True, feature_axis=-1)),
    ((aten.view, aten.reshape, aten.flatten, aten.permute, aten.transpose, aten.unflatten),
     dict(layout=True)),
    ((aten.view, aten.reshape, aten.flatten, aten.unflatten), dict(carry=carry.reshape_back)),
    ((aten.permute,), dict(carry=carry.permute)),
    ((aten.transpose,), dict(carry=carry.transpose)),
    ((aten.cat,), dict(concat=True)),
    ((aten.zeros_like, aten.ones_like, aten.empty_like, aten.full_like, aten.rand_like,
      aten.randn_like), dict(constant=True)),
]

_METHOD_ROWS = [
    (("relu", "tanh", "sigmoid", "sign"), _ACTIVATION),
    (("add", "mul", "div"), dict(signs=(1, 1))),
    (("sub",), dict(signs=(1, -1))),
    (("neg",), dict(signs=(-1,))),
    (("contiguous", "clone", "float", "double", "half", "bfloat16", "to", "type_as"), _PASS),
    (("reshape", "view", "flatten", "unflatten", "permute", "transpose", "swapaxes", "movedim",
      "contiguous"), dict(layout=True)),
    (("flatten", "view", "reshape"), dict(carry=carry.reshape_back)),
    (("mean",), dict(carry=carry.mean)),
    (("permute",), dict(carry=carry.permute)),
    (("transpose",), dict(carry=carry.transpose)),
    (("new_empty", "new_zeros", "new_ones", "new_full", "new_tensor", "bernoulli_", "uniform_",
      "normal_", "exponential_", "random_", "fill_", "zero_"), dict(constant=True)),
]


def _name(key):
    return key.__name__ if hasattr(key, "__name__") else str(key)


def _table(entries):
    rows = {}
    for keys, fields in entries:
        for key in keys:
            row = dataclasses.replace(rows.get(key, UNKNOWN), **fields)
            if row.activation and row.phi_prime is None and "activation" in fields:
                row = dataclasses.replace(row, phi_prime=_PHI_PRIME.get(
                    _name(key), None if isinstance(key, type) else local.recorded_prime))
            rows[key] = row
    return rows


MODULES, FUNCTIONS, METHODS = map(_table, (_MODULE_ROWS, _FUNCTION_ROWS, _METHOD_ROWS))
# the weight-gradient rules by the name a Plan gives them; "local-vjp" is torch.func's
WEIGHT_GRADS = {row.rule: row.grads for row in MODULES.values() if row.grads is not None}
# the same for function ops (their arguments, not a module's attributes)
FUNCTION_GRADS = {row.rule: row.arg_grads for row in FUNCTIONS.values() if row.arg_grads}


def _row_class(cls):
    """The class whose row describes module class ``cls``: its nearest base in the registry,
    and whether ``cls`` computes what that row says (not when its ``forward`` is defined by a
    class outside torch below that base: timm's BatchNormAct2d adds an activation to its
    BatchNorm, a weight-standardised Conv2d transforms its weight)."""
    for key in cls.__mro__:
        if key in MODULES:
            definer = next(c for c in cls.__mro__ if "forward" in vars(c))
            own = definer is key or issubclass(key, definer) or \
                definer.__module__.split(".")[0] == "torch"
            return key, own
    return None, False


def kind_of(node, modules):
    """The registry's row for an fx node (``UNKNOWN`` when it has none). A module whose own
    forward computes something else keeps only what its class family says of its layout (a
    norm, features last) and is otherwise unknown."""
    if node.op == "call_module":
        key, own = _row_class(type(modules[node.target]))
        if key is None:
            return UNKNOWN
        row = MODULES[key]
        return row if own else OpKind(norm=row.norm, channel_last=row.channel_last)
    if node.op == "call_function":
        row = FUNCTIONS.get(node.target)
        if row is None:
            row = FUNCTIONS.get(getattr(node.target, "overloadpacket", None), UNKNOWN)
        return row
    if node.op == "call_method":
        return METHODS.get(node.target, UNKNOWN)
    return UNKNOWN


def register_activation(activation, derivative=None):
    """Make a user activation (an nn.Module class or a function) an error site.

    ``derivative(h)`` returns phi'(h) elementwise; without it autograd differentiates ``phi``.
    A registered module class is traced as a leaf, a registered function is wrapped by fx. Its
    error is carried through it by its VJP where it is not a site.
    """
    row = OpKind(activation=True, derivative=derivative)
    if isinstance(activation, type) and issubclass(activation, nn.Module):
        MODULES[activation] = row
    elif callable(activation):
        FUNCTIONS[activation] = row
    else:
        raise TypeError("register_activation takes an nn.Module class or a function, got "
                        f"{type(activation).__name__}")


def _outside_torch(key, also=()):
    return (getattr(key, "__module__", None) or "torch").split(".")[0] not in ("torch",) + also


def registered_activation_modules():
    return [cls for cls, row in MODULES.items() if row.activation and _outside_torch(cls)]


def registered_activation_functions():
    return [fn for fn, row in FUNCTIONS.items()
            if row.activation and _outside_torch(fn, ("builtins",))]


def rule_module_types():
    """Module classes with an fxlra rule that are not torch.nn's own (fxlra.nn layers): the
    tracer keeps them as leaves so that their rule applies."""
    return [cls for cls, row in MODULES.items() if row.grads is not None and _outside_torch(cls)]


# -- queries on a node's row, as the analysis and the generators ask them --------------------------
def is_activation(node, modules):
    return kind_of(node, modules).activation


def activation_name(node, modules):
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    return getattr(node.target, "__name__", str(node.target))


def is_layout_op(node, modules):
    """Whether the op only moves or regroups elements (no arithmetic)."""
    return kind_of(node, modules).layout


def ignores_input_values(node):
    """Whether the op's value is the same whatever values its tensor inputs hold (their shape,
    dtype or device only): no error is carried into it, and it holds no site."""
    return node.op != "call_module" and kind_of(node, {}).constant


def carry_signs(node, modules, norm_error):
    """How a site's error crosses ``node`` on its way to the site's ops: the signs with which it
    passes unchanged to each tensor input, or None when the node's own VJP carries it (every
    shape-changing op, and a normalisation layer under ``norm_error="vjp"``, with the statistics
    its forward used)."""
    row = kind_of(node, modules)
    return None if norm_error == "vjp" and row.norm else row.signs


def rule_name(node, modules):
    """The weight-gradient rule of a parametrised op: its row's, where the op is a module the
    rule takes or a function called the way its rule reads it (``function_grads``); "local-vjp"
    where the generated program uses torch.func (other functions, a module whose forward is its
    own)."""
    row = kind_of(node, modules)
    if node.op == "call_module":
        return row.rule if row.grads is not None else "local-vjp"
    return row.rule if function_grads(node, modules) is not None else "local-vjp"


def function_grads(node, modules):
    """A function op's explicit weight-gradient rule: its row's, where the op is called with
    positional arguments only and each parameter (``get_attr``; buffers such as running
    statistics aside) sits where the rule covers it; else None (torch.func's VJP)."""
    row = kind_of(node, modules)
    if node.op != "call_function" or row.arg_grads is None or node.kwargs:
        return None
    at = {k for k, a in enumerate(node.args) if isinstance(a, fx.Node) and a.op == "get_attr"
          and isinstance(local.attribute(modules[""], a.target), nn.Parameter)}
    return row.arg_grads if at and at <= set(row.grad_args) else None


def function_carry(node, modules, positions):
    """A function op's explicit carry to its arguments at ``positions``: its row's, where the op
    is called with positional arguments only and the rule covers every such position; else None
    (torch.func's VJP)."""
    row = kind_of(node, modules)
    if node.op != "call_function" or row.arg_carry is None or node.kwargs or not positions:
        return None
    return row.arg_carry if set(positions) <= set(row.carry_args) else None


def feature_norm(node, modules):
    """(kind, eps) of an op that normalises its first input over the last axis alone
    ("layer": LayerNorm, "rms": RMSNorm; eps None: the dtype's), else None."""
    row = kind_of(node, modules)
    return row.feature_norm(node, modules) if row.feature_norm is not None else None


def is_weight_op(node, modules):
    """True for parametrised ops that mix features; False for elementwise ones (norms, bias),
    a norm with its own forward included (timm's BatchNormAct2d)."""
    return kind_of(node, modules).mixes_features


def channel_last(node, modules):
    """Whether the op's output keeps its features in the last axis (linear, attention, LN)."""
    return kind_of(node, modules).channel_last


_FEATURE_ATTRIBUTES = ("out_features", "out_channels", "num_features", "num_channels",
                       "embedding_dim", "embed_dim")


def feature_counts(node, modules, root):
    """The feature counts a parametrised op may produce: a module's attribute, or for a function
    the leading size of each of its parameters (weight (out, in), norm weight (C,))."""
    if node.op == "call_module":
        m = modules[node.target]
        for name in _FEATURE_ATTRIBUTES:
            if isinstance(getattr(m, name, None), int):
                return {getattr(m, name)}
        shape = getattr(m, "normalized_shape", None)
        return {shape[-1]} if shape else set()
    axis = kind_of(node, modules).feature_axis
    return {value.shape[axis] for value in _parameters_read(node, root) if value.dim()}


def _parameters_read(node, root):
    """The parameters a function op reads through ``get_attr``."""
    for a in node.all_input_nodes:
        if a.op == "get_attr":
            value = local.attribute(root, a.target)
            if isinstance(value, nn.Parameter):
                yield value


def broadcast_axes(node, modules, ndim):
    """The output axes (of ``ndim``) along which the parameters of elementwise arithmetic
    (``broadcasts``) vary, by broadcasting's right alignment: a scale of shape (C,) varies along
    the last axis, one of shape (C, 1, 1) along axis 1 of a (B, C, H, W) map."""
    if not kind_of(node, modules).broadcasts:
        return set()
    return {ndim - value.dim() + k for value in _parameters_read(node, modules[""])
            for k, n in enumerate(value.shape) if n != 1 and value.dim() <= ndim}


_INPUT_FEATURE_ATTRIBUTES = ("in_features", "in_channels", "num_features", "num_channels",
                             "embed_dim")


def input_feature_counts(node, modules):
    """The feature counts a parametrised op reads: a module's (Linear's in_features, Conv's
    in_channels, a norm's features), or a function op's by its weight (``input_axis``: F.linear's
    (out, in), x @ W's (in, out)); empty when it does not say."""
    if node.op != "call_module":
        axis = kind_of(node, modules).input_axis
        return set() if axis is None else {
            w.shape[axis] for w in _parameters_read(node, modules[""]) if w.dim() >= 2}
    module = modules[node.target]
    for name in _INPUT_FEATURE_ATTRIBUTES:
        if isinstance(getattr(module, name, None), int):
            return {getattr(module, name)}
    shape = getattr(module, "normalized_shape", None)
    return {shape[-1]} if shape else set()
