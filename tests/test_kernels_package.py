"""The kernels package (kernels/__init__.py, installed as ``fxlra.kernels``): lazy exports,
``available`` following the environment, importing without Triton, and every kernel lowering to
Hopper machine code without a GPU; and the fallback that runs the kernel test files in a fresh
process when Triton was imported in the other ``TRITON_INTERPRET`` mode before the tests. The
Triton set-up is tests/conftest.py's."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CUDA, INTERPRET, KERNEL_TEST_FILES, KERNELS_FRESH, kernel_modules
import fxlra.kernels

TE, PC, RP = kernel_modules()
pytestmark = pytest.mark.usefixtures("kernel_setup")
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


@pytest.mark.skipif(KERNELS_FRESH, reason="Triton was imported in this suite's mode: the kernel "
                                          "tests run here")
def test_kernels_in_a_fresh_process():
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"] +
                         [str(TESTS / name) for name in KERNEL_TEST_FILES], cwd=ROOT,
                         capture_output=True, text=True,
                         env=dict(os.environ, TRITON_INTERPRET="1" if INTERPRET else "0"),
                         timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_package_exports_lazily_and_available_follows_the_environment(monkeypatch):
    package = fxlra.kernels
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
            "import fxlra\n"
            "k = fxlra.kernels\n"
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
    import re
    import sys
    sys.path.insert(0, root)
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
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
