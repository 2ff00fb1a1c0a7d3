"""The generated program's Triton path (``kernels="triton"``), run on the CPU by Triton's
interpreter in a fresh process (TRITON_INTERPRET=1 must be set before Triton is imported): the
fused target/error kernel at every site whose activation has a kernel row, and the fused
pseudo-convolution forward and update, give the same updates as the torch path (the fused
program also cut into blocks for 3 streams), and prog.code shows which path it took. On the CPU
without the interpreter, "auto" keeps torch ops and "triton" is a clear error."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from torch import nn

import fxlra

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import copy, sys
    import torch
    from torch import nn
    import fxlra
    from fxlra.models import presnet18
    from fxlra.nn import LEAF_MODULES
    sys.path.insert(0, sys.argv[1])
    from conftest import make_cnn, make_mlp
    from tolerances import TOLERANCES, TRITON_PATH_SHARE
    torch.set_num_threads(1)
    torch.manual_seed(0)
    PATH, NORMS = TOLERANCES["triton_path"], TOLERANCES["triton_path_norms"]

    def close(value, expected, msg):
        scale = TRITON_PATH_SHARE * float(expected.abs().max())
        torch.testing.assert_close(value, expected, rtol=PATH.rtol, atol=max(PATH.atol, scale),
                                   msg=msg)
    class PreNorm(nn.Module):          # tokens; the norms read sites (their displacement
        def __init__(self):            # goes through the norm's input-VJP)
            super().__init__()
            self.embed, self.norm1, self.fc = nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 6)
            self.norm2, self.head = nn.LayerNorm(6), nn.Linear(6, 3)

        def forward(self, x):
            h = torch.tanh(self.embed(x))
            h = h + torch.tanh(self.fc(self.norm1(h)))
            return self.head(self.norm2(h))

    tokens = torch.randn(3, 5, 4)
    cases = {
        "prenorm": (PreNorm(), "residual", tokens, torch.arange(15).view(3, 5) % 3,
                    dict(example_inputs=tokens)),
        "mlp": (make_mlp(act=nn.Tanh), "pairwise", torch.randn(6, 5), torch.arange(6) % 4, {}),
        "cnn": (make_cnn(), "residual", torch.randn(4, 3, 8, 8), torch.arange(4) % 5,
                dict(alpha={1: 0.19, 2: 0.24})),
        "cnn-paper": (make_cnn(), "residual", torch.randn(4, 3, 8, 8), torch.arange(4) % 5,
                      dict(alpha={1: 0.19, 2: 0.24}, preset="paper")),
        "presnet": (presnet18(classes=3, width=4, level=0.1), "residual",
                    torch.randn(2, 3, 8, 8), torch.arange(2) % 3,
                    dict(leaf_modules=LEAF_MODULES)),
    }
    for name, (model, wiring, x, y, extra) in cases.items():
        plain = fxlra.compile(copy.deepcopy(model), wiring=wiring, kernels="torch", **extra)
        fused = fxlra.compile(copy.deepcopy(model), wiring=wiring, kernels="triton", streams=3,
                              **extra)
        fused.load_state_dict(plain.state_dict())
        assert "kernels.target_and_error" in fused.code and "kernels" not in plain.code, name
        assert "ST.enter(" in fused.code and "ST." not in plain.code, name
        assert bool(fused.plan.normed) == (name == "prenorm"), name
        if name == "presnet":
            assert "kernels.perturbative_forward" in fused.code, name
            assert "kernels.perturbative_grads" in fused.code, name
        a, b = plain.updates(x, y), fused.updates(x, y)
        assert a.keys() == b.keys(), name
        for k in a:
            close(b[k], a[k], f"{name} {k}")
        # the fused sites' error norms come from the kernel's sum(e^2): the same discrepancies
        ra, rb = plain.step(x, y), fused.step(x, y)
        assert ra.discrepancies.keys() == rb.discrepancies.keys(), name
        for site, value in ra.discrepancies.items():
            torch.testing.assert_close(rb.discrepancies[site], value, rtol=NORMS.rtol,
                                       atol=NORMS.atol, msg=f"{name} {site}")
        for (k, p), q in zip(plain.named_parameters(), fused.parameters()):
            close(q.grad, p.grad, f"{name} {k}")
        # a NaN that only the inner sites' errors carry is caught through those sums
        with torch.no_grad():
            for p in fused.synapses.parameters():
                p.fill_(float("nan"))
        before = [p.grad.clone() for p in fused.parameters()]
        try:
            fused.step(x, y)
            raise AssertionError(f"{name}: a NaN error passed the check")
        except fxlra.NumericalError as exc:
            assert "is not finite" in str(exc), exc
        for p, g in zip(fused.parameters(), before):
            assert torch.equal(p.grad, g), name                  # nothing was added
        print(name, "ok", len(a))
''')


def test_the_triton_path_equals_the_torch_path_under_the_interpreter(tmp_path):
    pytest.importorskip("triton")
    script = tmp_path / "kernel_path.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(script), str(ROOT / "tests")], env=env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert [ln.split()[:2] for ln in done.stdout.splitlines()] == [
        ["prenorm", "ok"], ["mlp", "ok"], ["cnn", "ok"], ["cnn-paper", "ok"], ["presnet", "ok"]]


def test_auto_keeps_torch_ops_on_the_cpu_and_triton_there_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    prog = fxlra.compile(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)))
    assert "kernels" not in prog.code
    with pytest.raises(fxlra.OptionError, match="kernels='triton' needs Triton and a CUDA"):
        fxlra.compile(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)),
                      kernels="triton")
    with pytest.raises(fxlra.OptionError, match=r"kernels='gpu' is not supported"):
        fxlra.compile(nn.Sequential(nn.Linear(4, 3)), kernels="gpu")


def test_moving_the_program_regenerates_it_for_the_new_device():
    prog = fxlra.compile(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)))
    first = prog._generated
    prog.double()                                    # same device: nothing to regenerate
    assert prog._generated is first
    prog.to("meta")
    assert prog._generated is not first and prog._built_for.type == "meta"
