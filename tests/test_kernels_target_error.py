"""The fused target/error kernel (kernels/target_error.py) equals its plain-torch
``target_and_error_ref`` (float32, small odd shapes: on the CPU under Triton's interpreter, or on
CUDA compiled when a GPU is present, plus bfloat16 and float16 there), in every layout and with
channel displacements, NaNs and activation parameters, and its launcher rejects bad arguments with
exact messages. The Triton set-up is tests/conftest.py's."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fxlra import rules
from conftest import KERNEL_DEVICE as DEVICE
from conftest import expect_error, kernel_gpu, kernel_modules
from conftest import kernel_site as site
from helpers import close
from tolerances import KERNEL_DTYPE_TOLERANCE

TE, PC, RP = kernel_modules()
pytestmark = pytest.mark.usefixtures("kernel_setup")


ALL_ACTIVATIONS = sorted(name for name, row in TE.ACTIVATIONS.items()   # prelu: its own test
                         if all(default is not None for _, default in row.params))
OPTIONS = dict(beta=0.3, alpha=0.7, kappa=1.3)


def assert_matches_ref(h, z, d, name, case="kernel_float32", sum_case="kernel_sum32", **kw):
    y, e, sq = TE.target_and_error(h, z, d, name, **kw)
    yr, er, sqr = TE.target_and_error_ref(h, z, d, name, **kw)
    if kw.get("with_target", True):
        close(y, yr, case, f"{name} target")
    else:
        assert y is None and yr is None
    close(e, er, case, f"{name} error")
    close(sq, sqr, sum_case, f"{name} ||e||^2")
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
    close(e[keep], er[keep], "kernel_float32", f"{name}")


@pytest.mark.parametrize("name", ["tanh", "relu", "identity"])
def test_recompute_z_forms_phi_of_h_instead_of_reading_z(name):
    """fxlra passes recompute_z=True: z is phi(h) in float32, whatever the z tensor holds."""
    h, z, d = site((3, 4, 5), name, seed=4)
    garbage = torch.full_like(z, 7.0)
    _, e, _ = assert_matches_ref(h, garbage, d, name, recompute_z=True, **OPTIONS)
    _, expected, _ = TE.target_and_error_ref(h, z, d, name, **OPTIONS)
    close(e, expected, "kernel_float32", f"{name}")


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
    close(e, rules.inner_error(z, F.relu(torch.sub(h, d, alpha=0.1)), 1.0, 1.0), "kernel_float32")


def test_squared_error_sums_give_fxlras_discrepancy():
    h, z, d = site((4, 3, 5, 5), "tanh", seed=8)
    _, e, sq = TE.target_and_error(h, z, d, "tanh", **OPTIONS)
    norm = torch.stack(torch._foreach_norm([e]))[0]              # what prog.step reports
    close(sq.sum() / 4, norm * norm / 4, "kernel_sum32")


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
    close(y, prelu(torch.sub(h, d, alpha=0.3)).detach(), "kernel_float32")
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


# == CUDA: compiled in 16-bit dtypes ===============================================================
@kernel_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["relu", "tanh", "gelu", "silu", "sigmoid", "sign",
                                  "leaky_relu", "identity"])
def test_target_and_error_in_16_bits_on_cuda(name, dtype):
    h, z, d = site((8, 64, 14, 14), name, dtype=dtype)
    h, z, d = (t.contiguous(memory_format=torch.channels_last) for t in (h, z, d))
    case = KERNEL_DTYPE_TOLERANCE[dtype]
    assert_matches_ref(h, z, d, name, case=case, sum_case="kernel_gemm16", beta=0.3)
    assert_matches_ref(h, z, d[:, :, 0, 0].contiguous(), name, case=case,
                       sum_case="kernel_gemm16", beta=0.3, alpha=0.8, kappa=1.2)


RESNET18_STAGES = [(64, 56), (128, 28), (256, 14), (512, 7)]          # channels, size


@kernel_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("channels, size", RESNET18_STAGES)
def test_target_and_error_at_resnet18_stage_shapes_on_cuda(channels, size, dtype):
    """The shapes benchmarks/gpu.py times (batch 4, channels_last, dense and channel
    displacements): the kernel on the GPU against the reference on the CPU from the same rounded
    inputs, within a share of the largest entry."""
    row = {torch.bfloat16: "kernel_stage_bfloat16", torch.float32: "kernel_stage_float32"}[dtype]
    gen = torch.Generator().manual_seed(0)
    h, d = (torch.randn(4, channels, size, size, generator=gen).to(dtype) for _ in range(2))
    for name in ("relu", "tanh", "gelu", "silu", "sigmoid", "sign", "leaky_relu"):
        z = TE.ACTIVATIONS[name].torch_fn(h.float()).to(dtype)
        on = [t.cuda().contiguous(memory_format=torch.channels_last) for t in (h, z, d)]
        for kind, dd in (("dense", on[2]), ("channel", on[2][:, :, 0, 0].contiguous())):
            got = TE.target_and_error(*on[:2], dd, name, beta=0.3, alpha=0.8, kappa=1.2)
            want = TE.target_and_error_ref(h, z, dd.cpu(), name, beta=0.3, alpha=0.8, kappa=1.2)
            for part, g, w in zip(("y", "e", "sq"), got, want):
                close(g.float().cpu(), w.float(), row, f"{name} {kind} d, {part}")
