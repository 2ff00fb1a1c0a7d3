"""fxlra.kernels: every Triton kernel equals its plain-torch ``*_ref`` (float32, small odd shapes:
on the CPU under Triton's interpreter, or on CUDA compiled when a GPU is present, plus bfloat16 and
float16 there), every ``*_ref`` equals fxlra's own computation (``rules.inner_error`` at the
activation's target, the ``PerturbativeConv2d`` forward, ``local.perturbative_grads``,
``rules.reproject_all``), and the launchers reject bad arguments with exact messages.

Triton chooses interpreter or compiler from ``TRITON_INTERPRET`` twice: when ``triton`` is first
imported (its own library functions, ``tl.sum``...) and when each ``@triton.jit`` kernel is
defined; importing fxlra imports Triton (through torch._dynamo). Without CUDA this module sets the
variable while it imports Triton and the kernel modules, before fxlra, then restores it. If an
earlier test module imported Triton without the variable, the kernels cannot be interpreted in
this process: then ``test_kernels_in_a_fresh_process`` runs this file in a new one and the other
tests skip.
"""
import contextlib
import functools
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from conftest import needs_cuda

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels"
CUDA = torch.cuda.is_available()
INTERPRET = not CUDA or os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
gpu = functools.partial(needs_cuda, when=INTERPRET)      # and no TRITON_INTERPRET=1
NAMES = ("target_error", "pseudo_conv", "reproject")

# one tolerance table: (rtol, atol) by case, with the reason
TOL = {
    "float32": (1e-5, 1e-5),      # same formulas; exp/erf/tanh and FMA differ by a few ulp
    "sum32": (1e-5, 1e-4),        # float32 sums over a few hundred terms, in another order
    "exact": (0.0, 0.0),          # the same torch ops in the same order
    "bfloat16": (1.6e-2, 1e-2),   # one rounding to bfloat16 of nearly equal float32 values
    "float16": (1e-3, 1e-3),      # likewise for float16
    "gemm16": (2e-2, 2e-2),       # float32 accumulation of 16-bit products, another order
}


def close(got, want, case, msg=None):
    rtol, atol = TOL[case]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=msg)


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


def kernels_package():
    """``fxlra.kernels``: as installed, or in a source checkout (``PYTHONPATH=.``) the kernels/
    folder registered under that name, as pyproject.toml maps it."""
    try:
        return importlib.import_module("fxlra.kernels")
    except ModuleNotFoundError:
        spec = importlib.util.spec_from_file_location(
            "fxlra.kernels", KERNELS / "__init__.py", submodule_search_locations=[str(KERNELS)])
        package = importlib.util.module_from_spec(spec)
        sys.modules["fxlra.kernels"] = package
        spec.loader.exec_module(package)
        import fxlra
        fxlra.kernels = package
        return package


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


def _load():
    """Import Triton and the kernel modules in this file's mode (TRITON_INTERPRET=1 without
    CUDA); False when Triton or a kernel module was already imported in the other mode."""
    with env("TRITON_INTERPRET", "1") if INTERPRET else contextlib.nullcontext():
        language = pytest.importorskip("triton.language")
        kernels_package()
        modules = {n: importlib.import_module(f"fxlra.kernels.{n}") for n in NAMES}
        snippets = [modules["target_error"].ACTIVATIONS["relu"].snippet]
        fresh = all(_interpreted(f) == INTERPRET for f in
                    [language.sum] + snippets + [_kernel_of(m) for m in modules.values()])
        if fresh and INTERPRET:
            _warm_up(*(modules[n] for n in NAMES))
    return fresh, modules


FRESH, MODULES = _load()                  # before fxlra is imported here: it imports Triton
TE, PC, RP = (MODULES[n] for n in NAMES)

from fxlra import local, registry, rules                         # noqa: E402
from fxlra.nn import PerturbativeConv2d                    # noqa: E402


@pytest.fixture(autouse=True)
def _setup(request):
    if not FRESH and request.node.originalname != "test_kernels_in_a_fresh_process":
        pytest.skip("Triton was imported without TRITON_INTERPRET=1 before this module; "
                    "test_kernels_in_a_fresh_process runs these tests")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.skipif(FRESH, reason="Triton was imported in this file's mode: tests run here")
def test_kernels_in_a_fresh_process():
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(Path(__file__))], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, TRITON_INTERPRET="1" if INTERPRET else "0"),
                         timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def expect_error(message, fn, *args, **kwargs):
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    assert str(info.value) == message


# == target and error =============================================================================
ALL_ACTIVATIONS = sorted(name for name, row in TE.ACTIVATIONS.items()   # prelu: its own test
                         if all(default is not None for _, default in row.params))
OPTIONS = dict(beta=0.3, alpha=0.7, kappa=1.3)
DTYPE_CASE = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def site(shape, name, seed=0, dtype=torch.float32, device=DEVICE):
    """h, z = phi(h) and a displacement d for one site."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(shape, generator=g)
    d = torch.randn(shape, generator=g)
    z = TE.ACTIVATIONS[name].torch_fn(h)
    return tuple(t.to(device=device, dtype=dtype) for t in (h, z, d))


def assert_matches_ref(h, z, d, name, case="float32", sum_case="sum32", **kw):
    y, e, sq = TE.target_and_error(h, z, d, name, **kw)
    yr, er, sqr = TE.target_and_error_ref(h, z, d, name, **kw)
    if kw.get("with_target", True):
        close(y, yr, case, msg=lambda m: f"{name} target: {m}")
    else:
        assert y is None and yr is None
    close(e, er, case, msg=lambda m: f"{name} error: {m}")
    close(sq, sqr, sum_case, msg=lambda m: f"{name} ||e||^2: {m}")
    assert e.dtype == h.dtype and sq.dtype == torch.float32 and sq.shape == (h.shape[0],)
    return y, e, sq


@pytest.mark.parametrize("name", ALL_ACTIVATIONS)
def test_target_and_error_equals_ref_for_every_activation(name):
    h, z, d = site((3, 5, 7, 9), name)        # 315 values per sample: no block divides it
    assert_matches_ref(h, z, d, name, **OPTIONS)


@pytest.mark.parametrize("alpha", [1.0, 0.0])
@pytest.mark.parametrize("name", ALL_ACTIVATIONS)
def test_a_nan_reaches_the_error_as_in_torch(name, alpha):
    """A NaN in h or in the displacement gives a NaN error where the reference (torch) has one,
    and a NaN ||e||^2 for that sample: the step's health check reads those sums (tl.maximum
    alone may drop a NaN; torch's sign maps it to 0, and so does the kernel's)."""
    h, z, d = site((3, 4, 5), name, seed=5)
    h[0, 1, 2] = float("nan")
    d[1, 3, 0] = float("nan")
    kw = dict(OPTIONS, alpha=alpha, recompute_z=True)
    _, e, sq = TE.target_and_error(h, z, d, name, **kw)
    _, er, sqr = TE.target_and_error_ref(h, z, d, name, **kw)
    assert torch.equal(torch.isnan(e), torch.isnan(er)), name
    assert torch.isnan(er).any() or name == "sign", name
    assert torch.equal(torch.isnan(sq), torch.isnan(sqr)), name
    keep = ~torch.isnan(er)
    close(e[keep], er[keep], "float32", msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("name", ["tanh", "relu", "identity"])
def test_recompute_z_forms_phi_of_h_instead_of_reading_z(name):
    """fxlra passes recompute_z=True: z is phi(h) in float32, whatever the z tensor holds."""
    h, z, d = site((3, 4, 5), name, seed=4)
    garbage = torch.full_like(z, 7.0)
    _, e, _ = assert_matches_ref(h, garbage, d, name, recompute_z=True, **OPTIONS)
    _, expected, _ = TE.target_and_error_ref(h, z, d, name, **OPTIONS)
    close(e, expected, "float32", msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("displacement", ["dense", "channel", "expanded"])
@pytest.mark.parametrize("name", ["tanh", "relu", "sign"])
def test_target_and_error_layouts_and_channel_synapses(channels_last, displacement, name):
    h, z, d = site((2, 6, 5, 3), name, seed=1)
    if displacement == "channel":
        d = d[:, :, 0, 0].contiguous()                                  # (B, C)
    elif displacement == "expanded":
        d = d[:, :, :1, :1].expand(h.shape)                             # what syn.place gives
    if channels_last:
        h, z = (t.contiguous(memory_format=torch.channels_last) for t in (h, z))
        if displacement == "dense":
            d = d.contiguous(memory_format=torch.channels_last)
    y, e, _ = assert_matches_ref(h, z, d, name, **OPTIONS)
    assert e.stride() == h.stride() and y.stride() == h.stride()


def test_target_and_error_mixed_layouts_vectors_and_tokens():
    h, z, d = site((2, 4, 3, 5), "silu", seed=2)
    cl = h.contiguous(memory_format=torch.channels_last)
    assert_matches_ref(cl, z, d, "silu", **OPTIONS)                     # z, d copied to h's
    assert_matches_ref(h.transpose(2, 3), z.transpose(2, 3), d.transpose(2, 3), "silu")
    h, z, d = site((4, 37), "tanh", seed=3)                             # an MLP site (B, F)
    assert_matches_ref(h, z, d, "tanh", **OPTIONS)
    h, z, d = site((2, 3, 6), "gelu", seed=4)                           # (B, T, D), channel last
    assert_matches_ref(h, z, d[:, 0, :].contiguous(), "gelu", channel_dim=2, **OPTIONS)


@pytest.mark.parametrize("name, params", [("leaky_relu", (0.2,)), ("hardtanh", (-0.5, 0.7)),
                                          ("elu", (0.5,)), ("celu", (2.0,)),
                                          ("softplus", (2.0, 1.5)), ("hardtanh", (-2.0,))])
def test_target_and_error_activation_parameters(name, params):
    h, z, d = site((2, 3, 4, 5), name, seed=5)
    assert_matches_ref(h, z, d, name, params=params, **OPTIONS)


def test_target_and_error_without_target_and_defaults():
    h, z, d = site((3, 2, 4, 4), "relu", seed=6)
    _, e_full, sq_full = TE.target_and_error(h, z, d, "relu", beta=0.2)
    y, e, sq = assert_matches_ref(h, z, d, "relu", beta=0.2, with_target=False)
    assert y is None and torch.equal(e, e_full) and torch.equal(sq, sq_full)
    # alpha = kappa = 1 (the defaults): e = z - y, as inner_error forms it
    _, e, _ = TE.target_and_error(h, z, d, "ReLU")
    close(e, rules.inner_error(z, F.relu(torch.sub(h, d, alpha=0.1)), 1.0, 1.0), "float32")


def _torch_activations():
    """fxlra's activation rows (registry): its torch modules and functions (not the ATen ops),
    plus parametrised ones, each as (target, call, extra args, kwargs)."""
    modules = [cls() for cls, row in registry.MODULES.items()
               if row.activation and cls.__module__.startswith("torch.")]
    modules += [nn.LeakyReLU(0.3), nn.ELU(0.4), nn.Hardtanh(-0.3, 0.6), nn.Softplus(2.0, 3.0),
                nn.GELU(approximate="tanh"), nn.CELU(1.5)]
    functions = [(fn, (), {}) for fn, row in registry.FUNCTIONS.items()
                 if row.activation and not isinstance(fn, torch._ops.OpOverloadPacket)
                 and (getattr(fn, "__module__", None) or "torch").split(".")[0] == "torch"]
    functions += [(F.leaky_relu, (0.2,), {}), (F.hardtanh, (), {"min_val": -2.0}),
                  (F.gelu, (), {"approximate": "tanh"}), (F.softplus, (3.0,), {"threshold": 4.0})]
    calls = [(m, lambda x, m=m: m(x), (), {}) for m in modules]
    calls += [(fn, lambda x, fn=fn, a=a, k=k: fn(x, *a, **k), a, k) for fn, a, k in functions]
    return calls


@torch.no_grad()
@pytest.mark.parametrize("target, call, args, kwargs", _torch_activations(),
                         ids=lambda v: getattr(v, "__name__", None) or (
                             type(v).__name__ if isinstance(v, nn.Module) else ""))
def test_kernel_table_covers_fxlras_activations_and_ref_equals_inner_error(target, call, args,
                                                                           kwargs):
    """Every torch activation fxlra makes a site resolves to a table row, by the site's name
    and by its call; the ref's target is the activation's own output at ``h - beta d`` and its
    error is ``rules.inner_error`` of it, bit for bit; the kernel agrees."""
    label = getattr(target, "__name__", type(target).__name__)
    assert TE.ALIASES.get(label, label) in TE.ACTIVATIONS       # the name fxlra gives the site
    h, _, d = site((2, 3, 4, 5), "identity", seed=7, device="cpu")
    found = TE.activation_of(target, (h,) + args, kwargs)
    assert found is not None, f"{label} has no kernel snippet"
    name, params = found
    z = call(h)
    target_fxlra = call(torch.sub(h, d, alpha=0.3))
    for alpha, kappa in ((1.0, 1.0), (0.7, 1.3)):
        y, e, _ = TE.target_and_error_ref(h, z, d, name, params=params, beta=0.3, alpha=alpha,
                                          kappa=kappa)
        close(y, target_fxlra, "exact")
        close(e, rules.inner_error(z, target_fxlra, alpha, kappa), "exact")
    hd, zd, dd = (t.to(DEVICE) for t in (h, z, d))
    params = tuple(p.to(DEVICE) if isinstance(p, torch.Tensor) else p for p in params)
    got, _, _ = TE.target_and_error(hd, zd, dd, name, params=params, beta=0.3)
    close(got.cpu(), target_fxlra, "float32")


def test_activation_of_methods_and_unsupported_calls():
    h = torch.randn(2, 3)
    for method in ("relu", "tanh", "sigmoid", "sign"):
        assert TE.activation_of(method, (h,)) == (method, ())
    assert TE.activation_of(nn.Linear(2, 2)) is None

    class Shifted(nn.ReLU):                                     # a subclass may change forward
        def forward(self, x):
            return super().forward(x - 1)
    assert TE.activation_of(Shifted()) is None
    assert TE.activation_of(torch.cos, (h,)) is None
    assert TE.activation_of("cos", (h,)) is None
    assert TE.activation_of(nn.GELU(approximate="tanh")) == ("gelu_tanh", ())
    assert TE.activation_of(F.leaky_relu, (h, 0.2, True)) == ("leaky_relu", (0.2,))


def test_squared_error_sums_give_fxlras_discrepancy():
    h, z, d = site((4, 3, 5, 5), "tanh", seed=8)
    _, e, sq = TE.target_and_error(h, z, d, "tanh", **OPTIONS)
    norm = torch.stack(torch._foreach_norm([e]))[0]              # what prog.step reports
    close(sq.sum() / 4, norm * norm / 4, "sum32")


@pytest.mark.parametrize("slopes", [1, 6])
def test_prelu_reads_its_learned_slopes_at_every_call(slopes):
    h, z, d = site((2, 6, 3, 5), "identity", seed=10)
    prelu = nn.PReLU(slopes).to(DEVICE)
    with torch.no_grad():
        prelu.weight.copy_(torch.linspace(-0.5, 0.5, slopes))
    name, params = TE.activation_of(prelu)
    assert name == "prelu" and params[0] is prelu.weight
    z = prelu(h).detach()
    assert_matches_ref(h, z, d, name, params=params, **OPTIONS)
    for layout in ("channels_last", "channel d"):
        hh, zz, dd = h, z, d
        if layout == "channels_last":
            hh, zz = (t.contiguous(memory_format=torch.channels_last) for t in (h, z))
        else:
            dd = d[:, :, 0, 0].contiguous()
        assert_matches_ref(hh, zz, dd, name, params=params, **OPTIONS)
    with torch.no_grad():
        prelu.weight.mul_(2)                                    # an optimizer step
    y, _, _ = TE.target_and_error(h, z, d, name, params=params, beta=0.3)
    close(y, prelu(torch.sub(h, d, alpha=0.3)).detach(), "float32")
    expect_error("target_and_error: params[0] has shape (4,); expected 1 or 6 values (one per "
                 "channel of h)", TE.target_and_error, h, z, d, "prelu",
                 params=(torch.ones(4, device=DEVICE),))
    expect_error("target_and_error: params[0] has type float; expected a tensor (prelu's "
                 "weight: one value or one per channel)", TE.target_and_error, h, z, d,
                 "prelu", params=(0.25,))


def test_target_and_error_rejects_bad_arguments():
    h, z, d = site((2, 3, 4, 4), "relu")
    where = "target_and_error: "
    expect_error(where + "z has shape (2, 3, 4); expected (2, 3, 4, 4) (the shape of h)",
                 TE.target_and_error, h, z[..., 0], d, "relu")
    expect_error(where + "z has dtype float16; expected float32 (the dtype of h)",
                 TE.target_and_error, h, z.half(), d, "relu")
    expect_error(where + "h has dtype int64; expected one of float32, bfloat16, float16",
                 TE.target_and_error, h.long(), z, d, "relu")
    expect_error(where + "d has shape (2, 4); expected (2, 3, 4, 4) or (2, 3) (one value per "
                 "sample and channel)", TE.target_and_error, h, z, d[:, 0, 0, :], "relu")
    expect_error(where + f"d has device meta; expected {h.device} (the device of h)",
                 TE.target_and_error, h, z, d.to("meta"), "relu")
    expect_error(where + "d has type list; expected a torch.Tensor",
                 TE.target_and_error, h, z, [1.0], "relu")
    with pytest.raises(ValueError) as info:
        TE.target_and_error(h, z, d, "swish")
    assert str(info.value).startswith(where + "activation 'swish' is not supported; expected "
                                      "one of celu, elu, gelu, gelu_tanh, hardsigmoid,")
    expect_error(where + "params has length 2; expected at most 1 for leaky_relu "
                 "(negative_slope)", TE.target_and_error, h, z, d, "leaky_relu",
                 params=(0.1, 0.2))
    # what a compiled kernel says to CPU tensors
    expect_error(where + "h has device cpu; expected a CUDA device (CPU tensors run only under "
                 "the Triton interpreter: set TRITON_INTERPRET=1 before fxlra.kernels is "
                 "imported)", TE.check.device, "target_and_error", "h", h.cpu())


# == pseudo-convolution ===========================================================================
def layer_and_input(c_in, c_out, nmasks, size, bias, stride=1, batch=2, seed=0, device=DEVICE):
    torch.manual_seed(seed)
    m = PerturbativeConv2d(c_in, c_out, nmasks, level=0.5, stride=stride, seed=seed, bias=bias)
    return m.to(device), torch.randn(batch, c_in, *size).to(device)


CASES = [  # c_in, c_out, nmasks, (H, W), bias: odd sizes, K = c_in * nmasks around BLOCK_K = 16
    (5, 7, 1, (9, 11), False),
    (9, 19, 2, (5, 7), True),
    (3, 4, 3, (6, 5), False),
]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("c_in, c_out, nmasks, size, bias", CASES)
def test_pseudo_conv_forward_equals_ref(c_in, c_out, nmasks, size, bias, channels_last):
    m, x = layer_and_input(c_in, c_out, nmasks, size, bias)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x, noise = PC.pseudo_conv_inputs(m, x)
    assert not noise.is_contiguous()                 # a crop of the stored field: strided
    got = PC.pseudo_conv_forward(x, noise, m.weight, nmasks, m.bias)
    want = PC.pseudo_conv_forward_ref(x, noise, m.weight, nmasks, m.bias)
    close(got, want, "sum32")
    assert got.stride() == want.stride() and got.dtype == x.dtype
    if channels_last:
        assert got.is_contiguous(memory_format=torch.channels_last)


def test_pseudo_conv_forward_keeps_a_nan_input():
    """relu(x + noise) of a NaN is NaN, as in the materialised layer: the output channels at
    that position are NaN, the others equal the reference."""
    m, x = layer_and_input(*CASES[0])
    x[1, 0, 2, 3] = float("nan")
    x, noise = PC.pseudo_conv_inputs(m, x)
    got = PC.pseudo_conv_forward(x, noise, m.weight, CASES[0][2], m.bias)
    want = PC.pseudo_conv_forward_ref(x, noise, m.weight, CASES[0][2], m.bias)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(want).any()
    keep = ~torch.isnan(want)
    close(got[keep], want[keep], "sum32")


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("c_in, c_out, nmasks, size, bias", CASES)
def test_pseudo_conv_update_equals_ref(c_in, c_out, nmasks, size, bias, channels_last, split):
    m, x = layer_and_input(c_in, c_out, nmasks, size, bias, seed=1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x, noise = PC.pseudo_conv_inputs(m, x)
    e = torch.randn(x.shape[0], c_out, *x.shape[2:], device=DEVICE)
    if channels_last:
        e = e.contiguous(memory_format=torch.channels_last)
    scale = 1.0 / x.shape[0]
    dw, db = PC.pseudo_conv_update(x, noise, e, nmasks, bias=bias, scale=scale,
                                   config={"SPLIT": split})
    dw_ref, db_ref = PC.pseudo_conv_update_ref(x, noise, e, nmasks, bias=bias, scale=scale)
    assert dw.shape == m.weight.shape and dw.dtype == torch.float32
    close(dw, dw_ref, "sum32")
    if bias:
        close(db, db_ref, "sum32")
    else:
        assert db is None and db_ref is None


def test_pseudo_conv_tiles_span_several_blocks():
    """More output channels, positions and perturbed channels than one tile holds."""
    m, x = layer_and_input(6, 33, 3, (7, 5), True, seed=2)           # O=33, K=18, P=35
    x, noise = PC.pseudo_conv_inputs(m, x)
    close(PC.pseudo_conv_forward(x, noise, m.weight, 3, m.bias),
          PC.pseudo_conv_forward_ref(x, noise, m.weight, 3, m.bias), "sum32")
    e = torch.randn(2, 33, 7, 5, device=DEVICE)
    for got, want in zip(PC.pseudo_conv_update(x, noise, e, 3, bias=True),
                         PC.pseudo_conv_update_ref(x, noise, e, 3, bias=True)):
        close(got, want, "sum32")


@pytest.mark.parametrize("stride, bias", [(1, False), (2, True)])
def test_pseudo_conv_refs_equal_the_layer_and_its_rule(stride, bias):
    m, x = layer_and_input(4, 6, 2, (9, 7), bias, stride=stride, seed=3, device="cpu")
    xp, noise = PC.pseudo_conv_inputs(m, x)
    layer = m(x).detach()
    close(PC.pseudo_conv_forward_ref(xp, noise, m.weight, 2, m.bias), layer, "sum32")
    c = torch.randn(2, 6, *xp.shape[2:])
    rule = local.perturbative_grads(m, x, c)
    dw, db = PC.pseudo_conv_update_ref(xp, noise, c, 2, bias=bias)
    close(dw, rule["weight"], "sum32")
    if bias:
        close(db, rule["bias"], "sum32")
    # the layer-level forms, through the kernels
    m, x, c = m.to(DEVICE), x.to(DEVICE), c.to(DEVICE)
    close(PC.perturbative_forward(m, x).cpu(), layer, "sum32")
    fused = PC.perturbative_grads(m, x, c)
    assert fused.keys() == rule.keys()
    for key in rule:
        close(fused[key].cpu(), rule[key], "sum32")


def test_pseudo_conv_rejects_bad_arguments():
    m, x = layer_and_input(3, 4, 2, (5, 5), False)
    x, noise = PC.pseudo_conv_inputs(m, x)
    fwd, upd = "pseudo_conv_forward: ", "pseudo_conv_update: "
    e = torch.randn(2, 4, 5, 5, device=DEVICE)
    expect_error(fwd + "x has shape (2, 3, 25); expected 4 dimensions (B, C, H, W)",
                 PC.pseudo_conv_forward, x.flatten(2), noise, m.weight, 2)
    expect_error(fwd + "noise has shape (3, 5, 5); expected (6, 5, 5) ((C * nmasks, H, W) for "
                 "x of shape (2, 3, 5, 5) and nmasks=2)",
                 PC.pseudo_conv_forward, x, noise[:3], m.weight, 2)
    expect_error(fwd + "weight has shape (4, 3); expected (O, 6, 1, 1) or (O, 6): C * nmasks "
                 "input channels", PC.pseudo_conv_forward, x, noise, m.weight[:, :3, 0, 0], 2)
    expect_error(fwd + "nmasks has value 0; expected an int >= 1",
                 PC.pseudo_conv_forward, x, noise, m.weight, 0)
    expect_error(fwd + "bias has shape (3,); expected (4,) ((O,) for weight of O outputs)",
                 PC.pseudo_conv_forward, x, noise, m.weight, 2, torch.zeros(3, device=DEVICE))
    expect_error(upd + "e has dtype float16; expected float32 (the dtype of x)",
                 PC.pseudo_conv_update, x, noise, e.half(), 2)
    expect_error(upd + "e has shape (2, 4, 5, 4); expected (2, O, 5, 5): x's batch and spatial "
                 "size", PC.pseudo_conv_update, x, noise, e[..., :4], 2)
    expect_error(upd + f"noise has device meta; expected {x.device} (the device of x)",
                 PC.pseudo_conv_update, x, noise.to("meta"), e, 2)
    expect_error(upd + "config has keys ['BLOCK_Q']; expected some of ['BLOCK_K', 'BLOCK_O', "
                 "'BLOCK_P', 'SPLIT', 'num_stages', 'num_warps']",
                 PC.pseudo_conv_update, x, noise, e, 2, config={"BLOCK_Q": 16})


# == re-projection ================================================================================
def updates_list(device=DEVICE):
    g = torch.Generator().manual_seed(9)
    made = [torch.randn(3000, generator=g),                             # several chunks
            torch.zeros(5, 5),                                          # zero norm: kept
            (torch.randn(7, 3, 3, 3, generator=g) * 0.01).contiguous(
                memory_format=torch.channels_last),                     # below clip: kept
            torch.randn(40, 30, generator=g).t(),                       # transposed, dense
            torch.randn(1, generator=g) * 3,
            torch.randn(0)]
    return [t.to(device) for t in made]


def test_reproject_equals_ref_and_fxlras_reproject_all():
    originals = updates_list()
    got, want, fxlra_way = ([t.clone() for t in originals] for _ in range(3))
    assert RP.reproject_(got, 1.0) is got
    RP.reproject_ref(want, 1.0)
    rules.reproject_all(fxlra_way, 1.0)
    for k, (a, b, c, o) in enumerate(zip(got, want, fxlra_way, originals)):
        close(a, b, "float32", msg=lambda m: f"updates[{k}]: {m}")
        close(b, c, "float32", msg=lambda m: f"ref vs rules, updates[{k}]: {m}")
        assert a.stride() == o.stride()
        if o.numel() == 0 or o.norm() <= 1.0:
            assert torch.equal(a, o), f"updates[{k}] has norm <= clip and must not change"
        else:
            close(a.norm(), torch.tensor(1.0, device=DEVICE), "float32")


def test_norms_given_or_computed_by_the_kernel_agree_with_foreach_norm():
    originals = [t for t in updates_list() if t.numel()]
    norms = RP.frobenius_norms(originals)
    close(norms, torch.stack(torch._foreach_norm(originals)), "float32")
    close(RP.frobenius_norms_ref(originals), norms, "float32")
    got, want, fxlra_way = ([t.clone() for t in originals] for _ in range(3))
    RP.reproject_(got, 0.8, norms)
    RP.reproject_ref(want, 0.8, norms)
    rules.reproject_all(fxlra_way, 0.8, norms)
    for a, b, c in zip(got, want, fxlra_way):
        close(a, b, "float32")
        close(a, c, "float32")
    expect_error("reproject_: norms has shape (2,); expected (5,) (one norm per update)",
                 RP.reproject_, got, 1.0, norms[:2])
    assert RP.frobenius_norms([]).numel() == 0


def test_reproject_chunks_dtypes_and_repeated_calls():
    first = [t.to(DEVICE) for t in (torch.randn(700) * 2, torch.randn(33, 3).bfloat16() * 5,
                                    torch.randn(9).half())]
    for chunk, block in ((256, 64), (None, None)):
        got, want = [t.clone() for t in first], [t.clone() for t in first]
        RP.reproject_(got, 0.5, chunk=chunk, block=block)
        RP.reproject_(got, 0.5, chunk=chunk, block=block)        # cached tables; changes nothing
        RP.reproject_ref(want, 0.5)
        close(got[0], want[0], "float32")
        close(got[1], want[1], "bfloat16")
        close(got[2], want[2], "float16")
    for updates in ([], [torch.randn(3, device=DEVICE)]):
        copy = [t.clone() for t in updates]
        assert RP.reproject_(copy, None) is copy
        assert all(torch.equal(a, b) for a, b in zip(copy, updates))
    assert RP.reproject_([], 1.0) == [] and rules.reproject_all([], 1.0) == []


def test_reproject_rejects_bad_arguments():
    where = "reproject_: "
    t = torch.randn(4, 6, device=DEVICE)
    expect_error(where + "updates[1] has strides (6, 2); expected a dense tensor of shape "
                 "(4, 3) (contiguous in some order of its dims); pass t.contiguous()",
                 RP.reproject_, [t, t[:, ::2]], 1.0)
    expect_error(where + "updates[0] has dtype int64; expected one of float32, bfloat16, "
                 "float16", RP.reproject_, [t.long()], 1.0)
    expect_error(where + f"updates[1] has device meta; expected {t.device} (the device of "
                 "updates[0])", RP.reproject_, [t, t.to("meta")], 1.0)
    expect_error(where + "clip has value -1.0; expected a positive number or None",
                 RP.reproject_, [t], -1.0)


# == the package ==================================================================================
def test_package_exports_lazily_and_available_follows_the_environment(monkeypatch):
    package = kernels_package()
    assert package.target_and_error is TE.target_and_error
    assert package.reproject_.__name__ == "reproject_"
    with pytest.raises(AttributeError):
        package.no_such_kernel
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert package.available("cpu") and package.available(torch.zeros(1))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not package.available("cpu")
    assert package.available("cuda") == CUDA


def test_fxlra_and_its_kernels_package_import_without_triton():
    """With Triton missing, fxlra and fxlra.kernels import, ``available`` says no, and only a
    kernel name fails, naming Triton."""
    code = ("import sys\n"
            "sys.modules['triton'] = None\n"                 # as if it were not installed
            "import importlib.util, fxlra\n"
            "spec = importlib.util.spec_from_file_location('fxlra.kernels', "
            f"{str(KERNELS / '__init__.py')!r}, submodule_search_locations=[{str(KERNELS)!r}])\n"
            "k = importlib.util.module_from_spec(spec)\n"
            "sys.modules['fxlra.kernels'] = k\n"
            "spec.loader.exec_module(k)\n"
            "assert not k.available('cpu') and not k.available('cuda')\n"
            "try:\n"
            "    k.target_and_error\n"
            "except ImportError as exc:\n"
            "    assert 'triton' in str(exc), exc\n"
            "else:\n"
            "    raise AssertionError('a kernel loaded without triton')\n")
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
                         timeout=300)
    assert out.returncode == 0, out.stderr


# == Hopper code generation without a GPU ==========================================================
def _compile_for_hopper(root):
    """Run in a fresh process (no TRITON_INTERPRET): every launcher call below goes through its
    checks and argument set-up, and instead of launching, its kernel is compiled for sm_90 with
    Triton's own compiler and ptxas, with the alignment hints a launch gives (pointers and
    integers divisible by 16). Prints one line per kernel: name, shared bytes, wgmma, integer
    divisions, 16-byte vector loads."""
    import importlib.util
    import re
    import sys
    sys.path.insert(0, root)
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    __import__("fxlra")                                  # the parent of fxlra.kernels
    spec = importlib.util.spec_from_file_location(
        "fxlra.kernels", f"{root}/kernels/__init__.py",
        submodule_search_locations=[f"{root}/kernels"])
    package = importlib.util.module_from_spec(spec)
    sys.modules["fxlra.kernels"] = package
    spec.loader.exec_module(package)
    from fxlra.kernels import _checks, pseudo_conv as pc, reproject as rp, target_error as te
    _checks.device = lambda *args, **kwargs: None          # CPU tensors stand in for CUDA ones
    torch.cuda.get_device_properties = lambda _: type("P", (), {"multi_processor_count": 132})
    types = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
             torch.int64: "i64", torch.int32: "i32"}

    class Compile:
        def __init__(self, jit):
            self.jit = jit

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
                bound = dict(zip(self.jit.arg_names, args), **kwargs)
                signature, constants, attrs = {}, {}, {}
                for k, (param, name) in enumerate(zip(self.jit.params, self.jit.arg_names)):
                    value = bound[name]
                    if param.is_constexpr:
                        signature[name], constants[name] = "constexpr", value
                    elif isinstance(value, torch.Tensor):
                        signature[name] = "*" + types[value.dtype]
                    elif isinstance(value, float):
                        signature[name] = "fp32"
                    else:
                        signature[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
                    if not param.is_constexpr and (isinstance(value, torch.Tensor) or (
                            type(value) is int and value and value % 16 == 0)):
                        attrs[(k,)] = [["tt.divisibility", 16]]
                kernel = triton.compile(ASTSource(self.jit, signature, constants, attrs),
                                        target=GPUTarget("cuda", 90, 32), options=options)
                ptx = kernel.asm["ptx"]
                print(self.jit.__name__, kernel.metadata.shared, "wgmma" in ptx,
                      len(re.findall(r"\b(?:div|rem)\.[su](?:32|64)", ptx)),
                      "ld.global.v4" in ptx)
            return run

    for module, names in ((te, ["_target_error_kernel"]), (pc, ["_forward_kernel",
                                                                 "_update_kernel"]),
                          (rp, ["_sum_squares_kernel", "_scale_kernel"])):
        for name in names:
            setattr(module, name, Compile(getattr(module, name)))
    cl = torch.channels_last
    for dtype in (torch.bfloat16, torch.float32):
        h = torch.randn(4, 64, 14, 14, dtype=dtype).contiguous(memory_format=cl)
        te.target_and_error(h, h, h, "gelu")
        te.target_and_error(h, h, h[:, :, 0, 0].contiguous(), "tanh", with_target=False)
        te.target_and_error(h, h, h, "prelu", params=(torch.ones(64),))
        noise = torch.randn(128, 16, 16)[:, :14, :14]
        pc.pseudo_conv_forward(h, noise, torch.randn(64, 128), 2, torch.zeros(64))
        pc.pseudo_conv_update(h, noise, h, 2, bias=True)
        rp.reproject_([torch.randn(5000, dtype=dtype)], 1.0)


@pytest.mark.skipif(CUDA, reason="on a CUDA machine the GPU tests compile the kernels for real")
def test_kernels_compile_for_hopper_without_a_gpu():
    """Every kernel lowers to sm_90 machine code (ptxas included), the bfloat16 GEMMs on wgmma,
    and no kernel asks for more shared memory than an H100/H200 block has (227 KiB). The
    target/error kernel, which must stream at copy bandwidth, loads 16 bytes per instruction;
    neither it nor the pseudo-convolution update's inner loop has an integer division left
    (channels and positions come from constants)."""
    pytest.importorskip("triton.backends.compiler")
    import inspect
    code = inspect.getsource(_compile_for_hopper) + f"\n_compile_for_hopper({str(ROOT)!r})\n"
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(environ, OMP_NUM_THREADS="1"), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.splitlines()]
    assert len(rows) == 2 * 7, out.stdout
    for k, (name, shared, wgmma, divisions, vector_loads) in enumerate(rows):
        assert int(shared) <= 227 * 1024, f"{name} needs {shared} bytes of shared memory"
        if name in ("_target_error_kernel", "_update_kernel"):      # divisions per element
            assert divisions == "0", rows[k]                      # or per inner-loop step
        if name == "_target_error_kernel":
            assert vector_loads == "True", rows[k]
        if k < 7 and name in ("_forward_kernel", "_update_kernel"):     # bfloat16 (float32
            assert wgmma == "True", f"{name} does not use wgmma"       # dots are IEEE FMAs)


# == CUDA: compiled kernels in 16-bit dtypes ======================================================
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["relu", "tanh", "gelu", "silu", "sigmoid", "sign",
                                  "leaky_relu", "identity"])
def test_target_and_error_in_16_bits_on_cuda(name, dtype):
    h, z, d = site((8, 64, 14, 14), name, dtype=dtype)
    h, z, d = (t.contiguous(memory_format=torch.channels_last) for t in (h, z, d))
    assert_matches_ref(h, z, d, name, case=DTYPE_CASE[dtype], sum_case="gemm16", beta=0.3)
    assert_matches_ref(h, z, d[:, :, 0, 0].contiguous(), name, case=DTYPE_CASE[dtype],
                       sum_case="gemm16", beta=0.3, alpha=0.8, kappa=1.2)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nmasks", [1, 2])
def test_pseudo_conv_in_16_bits_on_cuda(dtype, nmasks):
    m, x = layer_and_input(64, 96, nmasks, (14, 14), True, batch=8, seed=4)
    x = x.to(dtype).contiguous(memory_format=torch.channels_last)
    x, noise = PC.pseudo_conv_inputs(m, x)
    close(PC.pseudo_conv_forward(x, noise, m.weight, nmasks, m.bias),
          PC.pseudo_conv_forward_ref(x, noise, m.weight, nmasks, m.bias), "gemm16")
    e = torch.randn(8, 96, 14, 14, device=DEVICE).to(dtype)
    for got, want in zip(PC.pseudo_conv_update(x, noise, e, nmasks, bias=True, scale=1 / 8),
                         PC.pseudo_conv_update_ref(x, noise, e, nmasks, bias=True, scale=1 / 8)):
        close(got, want, "gemm16")


@gpu
def test_reproject_in_16_bits_on_cuda():
    updates = [torch.randn(100_000, device=DEVICE).bfloat16(),
               torch.randn(64, 64, 3, 3, device=DEVICE).half(), torch.randn(10, device=DEVICE)]
    got, want = [t.clone() for t in updates], [t.clone() for t in updates]
    RP.reproject_(got, 1.0)
    RP.reproject_ref(want, 1.0)
    for a, b in zip(got, want):
        close(a, b, DTYPE_CASE[a.dtype])
