"""The fused pseudo-convolution kernels (kernels/pseudo_conv.py): forward and weight update equal
their plain-torch references (float32, odd shapes, channels_last, tiles spanning several blocks,
NaN inputs; 16-bit dtypes on CUDA), the references equal ``PerturbativeConv2d`` and
``local.perturbative_grads``, and the launchers reject bad arguments with exact messages. The
Triton set-up is tests/conftest.py's."""
import pytest
import torch

from fxlra.ops import local
from fxlra.nn import PerturbativeConv2d
from conftest import KERNEL_DEVICE as DEVICE
from conftest import expect_error, kernel_gpu, kernel_modules
from helpers import close

TE, PC, RP = kernel_modules()
pytestmark = pytest.mark.usefixtures("kernel_setup")


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
    close(got, want, "kernel_sum32")
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
    close(got[keep], want[keep], "kernel_sum32")


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
    close(dw, dw_ref, "kernel_sum32")
    if bias:
        close(db, db_ref, "kernel_sum32")
    else:
        assert db is None and db_ref is None


def test_pseudo_conv_tiles_span_several_blocks():
    """More output channels, positions and perturbed channels than one tile holds."""
    m, x = layer_and_input(6, 33, 3, (7, 5), True, seed=2)           # O=33, K=18, P=35
    x, noise = PC.pseudo_conv_inputs(m, x)
    close(PC.pseudo_conv_forward(x, noise, m.weight, 3, m.bias),
          PC.pseudo_conv_forward_ref(x, noise, m.weight, 3, m.bias), "kernel_sum32")
    e = torch.randn(2, 33, 7, 5, device=DEVICE)
    for got, want in zip(PC.pseudo_conv_update(x, noise, e, 3, bias=True),
                         PC.pseudo_conv_update_ref(x, noise, e, 3, bias=True)):
        close(got, want, "kernel_sum32")


@pytest.mark.parametrize("stride, bias", [(1, False), (2, True)])
def test_pseudo_conv_refs_equal_the_layer_and_its_rule(stride, bias):
    m, x = layer_and_input(4, 6, 2, (9, 7), bias, stride=stride, seed=3, device="cpu")
    xp, noise = PC.pseudo_conv_inputs(m, x)
    layer = m(x).detach()
    close(PC.pseudo_conv_forward_ref(xp, noise, m.weight, 2, m.bias), layer, "kernel_sum32")
    c = torch.randn(2, 6, *xp.shape[2:])
    rule = local.perturbative_grads(m, x, c)
    dw, db = PC.pseudo_conv_update_ref(xp, noise, c, 2, bias=bias)
    close(dw, rule["weight"], "kernel_sum32")
    if bias:
        close(db, rule["bias"], "kernel_sum32")
    # the layer-level forms, through the kernels
    m, x, c = m.to(DEVICE), x.to(DEVICE), c.to(DEVICE)
    close(PC.perturbative_forward(m, x).cpu(), layer, "kernel_sum32")
    fused = PC.perturbative_grads(m, x, c)
    assert fused.keys() == rule.keys()
    for key in rule:
        close(fused[key].cpu(), rule[key], "kernel_sum32")


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


# == CUDA: compiled in 16-bit dtypes ===============================================================
@kernel_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nmasks", [1, 2])
def test_pseudo_conv_in_16_bits_on_cuda(dtype, nmasks):
    m, x = layer_and_input(64, 96, nmasks, (14, 14), True, batch=8, seed=4)
    x = x.to(dtype).contiguous(memory_format=torch.channels_last)
    x, noise = PC.pseudo_conv_inputs(m, x)
    close(PC.pseudo_conv_forward(x, noise, m.weight, nmasks, m.bias),
          PC.pseudo_conv_forward_ref(x, noise, m.weight, nmasks, m.bias), "kernel_gemm16")
    e = torch.randn(8, 96, 14, 14, device=DEVICE).to(dtype)
    for got, want in zip(PC.pseudo_conv_update(x, noise, e, nmasks, bias=True, scale=1 / 8),
                         PC.pseudo_conv_update_ref(x, noise, e, nmasks, bias=True, scale=1 / 8)):
        close(got, want, "kernel_gemm16")


RESNET18_STAGES = [(64, 56), (128, 28), (256, 14), (512, 7)]          # channels, size


@kernel_gpu
@pytest.mark.parametrize("dtype, nmasks", [(torch.bfloat16, 1), (torch.bfloat16, 2),
                                           (torch.float32, 1)])
@pytest.mark.parametrize("channels, size", RESNET18_STAGES)
def test_pseudo_conv_at_resnet18_stage_shapes_on_cuda(channels, size, dtype, nmasks):
    """The shapes benchmarks/gpu.py times (batch 4, channels_last): forward and update on the
    GPU against the references on the CPU from the same rounded inputs, within a share of the
    largest entry."""
    bf16 = dtype == torch.bfloat16
    forward_row = "kernel_stage_conv_bfloat16" if bf16 else "kernel_stage_conv_float32"
    update_row = "kernel_stage_update_bfloat16" if bf16 else "kernel_stage_conv_float32"
    gen = torch.Generator().manual_seed(0)
    m = PerturbativeConv2d(channels, channels, nmasks, seed=channels).cuda()
    x = torch.randn(4, channels, size, size, generator=gen).to(dtype)
    xd = x.cuda().contiguous(memory_format=torch.channels_last)
    noise = m.masks(size, size, xd)
    close(PC.pseudo_conv_forward(xd, noise, m.weight, nmasks).float().cpu(),
          PC.pseudo_conv_forward_ref(x, noise.cpu(), m.weight.cpu(), nmasks).float(),
          forward_row, "forward")
    e = torch.randn(4, channels, size, size, generator=gen).to(dtype)
    ed = e.cuda().contiguous(memory_format=torch.channels_last)
    got = PC.pseudo_conv_update(xd, noise, ed, nmasks, bias=True, scale=1 / 4)
    want = PC.pseudo_conv_update_ref(x, noise.cpu(), e, nmasks, bias=True, scale=1 / 4)
    for part, g, w in zip(("weight", "bias"), got, want):
        close(g.float().cpu(), w.float(), update_row, f"update of the {part}")
