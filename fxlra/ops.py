"""Tables that classify fx nodes: activations, shape-preserving ops, and parametrised ops.

Everything the analysis and the reference need to know about an op kind lives here, keyed by
the node's module class, function or method name, so that adding an op is adding a table row.
"""
import operator

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import stochastic_depth, StochasticDepth

from .nn import LocallyConnected2d, PerturbativeConv2d

# --- activations: module class / function / method name -> derivative (None: autograd's) ---------
# A parametrised activation (nn.PReLU's slope) is an op of its own site: the slope's update is
# the op's weight-gradient with the site's error at its output (by local VJP), like any op's.
_ACTIVATION_MODULES = {cls: None for cls in (
    nn.ReLU, nn.ReLU6, nn.Tanh, nn.Sigmoid, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.LeakyReLU, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softsign, nn.Softplus,
    nn.Tanhshrink, nn.LogSigmoid, nn.PReLU)}
_ACTIVATION_FUNCTIONS = {fn: None for fn in (
    F.relu, torch.relu, F.relu6, torch.tanh, F.tanh, torch.sigmoid, F.sigmoid, F.elu, F.celu,
    F.selu, torch.selu, F.gelu, F.silu, F.mish, F.leaky_relu, F.hardtanh, F.hardswish,
    F.hardsigmoid, F.softsign, F.softplus, torch.sign, F.logsigmoid)}
_ACTIVATION_METHODS = {name: None for name in ("relu", "tanh", "sigmoid", "sign")}


def register_activation(activation, derivative=None):
    """Make a user activation (an nn.Module class or a function) an error site.

    ``derivative(h)`` returns phi'(h) elementwise; without it autograd differentiates ``phi``.
    A registered module class is traced as a leaf, a registered function is wrapped by fx.
    """
    if isinstance(activation, type) and issubclass(activation, nn.Module):
        _ACTIVATION_MODULES[activation] = derivative
    elif callable(activation):
        _ACTIVATION_FUNCTIONS[activation] = derivative
    else:
        raise TypeError("register_activation takes an nn.Module class or a function, got "
                        f"{type(activation).__name__}")


def registered_activation_modules():
    return [cls for cls in _ACTIVATION_MODULES if not cls.__module__.startswith("torch.")]


def builtin_activation_function_names():
    """The names of torch's activation functions (``F.elu`` -> "elu")."""
    return sorted({fn.__name__ for fn in _ACTIVATION_FUNCTIONS
                   if (getattr(fn, "__module__", None) or "torch").split(".")[0] == "torch"})


def registered_activation_functions():
    return [fn for fn in _ACTIVATION_FUNCTIONS
            if (getattr(fn, "__module__", None) or "torch").split(".")[0] not in ("torch", "builtins")]


def row_class(cls, table):
    """The class of ``table`` whose row describes module class ``cls``: its nearest base in the
    table, unless ``cls`` computes something else, its ``forward`` defined by a class outside
    torch below that base (timm's BatchNormAct2d adds an activation to its BatchNorm, a
    weight-standardised Conv2d transforms its weight): then no row applies (None)."""
    for key in cls.__mro__:
        if key in table:
            definer = next(c for c in cls.__mro__ if "forward" in vars(c))
            own = definer is key or issubclass(key, definer) or \
                definer.__module__.split(".")[0] == "torch"
            return key if own else None
    return None


def _lookup(node, modules, by_module, by_function, by_method):
    """The table entry for ``node``; ``(False, None)`` when it is not in the table."""
    if node.op == "call_module":
        key = row_class(type(modules[node.target]), by_module)
        if key is not None:
            return True, by_module[key]
    elif node.op == "call_function" and node.target in by_function:
        return True, by_function[node.target]
    elif node.op == "call_method" and node.target in by_method:
        return True, by_method[node.target]
    return False, None


def is_activation(node, modules):
    return _lookup(node, modules, _ACTIVATION_MODULES, _ACTIVATION_FUNCTIONS,
                   _ACTIVATION_METHODS)[0]


def activation_derivative(node, modules):
    """The registered derivative of an activation node, or None (use autograd)."""
    return _lookup(node, modules, _ACTIVATION_MODULES, _ACTIVATION_FUNCTIONS,
                   _ACTIVATION_METHODS)[1]


def activation_name(node, modules):
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    return getattr(node.target, "__name__", str(node.target))


# --- shape-preserving ops the error is carried through unchanged (one sign per tensor input) -----
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
          nn.RMSNorm)
_DROPOUTS = (nn.modules.dropout._DropoutNd, StochasticDepth)
_PASS_MODULES = {cls: (1,) for cls in _NORMS + _DROPOUTS + (nn.Identity,)}
_PASS_MODULES.update({cls: (1,) for cls in _ACTIVATION_MODULES})
_PASS_FUNCTIONS = {
    operator.add: (1, 1), operator.sub: (1, -1), operator.mul: (1, 1), operator.truediv: (1, 1),
    torch.add: (1, 1), torch.sub: (1, -1), torch.mul: (1, 1), torch.div: (1, 1),
    operator.neg: (-1,), torch.neg: (-1,), torch.clone: (1,), F.dropout: (1,),
    F.dropout1d: (1,), F.dropout2d: (1,), F.dropout3d: (1,), F.alpha_dropout: (1,),
    stochastic_depth: (1,), F.batch_norm: (1,), F.layer_norm: (1,), F.group_norm: (1,),
}
_PASS_FUNCTIONS.update({fn: (1,) for fn in _ACTIVATION_FUNCTIONS})
_PASS_METHODS = {
    "add": (1, 1), "sub": (1, -1), "mul": (1, 1), "div": (1, 1), "neg": (-1,),
    "contiguous": (1,), "clone": (1,), "float": (1,), "double": (1,), "half": (1,),
    "bfloat16": (1,), "to": (1,), "type_as": (1,),
}
_PASS_METHODS.update({m: (1,) for m in _ACTIVATION_METHODS})


# --- ops that only rearrange a tensor's elements (where a moved batch axis comes from) ---------
_LAYOUT_FUNCTIONS = {fn: True for fn in (torch.reshape, torch.flatten, torch.permute,
                                         torch.transpose, torch.swapaxes, torch.movedim,
                                         torch.unflatten)}
_LAYOUT_METHODS = {m: True for m in ("reshape", "view", "flatten", "unflatten", "permute",
                                     "transpose", "swapaxes", "movedim", "contiguous")}


def is_layout_op(node, modules):
    """Whether the op only moves or regroups elements (no arithmetic)."""
    return bool(_lookup(node, modules, {nn.Flatten: True, nn.Unflatten: True}, _LAYOUT_FUNCTIONS,
                        _LAYOUT_METHODS)[1])


# --- ops whose value does not depend on their input's values (a drop-path mask from new_empty) --
_CONSTANT_FUNCTIONS = {fn: True for fn in (torch.zeros_like, torch.ones_like, torch.empty_like,
                                           torch.full_like, torch.rand_like, torch.randn_like,
                                           torch.randint_like)}
_CONSTANT_METHODS = {m: True for m in ("new_empty", "new_zeros", "new_ones", "new_full",
                                       "new_tensor", "bernoulli_", "uniform_", "normal_",
                                       "exponential_", "random_", "fill_", "zero_")}


def ignores_input_values(node):
    """Whether the op's value is the same whatever values its tensor inputs hold (their shape,
    dtype or device only): no error is carried into it, and it holds no site."""
    return node.op != "call_module" and \
        bool(_lookup(node, {}, {}, _CONSTANT_FUNCTIONS, _CONSTANT_METHODS)[1])


def pass_through_signs(node, modules):
    """Signs with which the error passes to each tensor input, or None if the op needs a VJP."""
    return _lookup(node, modules, _PASS_MODULES, _PASS_FUNCTIONS, _PASS_METHODS)[1]


# --- normalisation layers: carried by their input-VJP (norm_error="vjp") or unchanged ("pass") ---
NORM_ERRORS = ("vjp", "pass")
_NORM_FUNCTIONS = {F.batch_norm: True, F.layer_norm: True, F.group_norm: True}


def is_norm(node, modules):
    """Whether the node is a normalisation layer (module or function)."""
    if node.op == "call_module":
        return isinstance(modules[node.target], _NORMS)
    return node.op == "call_function" and node.target in _NORM_FUNCTIONS


def carry_signs(node, modules, norm_error):
    """How a site's error crosses ``node`` on its way to the site's ops: the signs with which it
    passes unchanged to each tensor input, or None when the node's own VJP carries it (every
    shape-changing op, and a normalisation layer under ``norm_error="vjp"``, with the statistics
    its forward used)."""
    if norm_error == "vjp" and is_norm(node, modules):
        return None
    return pass_through_signs(node, modules)


# --- parametrised ops: rule name, whether the op mixes features (a "weight op"), channel axis ----
# A weight op (linear, conv, attention, ...) needs a site in front of it when its input still
# carries an unresolved error; an elementwise parametrised op (norm affine, bias, scale) does not.
_RULE_MODULES = {
    nn.Linear: "linear", nn.Bilinear: "local-vjp", nn.PReLU: "local-vjp",
    nn.Conv1d: "conv", nn.Conv2d: "conv", nn.Conv3d: "conv",
    nn.modules.batchnorm._BatchNorm: "batchnorm", nn.LayerNorm: "layernorm",
    nn.GroupNorm: "groupnorm", nn.modules.instancenorm._InstanceNorm: "instancenorm",
    nn.RMSNorm: "rmsnorm", nn.Embedding: "embedding",
    PerturbativeConv2d: "perturbative", LocallyConnected2d: "locally-connected",
}
_RULE_FUNCTIONS = {F.linear: "linear", F.conv1d: "conv", F.conv2d: "conv", F.conv3d: "conv"}
_CHANNEL_LAST = (nn.Linear, nn.Bilinear, nn.LayerNorm, nn.RMSNorm, nn.Embedding,
                 nn.MultiheadAttention)
_CHANNEL_LAST_FUNCTIONS = (F.linear, F.layer_norm)


def rule_name(node, modules):
    """The update rule of a parametrised op; "local-vjp" when fxlra has no rule of its own
    (also for a subclass of a rule's module that overrides its forward)."""
    found, name = _lookup(node, modules, _RULE_MODULES, _RULE_FUNCTIONS, {})
    if found:
        return name
    if pass_through_signs(node, modules) is not None:
        return "elementwise"
    return "local-vjp"


def is_weight_op(node, modules):
    """True for parametrised ops that mix features; False for elementwise ones (norms, bias),
    a norm with its own forward included (timm's BatchNormAct2d)."""
    return pass_through_signs(node, modules) is None and not is_norm(node, modules)


def channel_last(node, modules):
    """Whether the op's output keeps its features in the last axis (linear, attention, LN)."""
    if node.op == "call_module":
        return isinstance(modules[node.target], _CHANNEL_LAST)
    return node.op == "call_function" and node.target in _CHANNEL_LAST_FUNCTIONS


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
    counts = set()
    for a in node.all_input_nodes:
        if a.op == "get_attr":
            value = root
            for part in a.target.split("."):
                value = getattr(value, part)
            if isinstance(value, nn.Parameter) and value.dim():
                counts.add(value.shape[0])
    return counts


_INPUT_FEATURE_ATTRIBUTES = ("in_features", "in_channels", "num_features", "num_channels",
                             "embed_dim")


def input_feature_counts(module):
    """The feature counts a parametrised module reads (Linear's in_features, Conv's
    in_channels, a norm's features); empty when it does not say."""
    for name in _INPUT_FEATURE_ATTRIBUTES:
        if isinstance(getattr(module, name, None), int):
            return {getattr(module, name)}
    shape = getattr(module, "normalized_shape", None)
    return {shape[-1]} if shape else set()


def rule_module_types():
    """Module classes with an fxlra rule that are not torch.nn's own (fxlra.nn layers): the
    tracer keeps them as leaves so that their rule applies."""
    return [cls for cls in _RULE_MODULES if not cls.__module__.startswith("torch.")]


def compute_dtype(x, c):
    """The dtype a weight-gradient op computes in: its inputs', or under autocast (where the
    recorded input and the error may differ) the autocast dtype, as autograd's backward would."""
    if x.dtype == c.dtype:
        return x.dtype
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return torch.promote_types(x.dtype, c.dtype)
