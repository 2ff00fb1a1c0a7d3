"""The generated update program: equal to the reference interpreter, free of autograd,
deterministic and readable, registered for tracebacks, and robust to .to(), eval mode and
channels_last."""
import copy
import inspect
import linecache
import os

import pytest
import torch
import torchvision
from torch import nn

import fxlra
from fxlra.ops import local
from conftest import CUDA_PARAM_MARKS, make_cnn, make_mlp, needs_cuda
from helpers import assert_matches_reference, assert_updates_match, close


def assert_same_updates(prog, x, y):
    """The generated program's updates equal the reference interpreter's (float64), keyed in
    the order of prog.named_parameters()."""
    ours, ref = assert_matches_reference(prog, x, y, "float64")
    assert list(ours) == list(ref) == [n for n, _ in prog.named_parameters()]


def resnet18_small():
    model = torchvision.models.resnet18(num_classes=10)
    model.maxpool = nn.Identity()
    return model


CASES = {
    "mlp-pairwise": (lambda: make_mlp(), (6, 5), dict(wiring="pairwise")),
    "mlp-derived-dx": (lambda: make_mlp(act=nn.Sigmoid), (6, 5),
                       dict(wiring=fxlra.wiring.blocks(2), error_rule="derived",
                            local_rule="dx", alpha={1: 0.19, 2: 0.24}, kappa=0.5)),
    "cnn-residual": (lambda: make_cnn(), (4, 3, 8, 8), dict(wiring="residual")),
    "cnn-direct-hebbian-d": (lambda: make_cnn(), (4, 3, 8, 8),
                             dict(wiring="direct", error_rule="hebbian-d", beta=0.3)),
    "resnet18": (resnet18_small, (2, 3, 16, 16), dict(wiring="residual", depth=3)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_generated_program_equals_reference_in_float64(case):
    build, shape, options = CASES[case]
    model = build().double()
    prog = fxlra.compile(model, error_init_std=0.5, **options)
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.arange(shape[0]) % 4
    assert_same_updates(prog, x, y)


def test_step_writes_the_reprojected_reference_updates_into_grad():
    model = make_mlp().double()
    prog = fxlra.compile(model, wiring="pairwise", clip=0.05, error_init_std=0.5)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1])
    ref = prog.reference_updates(x, y)
    prog.step(x, y)
    for name, p in prog.named_parameters():
        scale = min(1.0, 0.05 / ref[name].norm().item())
        close(p.grad, ref[name] * scale, "float64", name)


@pytest.mark.parametrize("case", ["mlp-pairwise", "cnn-residual", "resnet18"])
def test_step_builds_no_autograd_graph(case, monkeypatch):
    build, shape, options = CASES[case]
    prog = fxlra.compile(build(), **options)
    assert prog.fallbacks == ()

    def forbidden(*args, **kwargs):
        raise AssertionError("autograd was called during step")
    monkeypatch.setattr(torch.autograd, "grad", forbidden)
    monkeypatch.setattr(torch.autograd, "backward", forbidden)
    monkeypatch.setattr(torch.Tensor, "backward", forbidden)
    x, y = torch.randn(*shape), torch.arange(shape[0]) % 4
    result = prog.step(x, y)
    assert not result.loss.requires_grad
    assert all(not d.requires_grad for d in result.discrepancies.values())
    assert all(p.grad is not None and p.grad.grad_fn is None for p in prog.parameters())


def test_a_module_without_a_rule_uses_a_local_vjp_named_by_explain_and_code():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(4, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.out = nn.Linear(8, 3)

        def forward(self, x):
            h = torch.tanh(self.inp(x))
            a, _ = self.attn(h, h, h)
            return self.out(torch.relu(a).mean(1))
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    prog = fxlra.compile(Attn().double(), wiring="pairwise", error_init_std=0.5,
                         error_rule="hebbian-z", example_inputs=x)
    assert prog.fallbacks == ("attn",)
    assert "local.module_param_vjp(m_attn" in prog.code
    assert "local VJP" in prog.explain()
    assert_same_updates(prog, x, torch.tensor([0, 1, 2]))


def test_source_is_deterministic_and_registered_for_tracebacks(tmp_path, monkeypatch):
    monkeypatch.setenv("FXLRA_DUMP_DIR", str(tmp_path))
    torch.manual_seed(0)
    a = fxlra.compile(make_cnn())
    torch.manual_seed(0)
    b = fxlra.compile(make_cnn())
    assert a.code == b.code
    filename = a._generated.__code__.co_filename
    assert filename.startswith("<fxlra-generated-SmallCNN")
    assert inspect.getsource(a._generated) == a.code
    assert linecache.getline(filename, 1).startswith("def rec_lra_updates(")
    dumped = list(tmp_path.iterdir())
    assert len(dumped) == 1 and dumped[0].read_text() == a.code
    for line in a.code.splitlines()[2:]:
        assert line.startswith("    ") and ";" not in line
    for site in a.sites:
        assert f"# site {site}" in a.code


def test_a_failure_inside_the_program_shows_the_generated_line():
    prog = fxlra.compile(make_mlp(), wiring="pairwise")
    edge = prog.plan.edges[0]

    class Broken(nn.Module):
        def forward(self, *args):
            raise RuntimeError("broken synapse")
    prog._generated.__globals__[f"syn_{edge.key}"] = Broken()
    with pytest.raises(RuntimeError) as info:
        prog.updates(torch.randn(4, 5), torch.tensor([0, 1, 2, 3]))
    frames = [f for f in info.traceback if str(f.path).startswith("<fxlra-generated")]
    assert frames and "syn_" in str(frames[0].statement)


def test_program_follows_the_model_to_float64_and_eval_mode():
    prog = fxlra.compile(make_cnn(), error_init_std=0.5)
    prog.to(torch.float64)
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    assert all(u.dtype == torch.float64 for u in prog.updates(x, y).values())
    assert_same_updates(prog, x, y)
    prog.eval()
    before = prog.model.bn.running_mean.clone()
    assert_same_updates(prog, x, y)
    torch.testing.assert_close(prog.model.bn.running_mean, before, rtol=0, atol=0)


def test_channels_last_inputs_give_the_same_updates():
    model = make_cnn().double()
    prog = fxlra.compile(model, error_init_std=0.5)
    twin = copy.deepcopy(prog.state_dict())
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    plain = prog.updates(x, y)
    prog.load_state_dict(twin)
    prog.to(memory_format=torch.channels_last)
    cl = prog.updates(x.to(memory_format=torch.channels_last), y)
    assert_updates_match(cl, plain, "float64")


@pytest.mark.parametrize("name, build, shape", [
    ("mlp", lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), (2, 3)),
    ("conv", lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2)),
     (2, 1, 5, 5)),
    ("identity-site", lambda: nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), (2, 3)),
])
def test_generated_source_snapshot(name, build, shape):
    torch.manual_seed(0)
    prog = fxlra.compile(build().double(), wiring="pairwise", error_init_std=0.5)
    expected = os.path.join(os.path.dirname(__file__), "snapshots", f"codegen_{name}.txt")
    if os.environ.get("FXLRA_ACCEPT"):
        os.makedirs(os.path.dirname(expected), exist_ok=True)
        with open(expected, "w") as f:
            f.write(prog.code)
    with open(expected) as f:
        assert prog.code == f.read(), "generated source changed; rerun with FXLRA_ACCEPT=1"
    x = torch.randn(*shape, dtype=torch.float64)
    assert_same_updates(prog, x, torch.tensor([0, 1]))


class GraphCounter:
    """A torch.compile backend that runs each captured graph as is and counts the captures."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.mark.parametrize("make, streams", [(make_mlp, 1), (make_mlp, 3), (make_cnn, 1)])
def test_torch_compile_of_step_captures_the_program_once(make, streams):
    """``torch.compile(prog.step)`` (what the README shows) traces the whole generated program as
    one graph and never recompiles for new values (the host-side checks stay outside the
    trace); its steps leave the same ``.grad`` and BatchNorm statistics as eager steps."""
    torch._dynamo.reset()
    compiled, eager = (fxlra.compile(make(), wiring="pairwise", streams=streams)
                       for _ in range(2))
    eager.load_state_dict(compiled.state_dict())
    counter = GraphCounter()
    step = torch.compile(compiled.step, backend=counter)
    for i in range(3):
        x = torch.randn(6, *([5] if make is make_mlp else [3, 8, 8]))
        y = torch.tensor([0, 1, 2, 3, 0, 1])
        step(x, y)
        eager.step(x, y)
        if i == 0:
            first = counter.graphs
    assert (first, counter.graphs) == (1, 1)
    for (name, a), b in zip(compiled.named_parameters(), eager.parameters()):
        close(a.grad, b.grad, "exact", name)
    for (name, a), b in zip(compiled.model.named_buffers(), eager.model.buffers()):
        close(a, b, "exact", name)


BATCHNORMS = [(nn.BatchNorm1d, (6, 4)), (nn.BatchNorm1d, (6, 4, 5)), (nn.BatchNorm2d, (6, 4, 3, 3)),
              (nn.BatchNorm3d, (6, 4, 2, 3, 3))]


@pytest.mark.parametrize("cls, shape", BATCHNORMS)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA_PARAM_MARKS)])
def test_batchnorm_forward_is_the_module_forward(cls, shape, momentum, track, training, device):
    """The generated forward runs a torch.nn BatchNorm by ``local.batchnorm_forward``: the
    module's output and buffers exactly (over two steps: the counter and the running statistics
    carry over), and the batch statistics it normalised with, which the norm's update reads."""
    a = cls(4, momentum=momentum, track_running_stats=track).to(device, torch.float64)
    with torch.no_grad():
        a.weight.uniform_(0.5, 2.0)
        a.bias.uniform_(-1.0, 1.0)
    a.train(training)
    b = copy.deepcopy(a)
    for _ in range(2):
        x = torch.randn(shape, dtype=torch.float64, device=device) * 3 + 1
        want = a(x)
        got, stats = local.batchnorm_forward(b, x)
        assert torch.equal(got, want)
        for (name, u), v in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(u, v), name
    assert (stats is not None) == (training or not track)
    if stats is not None:
        var, mean = torch.var_mean(x, [0] + list(range(2, x.dim())), correction=0)
        torch.testing.assert_close(stats[0], mean)
        torch.testing.assert_close(stats[1], torch.rsqrt(var + a.eps))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batchnorm_statistics_under_cudnn_are_mean_and_inverse_std(dtype):
    """On CUDA the op may be cuDNN's, whose second saved tensor must also be 1/sqrt(var + eps)
    (what ATen's batch-norm backward takes): the norm's update equals the one from recomputed
    statistics, channels_last and bf16 included."""
    m = nn.BatchNorm2d(16).cuda()
    x = (torch.randn(8, 16, 7, 7, device="cuda") * 2 + 1).to(dtype).contiguous(
        memory_format=torch.channels_last)
    c = torch.randn_like(x)
    _, stats = local.batchnorm_forward(m, x)
    got = local.batchnorm_grads(m, x, c, stats)
    want = local.batchnorm_grads(m, x, c)
    for name in want:
        close(got[name], want[name], "cudnn_batchnorm", name)


def test_only_plain_torch_batchnorms_run_by_batchnorm_forward():
    """A BatchNorm subclass may change the forward: it stays a module call (and its update
    recomputes the statistics); the plain class in the same model keeps them."""
    class Shifted(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) + 1.0

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                          Shifted(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.randn(5, 3, 6, 6), torch.tensor([0, 1, 2, 0, 1])
    prog = fxlra.compile(model, wiring="direct", leaf_modules=[Shifted], example_inputs=x)
    assert prog.code.count("local.batchnorm_forward(") == 1
    prog.double()
    x = x.double()
    assert_matches_reference(prog, x, y, "float64")
