"""The multi-tensor re-projection kernels (kernels/reproject.py): ``reproject_`` and
``frobenius_norms`` equal their plain-torch references and ``rules.reproject_all`` (chunks,
layouts, empty and zero-norm tensors, 16-bit dtypes), and reject bad arguments with exact
messages. The Triton set-up is tests/conftest.py's."""
import pytest
import torch

from fxlra import rules
from conftest import KERNEL_DEVICE as DEVICE
from conftest import expect_error, kernel_gpu, kernel_modules
from helpers import close
from tolerances import KERNEL_DTYPE_TOLERANCE

TE, PC, RP = kernel_modules()
pytestmark = pytest.mark.usefixtures("kernel_setup")


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
        close(a, b, "kernel_float32", f"updates[{k}]")
        close(b, c, "kernel_float32", f"ref vs rules, updates[{k}]")
        assert a.stride() == o.stride()
        if o.numel() == 0 or o.norm() <= 1.0:
            assert torch.equal(a, o), f"updates[{k}] has norm <= clip and must not change"
        else:
            close(a.norm(), torch.tensor(1.0, device=DEVICE), "kernel_float32")


def test_norms_given_or_computed_by_the_kernel_agree_with_foreach_norm():
    originals = [t for t in updates_list() if t.numel()]
    norms = RP.frobenius_norms(originals)
    close(norms, torch.stack(torch._foreach_norm(originals)), "kernel_float32")
    close(RP.frobenius_norms_ref(originals), norms, "kernel_float32")
    got, want, fxlra_way = ([t.clone() for t in originals] for _ in range(3))
    RP.reproject_(got, 0.8, norms)
    RP.reproject_ref(want, 0.8, norms)
    rules.reproject_all(fxlra_way, 0.8, norms)
    for a, b, c in zip(got, want, fxlra_way):
        close(a, b, "kernel_float32")
        close(a, c, "kernel_float32")
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
        close(got[0], want[0], "kernel_float32")
        close(got[1], want[1], "kernel_bfloat16")
        close(got[2], want[2], "kernel_float16")
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


# == CUDA: compiled in 16-bit dtypes ===============================================================
@kernel_gpu
def test_reproject_in_16_bits_on_cuda():
    updates = [torch.randn(100_000, device=DEVICE).bfloat16(),
               torch.randn(64, 64, 3, 3, device=DEVICE).half(), torch.randn(10, device=DEVICE)]
    got, want = [t.clone() for t in updates], [t.clone() for t in updates]
    RP.reproject_(got, 1.0)
    RP.reproject_ref(want, 1.0)
    for a, b in zip(got, want):
        close(a, b, KERNEL_DTYPE_TOLERANCE[a.dtype])
