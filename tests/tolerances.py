"""The one tolerance table of the suite: name -> Tolerance(rtol, atol, reason).

Every comparison of the generated program with the reference interpreter, of a Triton kernel
with its plain-torch reference, of a program on streams, on other devices or replayed as a CUDA
graph with the eager one-stream program, and of a round trip through a state dict, names its row
here (through ``helpers.close`` and ``helpers.assert_matches_reference``). A row with ``relative``
set compares each tensor after dividing it (and the expected one) by its scale: the largest
``|expected|`` entry, floored at ``relative.floor`` and at ``relative.share`` times the largest
entry of every tensor in the comparison (a tensor that is zero in exact arithmetic then differs by
rounding only). Hand-derived references (test_equations, test_invariants, test_data) keep their
own constants beside their derivations.
"""
from typing import NamedTuple, Optional

import torch


class Relative(NamedTuple):
    floor: float = 0.0         # the scale is at least this
    share: float = 0.0         # ... and at least this share of the largest entry of any tensor


class Tolerance(NamedTuple):
    rtol: float
    atol: float
    reason: str
    relative: Optional[Relative] = None


TOLERANCES = {
    # -- generated program vs reference interpreter --
    "float64": Tolerance(
        1e-10, 1e-12, "float64, the same products summed in another order (matmul in the "
        "generated program, autograd in the reference)"),
    "float64_autograd": Tolerance(
        0.0, 1e-10, "float64 update of the output site's Linear against autograd's gradient of "
        "the mean cross-entropy: a different computation of the same value, entries near 1e-1"),
    "float64_torch_func": Tolerance(
        1e-7, 1e-9, "float64; ops without a rule go through torch.func's VJP in one and autograd "
        "in the other, whose summation orders differ most inside LSTMs, attention and FFTs"),
    "float32": Tolerance(
        1.3e-6, 1e-6, "float32 rounding of sums over the batch and space, in another order"),
    "float32_long_sums": Tolerance(
        1e-4, 1e-6, "float32 through transformer layers (softmax, layer norms, feed-forward): "
        "longer chains of rounded sums"),
    "float32_resnet": Tolerance(
        0.0, 1e-4, "float32 ResNet-18 with BatchNorm VJPs: errors that cancel in the norm's "
        "VJP leave small entries whose rounding is large relative to themselves",
        Relative(floor=1e-6)),
    "float32_timm": Tolerance(
        0.0, 1e-3, "float32 timm models (deep stacks of norms, attention, dropout paths with "
        "fixed masks): rounding relative to each update's largest entry",
        Relative(share=1e-3)),
    "triton_path": Tolerance(
        1e-4, 1e-6, "the program's Triton path against its torch path (float32, interpreter): "
        "fused sums in another order; inside a block the error cancels in BatchNorm's VJP and "
        "small entries remain, so atol grows to TRITON_PATH_SHARE of the largest entry"),
    "triton_path_norms": Tolerance(
        1e-4, 1e-7, "the sites' squared-error sums, from the target/error kernel against torch"),
    # -- other placements of the same program --
    "exact": Tolerance(
        0.0, 0.0, "the same torch ops in the same order on the same values (a state-dict round "
        "trip, a second program loaded from the first, devices that are all the CPU)"),
    "cuda_streams": Tolerance(
        1e-5, 1e-6, "float32, the same ops on other CUDA streams or devices; cuBLAS and cuDNN "
        "may pick another algorithm"),
    "cuda_graph_losses": Tolerance(
        1e-4, 1e-5, "float32 losses of five steps replayed from a CUDA graph against eager ones"),
    "cuda_graph_state": Tolerance(
        1e-3, 1e-5, "float32 parameters and statistics after five steps replayed from a CUDA "
        "graph: per-step differences of cuDNN's algorithms compound through the optimizer"),
    "autocast_bf16": Tolerance(
        5e-2, 1e-3, "bf16 autocast: operands rounded to 8 bits of mantissa, sums in float32"),
    "cudnn_batchnorm": Tolerance(
        1e-4, 1e-4, "cuDNN's saved batch statistics against recomputed ones (float32 or bf16 "
        "input, float32 statistics)"),
    # -- Triton kernels vs their plain-torch references --
    "kernel_float32": Tolerance(
        1e-5, 1e-5, "same formulas; exp/erf/tanh and FMA differ by a few ulp"),
    "kernel_sum32": Tolerance(
        1e-5, 1e-4, "float32 sums over a few hundred terms, in another order"),
    "kernel_bfloat16": Tolerance(
        1.6e-2, 1e-2, "one rounding to bfloat16 of nearly equal float32 values"),
    "kernel_float16": Tolerance(1e-3, 1e-3, "likewise for float16"),
    "kernel_stage_bfloat16": Tolerance(
        0.0, 1e-2, "ResNet-18's stage shapes in bf16, the kernel on the GPU against the "
        "reference on the CPU: one bf16 rounding of nearly equal float32 values",
        Relative()),
    "kernel_stage_float32": Tolerance(
        0.0, 1e-5, "likewise in float32: exp/erf and FMA differ by a few ulp", Relative()),
    "kernel_stage_conv_bfloat16": Tolerance(
        0.0, 1e-2, "the pseudo-convolution forward at ResNet-18's stage shapes in bf16: the same "
        "bf16 operands, float32 sums in another order, a bf16 output", Relative()),
    "kernel_stage_update_bfloat16": Tolerance(
        0.0, 1e-3, "its weight update: float32 sums of bf16 products over B*H*W terms",
        Relative()),
    "kernel_stage_conv_float32": Tolerance(
        0.0, 1e-4, "forward and update in float32: IEEE dots, sums in another order",
        Relative()),
    "kernel_gemm16": Tolerance(
        2e-2, 2e-2, "float32 accumulation of 16-bit products, in another order"),
}
# pResNet-18's last block (1 x 1 maps, batch 2) cancels most in BatchNorm's VJP: its bn2.weight
# differed by 1.4e-3 of its largest entry on one 2-core machine (the same code at 21ca745 too)
TRITON_PATH_SHARE = 3e-3

# the kernel row for results in each dtype
KERNEL_DTYPE_TOLERANCE = {torch.float32: "kernel_float32", torch.bfloat16: "kernel_bfloat16",
                          torch.float16: "kernel_float16"}
