"""The hypothesis model zoo shared by the property, fuzz and stream tests.

Two families, each a spec (a plain dict hypothesis draws and prints) and a builder:

- ``model_specs`` / ``build_random_net``: float64 models that fxlra trains, made of a Linear or
  Conv2d stem, 1-4 random layers (Linear + activation, Linear without activation so that Linear
  -> Linear happens, Conv2d [+ BatchNorm2d] + activation, MaxPool2d/AvgPool2d, residual blocks
  ``x + f(x)`` with an identity or 1x1-conv/Linear shortcut), then Flatten or AdaptiveAvgPool2d
  and a final Linear to a few classes. Activations are tanh, relu (also in place), sigmoid, sign,
  elu, gelu and leaky_relu, as modules or as functions. Inputs are (3, 6) vectors or
  (3, 2, 8, 8) images. ``random_dags`` draws error graphs over a program's sites.
- ``specs`` / ``build_spec_net``: the fuzzer's models, walking through vectors (B, F), images
  (B, C, S, S) and token sequences (B, T, F) with layers fxlra has rules for, ops and modules it
  has none for, untraceable layers, several kinds of heads and structural changes (see
  test_fuzz.py's docstring).

``PRESETS`` and ``SPEC_PRESETS`` are the wiring presets each family is tried with; ``wiring_of``
turns one into (wiring, depth). ``SETTINGS`` are the hypothesis settings all three files use.
"""
import math

import numpy as np
import torch
from hypothesis import HealthCheck, strategies as st
from torch import nn
from torch.nn import functional as F

import fxlra

DTYPE = torch.float64
N_VECTOR_IN, IMAGE_CHANNELS, IMAGE_SIZE, BATCH = 6, 2, 8, 3

SETTINGS = dict(deadline=None, derandomize=True, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


# == the trainable family (model_specs) ===========================================================
# -- activations ----------------------------------------------------------------------------------
class Lambda(nn.Module):
    """A function called from forward (fx records call_function): activations given as
    functions, ops without a rule, layout changes."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, h):
        return self.fn(h)


ACT_MODULES = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "elu": nn.ELU,
               "gelu": nn.GELU, "leaky_relu": nn.LeakyReLU,
               "relu_inplace": lambda: nn.ReLU(inplace=True)}
ACT_FUNCTIONS = {"tanh": torch.tanh, "relu": F.relu, "sigmoid": torch.sigmoid, "sign": torch.sign,
                 "elu": F.elu, "gelu": F.gelu, "leaky_relu": F.leaky_relu}
ACTIVATIONS = sorted(set(ACT_MODULES) | set(ACT_FUNCTIONS))


def make_act(spec):
    """spec = (name, form); sign exists only as a function."""
    name, form = spec
    if form == "module" and name in ACT_MODULES:
        return ACT_MODULES[name]()
    return Lambda(ACT_FUNCTIONS["relu" if name == "relu_inplace" else name])


# -- building blocks ------------------------------------------------------------------------------
class ConvLayer(nn.Module):
    def __init__(self, c_in, c_out, bn, act):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=not bn)
        self.bn = nn.BatchNorm2d(c_out) if bn else nn.Identity()
        self.act = make_act(act)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class LinearLayer(nn.Module):
    def __init__(self, n_in, n_out, act):
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)
        self.act = make_act(act) if act else nn.Identity()

    def forward(self, x):
        return self.act(self.linear(x))


class ConvResidual(nn.Module):
    """x + f(x), f = conv [bn] act conv [bn]; a 1x1-conv shortcut when channels change (or when
    drawn); optionally an activation after the merge."""

    def __init__(self, c_in, c_out, bn, act, shortcut, post):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=not bn)
        self.bn1 = nn.BatchNorm2d(c_out) if bn else nn.Identity()
        self.act = make_act(act)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=not bn)
        self.bn2 = nn.BatchNorm2d(c_out) if bn else nn.Identity()
        self.downsample = nn.Conv2d(c_in, c_out, 1) if shortcut or c_in != c_out else None
        self.post = make_act(post) if post else nn.Identity()

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        return self.post(out + identity)


class LinearResidual(nn.Module):
    """x + f(x), f = Linear act Linear; a Linear shortcut when widths change (or when drawn)."""

    def __init__(self, n_in, n_out, act, shortcut, post):
        super().__init__()
        self.fc1 = nn.Linear(n_in, n_out)
        self.act = make_act(act)
        self.fc2 = nn.Linear(n_out, n_out)
        self.downsample = nn.Linear(n_in, n_out) if shortcut or n_in != n_out else None
        self.post = make_act(post) if post else nn.Identity()

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return self.post(self.fc2(self.act(self.fc1(x))) + identity)


class RandomNet(nn.Module):
    """stem -> layers -> classifier, built from a spec: {"stem": (kind, width, act),
    "layers": (layer tuples...), "classes": n, "seed": s}; see ``model_specs``."""

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        kind, width, stem_act = spec["stem"]
        if kind == "image":
            self.stem = ConvLayer(IMAGE_CHANNELS, width, False, stem_act) if stem_act else \
                nn.Conv2d(IMAGE_CHANNELS, width, 3, padding=1)
            size = IMAGE_SIZE
        else:
            self.stem = LinearLayer(N_VECTOR_IN, width, stem_act)
            size = None
        layers = []
        for layer in spec["layers"]:
            op = layer[0]
            if op == "conv":
                _, c, bn, act = layer
                layers.append(ConvLayer(width, c, bn, act))
                width = c
            elif op == "pool":
                layers.append(nn.MaxPool2d(2) if layer[1] == "max" else nn.AvgPool2d(2))
                size //= 2
            elif op == "conv_res":
                _, c, bn, act, shortcut, post = layer
                layers.append(ConvResidual(width, c, bn, act, shortcut, post))
                width = c
            elif op == "head":
                if layer[1] == "flatten":
                    layers.append(nn.Flatten())
                    width = width * size * size
                else:
                    layers.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))
            elif op == "linear":
                _, n, act = layer
                layers.append(LinearLayer(width, n, act))
                width = n
            elif op == "linear_res":
                _, n, act, shortcut, post = layer
                layers.append(LinearResidual(width, n, act, shortcut, post))
                width = n
            else:
                raise AssertionError(layer)
        self.layers = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, spec["classes"])

    def forward(self, x):
        return self.classifier(self.layers(self.stem(x)))


# -- strategies -----------------------------------------------------------------------------------
widths = st.integers(2, 8)
acts = st.tuples(st.sampled_from(ACTIVATIONS), st.sampled_from(["module", "function"]))
maybe_act = st.one_of(st.none(), acts)


@st.composite
def model_specs(draw):
    kind = draw(st.sampled_from(["image", "vector"]))
    width = draw(widths)
    spec = {"stem": (kind, width, draw(maybe_act)), "classes": draw(st.integers(2, 4))}
    layers, size, mode = [], IMAGE_SIZE, kind
    for _ in range(draw(st.integers(1, 4))):
        if mode == "image":
            # conv layers and residual blocks twice as likely as pooling or leaving the image
            choices = ["conv", "conv_res", "conv", "conv_res", "to_vector"] + \
                (["pool"] if size >= 2 else [])
            op = draw(st.sampled_from(choices))
            if op == "conv":
                layers.append(("conv", draw(widths), draw(st.booleans()), draw(acts)))
            elif op == "conv_res":
                layers.append(("conv_res", draw(widths), draw(st.booleans()), draw(acts),
                               draw(st.booleans()), draw(maybe_act)))
            elif op == "pool":
                layers.append(("pool", draw(st.sampled_from(["max", "avg"]))))
                size //= 2
            else:
                layers.append(("head", draw(st.sampled_from(["flatten", "gap"]))))
                mode = "vector"
        if mode == "vector" and (not layers or layers[-1][0] != "head"):
            op = draw(st.sampled_from(["linear", "linear_plain", "linear_res"]))
            if op == "linear":
                layers.append(("linear", draw(widths), draw(acts)))
            elif op == "linear_plain":          # no activation: Linear -> Linear
                layers.append(("linear", draw(widths), None))
            else:
                layers.append(("linear_res", draw(widths), draw(acts), draw(st.booleans()),
                               draw(maybe_act)))
    if mode == "image":
        layers.append(("head", draw(st.sampled_from(["flatten", "gap"]))))
    spec["layers"] = tuple(layers)
    spec["seed"] = draw(st.integers(0, 2 ** 16))
    return spec


def build_random_net(spec):
    torch.manual_seed(spec["seed"])
    model = RandomNet(spec).to(DTYPE)
    torch.manual_seed(spec["seed"] + 1)
    if spec["stem"][0] == "image":
        x = torch.randn(BATCH, IMAGE_CHANNELS, IMAGE_SIZE, IMAGE_SIZE, dtype=DTYPE)
    else:
        x = torch.randn(BATCH, N_VECTOR_IN, dtype=DTYPE)
    y = torch.randint(0, spec["classes"], (BATCH,))
    return model, x, y


PRESETS = ["direct", "pairwise", "residual"] + \
    [("blocks", g) for g in (1, 2, 3)] + [("skip", g) for g in (1, 2, 3)]
# the fuzz family's presets: a deeper residual wiring, one group size each
SPEC_PRESETS = ["direct", "pairwise", "residual", ("residual", 3), ("blocks", 2), ("skip", 2)]


def wiring_of(p):
    """(wiring, depth) of a preset: a name, ("residual", depth), ("blocks", g) or ("skip", g)."""
    if isinstance(p, str):
        return p, 2
    if p[0] == "residual":
        return "residual", p[1]
    return {"blocks": fxlra.wiring.blocks, "skip": fxlra.wiring.skip}[p[0]](p[1]), 2


def preset(p):
    """The wiring of a preset (at the default depth)."""
    return wiring_of(p)[0]


@st.composite
def random_dags(draw, sites, outputs):
    """A mapping child -> [parents]: every non-output site takes one or more parents among the
    sites after it in forward order (so the graph is acyclic and every site is reachable)."""
    dag = {}
    for k, s in enumerate(sites):
        if s in outputs:
            continue
        later = list(sites[k + 1:])
        dag[s] = draw(st.lists(st.sampled_from(later), min_size=1, max_size=min(3, len(later)),
                               unique=True))
    return dag


# == the fuzz family (specs) ================================================================
# -- ops fxlra has no rule for: shape-preserving functions of the last axis ----------------------
class Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


def python_helper(h):
    """A plain Python function (not torch, not wrapped): fx traces through it."""
    return h * 0.5 + math.pi


UNKNOWN_OPS = {
    "fft": lambda h: torch.fft.fft(h).real,
    "sort": lambda h: torch.sort(h, dim=-1).values,
    "cumsum": lambda h: torch.cumsum(h, -1),
    "autograd_function": lambda h: Square.apply(h),
    "einsum": lambda h: torch.einsum("...i,...i->...i", h, h),
    "matmul_pair": lambda h: (h.unsqueeze(-1) @ h.unsqueeze(-2)).mean(-1),
    "topk": lambda h: torch.topk(h, 2, dim=-1).values.sum(-1, keepdim=True) + h,
    "masked_fill": lambda h: h.masked_fill(h > 0.5, 0.0),
    "gather": lambda h: torch.gather(h, -1, torch.argsort(h, -1)),
    "where": lambda h: torch.where(h > 0, h, 0.1 * h),
    "softmax": lambda h: torch.softmax(h, -1),
    "normalize": lambda h: F.normalize(h, dim=-1),
    "center": lambda h: h - h.mean(-1, keepdim=True),
    "amax": lambda h: h + h.amax(-1, keepdim=True),
    "abs_pow": lambda h: h.abs() ** 1.5,
    "flip_roll": lambda h: h.flip(-1).roll(1, -1),
    "python_helper": python_helper,
    "max_field": lambda h: h.max(-1, keepdim=True).values * h,
    "cat_chunks": lambda h: torch.cat(h.chunk(2, -1)[::-1], -1),
    "stack_unbind": lambda h: torch.stack(h.unbind(-1), -1),
    "floor_divide": lambda h: h // 0.5,
    "requires_grad": lambda h: h.requires_grad_(False),
    "fill": lambda h: torch.empty_like(h).fill_(0.5) + h,
}
SPEC_ACTIVATIONS = {"relu": (nn.ReLU, F.relu), "tanh": (nn.Tanh, torch.tanh),
               "sigmoid": (nn.Sigmoid, torch.sigmoid), "gelu": (nn.GELU, F.gelu),
               "sign": (None, torch.sign), "relu_inplace": (lambda: nn.ReLU(inplace=True), F.relu),
               "softmax": (lambda: nn.Softmax(-1), None), "prelu": (lambda: nn.PReLU(), None),
               "elu_alpha": (lambda: nn.ELU(2.0), lambda h: F.elu(h, alpha=2.0)),
               "hardtanh": (lambda: nn.Hardtanh(-0.5, 0.5), lambda h: F.hardtanh(h, -0.5, 0.5)),
               "softplus": (lambda: nn.Softplus(2.0), lambda h: F.softplus(h, beta=2.0))}


def activation(name, form):
    module, function = SPEC_ACTIVATIONS[name]
    if (form == "module" and module is not None) or function is None:
        return module()
    return Lambda(function)


# -- layers with parameters fxlra may or may not have rules for ----------------------------------
class Residual(nn.Module):
    def __init__(self, body, shortcut=None):
        super().__init__()
        self.body, self.shortcut = body, shortcut

    def forward(self, h):
        return self.body(h) + (h if self.shortcut is None else self.shortcut(h))


class BilinearSelf(nn.Module):
    def __init__(self, n, m):
        super().__init__()
        self.bilinear = nn.Bilinear(n, n, m)

    def forward(self, h):
        return self.bilinear(h, h)


class RawWeights(nn.Module):
    """Parameters used by functions: h @ w (features mixed) times a scale (elementwise)."""

    def __init__(self, n, m):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n, m) / n ** 0.5)
        self.scale = nn.Parameter(torch.ones(m))

    def forward(self, h):
        return (h @ self.w) * self.scale


class Gated(nn.Module):
    """Two Linears of one input multiplied: a(h) * sigmoid(b(h))."""

    def __init__(self, n, m):
        super().__init__()
        self.a, self.b = nn.Linear(n, m), nn.Linear(n, m)

    def forward(self, h):
        return self.a(h) * torch.sigmoid(self.b(h))


CONVS = {"plain": lambda f, c, bn: nn.Conv2d(f, c, 3, padding=1, bias=not bn),
         "strided": lambda f, c, bn: nn.Conv2d(f, c, 3, stride=2, padding=1, bias=not bn),
         "dilated": lambda f, c, bn: nn.Conv2d(f, c, 3, padding=2, dilation=2, bias=not bn),
         "same_reflect": lambda f, c, bn: nn.Conv2d(f, c, 3, padding="same",
                                                    padding_mode="reflect", bias=not bn),
         "depthwise": lambda f, c, bn: nn.Conv2d(f, f, 3, padding=1, groups=f, bias=not bn)}


class Buffered(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.register_buffer("mask", torch.linspace(0.5, 1.5, n))

    def forward(self, h):
        return h * self.mask


class Recurrent(nn.Module):
    """nn.LSTM / nn.GRU over tokens: keep the sequence, or (LSTM) take the last hidden state."""

    def __init__(self, kind, n, m, take):
        super().__init__()
        self.rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(n, m, batch_first=True)
        self.kind, self.take = kind, take

    def forward(self, h):
        out, state = self.rnn(h)
        if self.take == "sequence":
            return out
        return (state[0] if self.kind == "lstm" else state)[-1]


class Attention(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.att = nn.MultiheadAttention(n, 2, batch_first=True)

    def forward(self, h):
        return self.att(h, h, h)[0]


class TimeConv(nn.Module):
    def __init__(self, n, m):
        super().__init__()
        self.conv = nn.Conv1d(n, m, 3, padding=1)

    def forward(self, h):
        return self.conv(h.transpose(1, 2)).transpose(1, 2)


# -- untraceable layers (fine in eager mode) -----------------------------------------------------
class IfOnValue(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.lin = nn.Linear(n, n)

    def forward(self, h):
        if h.sum() > 0:
            return self.lin(h)
        return self.lin(-h)


class UsesLen(nn.Module):
    def forward(self, h):
        return h / len(h)


class IteratesRows(nn.Module):
    def forward(self, h):
        return torch.stack([row * 2 for row in h])


class NumpyCall(nn.Module):
    def forward(self, h):
        return h * float(np.mean(np.asarray(h.detach())))


UNTRACEABLE = {"if_on_value": IfOnValue, "len": UsesLen, "iterate": IteratesRows,
               "numpy": NumpyCall}


# -- layout transitions --------------------------------------------------------------------------
TO_VECTOR = {"image": {"flatten": lambda h: h.flatten(1), "gap": lambda h: h.mean((2, 3)),
                       "amax": lambda h: h.amax((2, 3)),
                       "adaptive": nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())},
             "tokens": {"flatten": lambda h: h.flatten(1), "mean": lambda h: h.mean(1),
                        "last": lambda h: h[:, -1]}}


def _vector_size(layout, shape, how):
    return math.prod(shape) if how == "flatten" else shape[-1] if layout == "tokens" else shape[0]


# -- building a model from its spec --------------------------------------------------------------
def _layer(op, layout, shape):
    """(module, new layout, new shape) of one spec entry, for the current layout and shape
    (shape without the batch axis)."""
    kind, args = op[0], op[1:]
    f = shape[-1] if layout != "image" else shape[0]
    if kind == "linear":                                  # vectors and tokens: the last axis
        n, act = args
        layers = [nn.Linear(f, n)] + ([activation(*act)] if act else [])
        return nn.Sequential(*layers), layout, shape[:-1] + (n,)
    if kind == "conv":
        c, bn, act, variant = args
        conv, size = CONVS[variant](f, c, bn), shape[1]
        if variant == "strided":
            c, size = c, (size + 1) // 2
        elif variant == "depthwise":
            c = f
        layers = [conv] + ([nn.BatchNorm2d(c)] if bn else []) + \
            ([activation(*act)] if act else [])
        return nn.Sequential(*layers), layout, (c, size, size)
    if kind == "gated":
        return Gated(f, args[0]), layout, shape[:-1] + (args[0],)
    if kind == "residual":
        act, project = args
        if layout == "image":
            body = nn.Sequential(nn.Conv2d(f, f, 3, padding=1), activation(*act),
                                 nn.Conv2d(f, f, 3, padding=1))
            shortcut = nn.Conv2d(f, f, 1) if project else None
        else:
            body = nn.Sequential(nn.Linear(f, f), activation(*act), nn.Linear(f, f))
            shortcut = nn.Linear(f, f) if project else None
        return Residual(body, shortcut), layout, shape
    if kind == "norm":
        norms = {"vector": lambda: nn.BatchNorm1d(f), "tokens": lambda: nn.LayerNorm(f),
                 "image": lambda: nn.GroupNorm(1, f) if args[0] else nn.BatchNorm2d(f)}
        return norms[layout](), layout, shape
    if kind == "act":
        return activation(*args[0]), layout, shape
    if kind == "unknown":
        return Lambda(UNKNOWN_OPS[args[0]]), layout, shape
    if kind == "dropout":
        return nn.Dropout(0.25), layout, shape
    if kind == "pool":
        pools = {"max": nn.MaxPool2d(2), "avg": nn.AvgPool2d(2),
                 "functional": Lambda(lambda h: F.max_pool2d(h, 2))}
        return pools[args[0]], layout, (f, shape[1] // 2, shape[2] // 2)
    if kind == "upsample":
        return nn.Upsample(scale_factor=2), layout, (f, shape[1] * 2, shape[2] * 2)
    if kind == "pixel_shuffle":
        return nn.PixelShuffle(2), layout, (f // 4, shape[1] * 2, shape[2] * 2)
    if kind == "conv_transpose":
        return nn.ConvTranspose2d(f, args[0], 2, stride=2), layout, \
            (args[0], shape[1] * 2, shape[2] * 2)
    if kind == "bilinear":
        return BilinearSelf(f, args[0]), layout, (args[0],)
    if kind == "raw_weights":
        return RawWeights(f, args[0]), layout, shape[:-1] + (args[0],)
    if kind == "buffer":
        return Buffered(f), layout, shape
    if kind == "recurrent":
        rnn, m, take = args
        new = ("tokens", shape[:-1] + (m,)) if take == "sequence" else ("vector", (m,))
        return Recurrent(rnn, f, m, take), *new
    if kind == "attention":
        return Attention(f), layout, shape
    if kind == "encoder":
        return nn.TransformerEncoderLayer(f, 2, 2 * f, dropout=0.0, batch_first=True), layout, \
            shape
    if kind == "time_conv":
        return TimeConv(f, args[0]), layout, shape[:-1] + (args[0],)
    if kind == "untraceable":
        module = UNTRACEABLE[args[0]]
        return (module(shape[-1]) if module is IfOnValue else module()), layout, shape
    if kind == "to_vector":
        how = args[0]
        fn = TO_VECTOR[layout][how]
        return (fn if isinstance(fn, nn.Module) else Lambda(fn)), "vector", \
            (_vector_size(layout, shape, how),)
    if kind == "to_tokens":
        if layout == "image":
            return Lambda(lambda h: h.flatten(2).transpose(1, 2)), "tokens", \
                (shape[1] * shape[2], f)
        return Lambda(lambda h: h.unsqueeze(1)), "tokens", (1, f)
    raise AssertionError(op)


INPUTS = {"vector": (6,), "image": (2, 4, 4), "tokens": (3, 4), "indices": (3,)}


class SpecNet(nn.Module):
    """stem (Embedding for integer inputs) -> layers -> head, from a spec dict (see ``specs``)."""

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        layout, shape = spec["input"], INPUTS[spec["input"]]
        self.embedding = None
        if layout == "indices":
            self.embedding = nn.Embedding(10, 4)
            layout, shape = "tokens", shape + (4,)
        layers = []
        for op in spec["layers"]:
            module, layout, shape = _layer(op, layout, shape)
            layers.append(module)
        self.layers = nn.Sequential(*layers)
        self.features = shape[-1] if layout != "image" else shape[0]
        self.classifier = nn.Linear(self.features, spec["classes"])
        aux = {"tuple": spec["classes"], "list": spec["classes"], "dict": spec["classes"],
               "narrow_aux": 1}.get(spec["head"])
        self.aux = nn.Linear(self.features, aux) if aux else None
        self.out_layout = layout

    def forward(self, x):
        h = x if self.embedding is None else self.embedding(x)
        h = self.layers(h)
        if self.out_layout == "image":
            h = h.movedim(1, -1)                         # the classifier reads channels
        return HEADS[self.spec["head"]](self, h, x)


HEADS = {
    "logits": lambda m, h, x: m.classifier(h),
    "tuple": lambda m, h, x: (m.classifier(h), m.aux(h)),
    "list": lambda m, h, x: [m.classifier(h), m.aux(h)],
    "dict": lambda m, h, x: {"logits": m.classifier(h), "aux": m.aux(h)},
    "narrow_aux": lambda m, h, x: (m.classifier(h), m.aux(h)),
    "with_shape": lambda m, h, x: (m.classifier(h), x.shape[0]),
    "with_argmax": lambda m, h, x: (lambda v: (v, v.argmax(-1)))(m.classifier(h)),
    "input_too": lambda m, h, x: (m.classifier(h), x),
    "squeezed": lambda m, h, x: m.classifier(h).sum(-1),
    "same_twice": lambda m, h, x: (lambda v: (v, v))(m.classifier(h)),
    "shared_layer": lambda m, h, x: m.classifier(h) + m.classifier(h),
}
# structural changes applied after building: name -> function(model)
MODIFIERS = {
    "none": lambda m: None,
    "freeze_one": lambda m: next(iter(m.layers.parameters()), torch.empty(0)).requires_grad_(False),
    "freeze_all": lambda m: m.requires_grad_(False),
    "unused": lambda m: m.add_module("unused", nn.Linear(2, 2)),
    "eval": lambda m: m.eval(),
}


# -- the fuzz family's strategies ----------------------------------------------------------------
spec_widths = st.integers(2, 6)
spec_acts = st.tuples(st.sampled_from(sorted(SPEC_ACTIVATIONS)),
                      st.sampled_from(["module", "function"]))
spec_maybe_act = st.one_of(st.none(), spec_acts)


def _layer_choices(layout, shape, untraceable):
    common = ["linear", "linear", "act", "unknown", "unknown", "residual", "norm", "raw_weights",
              "buffer", "dropout"] + (["untraceable"] if untraceable else [])
    common += ["gated"]
    if layout == "vector":
        return common + ["bilinear", "to_tokens"]
    if layout == "tokens":
        return common + ["recurrent", "attention", "encoder", "time_conv", "to_vector",
                         "to_vector"]
    small, channels = shape[1], shape[0]
    return ["conv", "conv", "residual", "norm", "act", "unknown", "dropout", "to_vector",
            "to_tokens", "conv_transpose"] + (["untraceable"] if untraceable else []) + \
        (["pool", "pool"] if small >= 2 else []) + (["upsample"] if small <= 4 else []) + \
        (["pixel_shuffle"] if channels % 4 == 0 and small <= 4 else [])


def _even(n):
    return n + n % 2


@st.composite
def layer_ops(draw, layout, shape, untraceable):
    kind = draw(st.sampled_from(_layer_choices(layout, shape, untraceable)))
    f = shape[-1] if layout != "image" else shape[0]
    if layout == "image" and kind == "linear":
        kind = "conv"
    if kind == "linear":
        return ("linear", draw(spec_widths), draw(spec_maybe_act))
    if kind == "conv":
        return ("conv", draw(spec_widths), draw(st.booleans()), draw(spec_maybe_act),
                draw(st.sampled_from(sorted(CONVS))))
    if kind == "residual":
        return ("residual", draw(spec_acts), draw(st.booleans()))
    if kind == "norm":
        return ("norm", draw(st.booleans()))
    if kind == "act":
        return ("act", draw(spec_acts))
    if kind == "unknown":
        return ("unknown", draw(st.sampled_from(sorted(UNKNOWN_OPS))))
    if kind == "pool":
        return ("pool", draw(st.sampled_from(["max", "avg", "functional"])))
    if kind in ("conv_transpose", "bilinear", "raw_weights", "time_conv", "gated"):
        return (kind, draw(spec_widths))
    if kind == "recurrent":
        rnn = draw(st.sampled_from(["lstm", "gru"]))
        return ("recurrent", rnn, draw(spec_widths), draw(st.sampled_from(["sequence", "state"])))
    if kind in ("attention", "encoder") and f % 2:
        return ("linear", _even(f), None)                # two heads need an even width
    if kind == "untraceable":
        return ("untraceable", draw(st.sampled_from(sorted(UNTRACEABLE))))
    if kind == "to_vector":
        return ("to_vector", draw(st.sampled_from(sorted(TO_VECTOR[layout]))))
    return (kind,)


def _mostly(choices, usual):
    """``usual`` half of the time (when it is a choice), else any of ``choices``."""
    if usual not in choices:
        return st.sampled_from(choices)
    return st.one_of(st.just(usual), st.sampled_from(choices))


@st.composite
def specs(draw, untraceable=True, heads=tuple(HEADS), modifiers=tuple(MODIFIERS)):
    start = draw(st.sampled_from(sorted(INPUTS)))
    layout, shape = ("tokens", (3, 4)) if start == "indices" else (start, INPUTS[start])
    layers = []
    for _ in range(draw(st.integers(1, 4))):
        op = draw(layer_ops(layout, shape, untraceable))
        _, layout, shape = _layer(op, layout, shape)     # only to follow the shapes
        layers.append(op)
    return {"input": start, "layers": tuple(layers), "classes": draw(st.integers(2, 4)),
            "head": draw(_mostly(heads, "logits")), "modify": draw(_mostly(modifiers, "none")),
            "seed": draw(st.integers(0, 2 ** 16))}


def build_spec_net(spec):
    torch.manual_seed(spec["seed"])
    model = SpecNet(spec).to(DTYPE)
    MODIFIERS[spec["modify"]](model)
    torch.manual_seed(spec["seed"] + 1)
    if spec["input"] == "indices":
        x = torch.randint(0, 10, (BATCH,) + INPUTS["indices"])
    else:
        x = torch.randn((BATCH,) + INPUTS[spec["input"]], dtype=DTYPE)
    return model, x
