"""The activation table of the fused target/error kernel (kernels/activations.py, through
``target_error.ACTIVATIONS`` and ``activation_of``): every activation fxlra makes a site has a row,
found by the site's name and by its call; the row's reference equals fxlra's own target and
``rules.inner_error`` bit for bit, and the kernel agrees. The Triton set-up is
tests/conftest.py's."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fxlra import rules
from fxlra.ops import registry
from conftest import KERNEL_DEVICE as DEVICE
from conftest import kernel_modules
from conftest import kernel_site as site
from helpers import close

TE, PC, RP = kernel_modules()
pytestmark = pytest.mark.usefixtures("kernel_setup")


def _torch_activations():
    """fxlra's activation rows (registry): its torch modules and functions (not the ATen ops),
    plus parametrised ones, each as (target, call, extra args, kwargs)."""
    modules = [cls() for cls, row in registry.MODULES.items()
               if row.activation and cls.__module__.startswith("torch.")]
    modules += [nn.LeakyReLU(0.3), nn.ELU(0.4), nn.Hardtanh(-0.3, 0.6), nn.Softplus(2.0, 3.0),
                nn.GELU(approximate="tanh"), nn.CELU(1.5)]
    functions = [(fn, (), {}) for fn, row in registry.FUNCTIONS.items()
                 if row.activation and not isinstance(fn, torch._ops.OpOverloadPacket)
                 and (getattr(fn, "__module__", None) or "torch").split(".")[0] == "torch"
                 and fn is not F.prelu]                          # its slope is an argument
    functions += [(F.prelu, (torch.tensor([0.2, -0.1, 0.3]),), {}),
                  (F.leaky_relu, (0.2,), {}), (F.hardtanh, (), {"min_val": -2.0}),
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
    close(got.cpu(), target_fxlra, "kernel_float32")


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
