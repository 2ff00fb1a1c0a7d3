"""CUDA-graph replay of the step (``cuda_graph=True``, fxlra.runtime.graphs).

On the CPU a stand-in backend keeps what matters about a replay: it writes its outputs into the
tensors the capture returned (so anything the step keeps must be copied), and it fails if a
parameter or buffer moved since the capture (a real replay would read the old memory). With it,
graph steps must equal eager steps exactly: warm-up runs must not count as steps (normalisation
statistics, dropout's RNG), a second step before ``opt.step`` must accumulate, a new batch shape
or mode must capture again, and moving the program must drop its graphs. The real backend is
tested at the end where a GPU is present.
"""
import copy
import itertools

import pytest
import torch
from torch import nn

import fxlra
from fxlra.runtime import graphs
from fxlra.errors import NumericalError, OptionError

from conftest import make_cnn, needs_cuda
from helpers import close

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeGraphs:
    """CUDA graphs' memory behaviour on the CPU (see the module docstring)."""

    def __init__(self):
        self.module, self.warmups, self.captures, self.replays = None, 0, 0, 0

    def _addresses(self):
        return [t.data_ptr() for t in itertools.chain(self.module.parameters(),
                                                       self.module.buffers())]

    def warm_up(self, fn, runs):
        self.warmups += runs
        for _ in range(runs):
            fn()

    def capture(self, fn):
        self.captures += 1
        return (fn, self._addresses()), fn()

    def replay(self, graph, out):
        fn, addresses = graph
        assert self._addresses() == addresses, "a parameter or buffer moved since the capture"
        self.replays += 1
        for static, new in zip(torch.utils._pytree.tree_leaves(out),
                               torch.utils._pytree.tree_leaves(fn())):
            if isinstance(static, torch.Tensor):
                static.copy_(new)
        return out

    def rng_state(self):
        return torch.get_rng_state()

    def set_rng_state(self, state):
        torch.set_rng_state(state)


@pytest.fixture
def fake(monkeypatch):
    backend = FakeGraphs()
    monkeypatch.setattr(graphs, "backend_for", lambda device: backend)
    return backend


class DropoutNet(nn.Module):
    """BN statistics and dropout: both would drift if the warm-up counted as steps."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.3)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(4 * 2 * 2, 5)

    def forward(self, x):
        return self.fc(self.pool(self.drop(torch.relu(self.bn(self.conv(x))))).flatten(1))


def batches(sizes, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, 6, 6, generator=gen), torch.randint(0, 5, (b,), generator=gen))
            for b in sizes]


def train(prog, data, accumulate=1, modes=None):
    """AdamW steps; returns the losses. ``modes``: per batch, True for train, False for eval."""
    opt = torch.optim.AdamW(prog.parameters(), lr=1e-2)
    torch.manual_seed(5)
    losses = []
    for k, (x, y) in enumerate(data):
        if modes is not None:
            prog.train(modes[k])
        losses.append(prog.step(x, y).loss)
        if (k + 1) % accumulate == 0:
            opt.step()
            opt.zero_grad()
    return losses


def pair(model, **kw):
    """The same model compiled eagerly and with graphs (equal synapses)."""
    eager = fxlra.compile(copy.deepcopy(model), wiring="pairwise", **kw)
    graphed = fxlra.compile(copy.deepcopy(model), wiring="pairwise", cuda_graph=True, **kw)
    graphed.load_state_dict(eager.state_dict())
    return eager, graphed


def assert_same_state(a, b):
    for (name, t), (_, u) in zip(a.state_dict().items(), b.state_dict().items()):
        if isinstance(t, torch.Tensor):
            assert torch.equal(t, u), name


@pytest.mark.parametrize("accumulate", [1, 2])
def test_graph_steps_equal_eager_steps(fake, accumulate):
    eager, graphed = pair(DropoutNet())
    fake.module = graphed
    data = batches([4] * 6)
    want = train(eager, data, accumulate)
    got = train(graphed, data, accumulate)
    assert [float(v) for v in got] == [float(v) for v in want]
    assert_same_state(eager, graphed)
    assert (fake.captures, fake.warmups, fake.replays) == (1, graphs.WARMUP_RUNS, 6)


def test_what_a_step_returns_is_not_overwritten_by_the_next(fake):
    _, graphed = pair(DropoutNet())
    fake.module = graphed
    (x1, y1), (x2, y2) = batches([4, 4])
    first = graphed.step(x1, y1)
    kept = (first.loss.clone(), {k: v.clone() for k, v in first.discrepancies.items()})
    graphed.step(x2, y2)
    assert torch.equal(first.loss, kept[0])
    assert all(torch.equal(first.discrepancies[k], v) for k, v in kept[1].items())


def test_a_new_shape_or_mode_captures_again(fake):
    eager, graphed = pair(DropoutNet())
    fake.module = graphed
    data = batches([4, 4, 3, 4, 3, 4])
    modes = [True, True, True, False, True, False]
    want = train(eager, data, modes=modes)
    got = train(graphed, data, modes=modes)
    assert [float(v) for v in got] == [float(v) for v in want]
    assert_same_state(eager, graphed)
    assert fake.captures == 3 and len(graphed._graphs) == 3   # (4, train), (3, train), (4, eval)


def test_moving_the_program_drops_its_graphs(fake):
    eager, graphed = pair(make_cnn(width=3))
    fake.module = graphed
    data = batches([2, 2])
    train(graphed, data[:1])
    train(eager, data[:1])
    graphed.double()
    eager.double()
    assert len(graphed._graphs) == 0
    data = [(x.double(), y) for x, y in data[1:]]
    assert [float(v) for v in train(graphed, data)] == [float(v) for v in train(eager, data)]


def test_a_non_finite_graph_step_changes_nothing(fake):
    _, graphed = pair(DropoutNet())
    fake.module = graphed
    (x, y), (x2, y2) = batches([4, 4])
    graphed.step(x, y)
    before = {k: v.clone() for k, v in graphed.state_dict().items() if isinstance(v, torch.Tensor)}
    grads = [p.grad.clone() for p in graphed.parameters()]
    with torch.no_grad():
        next(iter(graphed.synapses.values())).weight[0, 0] = float("nan")
    before[next(k for k in before if k.startswith("synapses."))][0, 0] = float("nan")
    with pytest.raises(NumericalError, match="^step 2: "):
        graphed.step(x2, y2)
    after = graphed.state_dict()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0, equal_nan=True, msg=k)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, graphed.parameters()))


def test_on_the_cpu_cuda_graph_is_refused_at_the_step():
    prog = fxlra.compile(DropoutNet(), wiring="pairwise", cuda_graph=True)
    (x, y), = batches([2])
    with pytest.raises(OptionError) as info:
        prog.step(x, y)
    assert str(info.value) == ("cuda_graph=True needs the program on a CUDA device; it is on "
                               "cpu. Move it with prog.to('cuda') or compile with "
                               "cuda_graph=False")
    assert all(p.grad is None for p in prog.parameters())
    prog.updates(x, y)          # only the step is replayed


def test_cuda_graph_and_data_parallel_are_refused(fake):
    _, graphed = pair(DropoutNet())
    fake.module = graphed
    graphed.reducer = object()
    (x, y), = batches([2])
    with pytest.raises(OptionError, match=r"^cuda_graph=True cannot be combined with "
                                          r"data-parallel training"):
        graphed.step(x, y)


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_cuda_graph_must_be_a_bool(bad):
    with pytest.raises(OptionError, match=rf"^cuda_graph must be True or False, got "
                                          rf"{bad!r}$"):
        fxlra.compile(DropoutNet(), cuda_graph=bad)


# -- on a GPU -------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("streams", [1, 4])
def test_real_cuda_graphs_equal_eager_steps(streams):
    model = make_cnn().cuda()
    eager = fxlra.compile(copy.deepcopy(model), wiring="residual", streams=streams)
    graphed = fxlra.compile(copy.deepcopy(model), wiring="residual", streams=streams,
                            cuda_graph=True)
    graphed.load_state_dict(eager.state_dict())
    data = [(x.cuda(), y.cuda()) for x, y in batches([8, 8, 8, 5, 8])]
    data = [(torch.randn(len(y), 3, 16, 16, device="cuda"), y) for _, y in data]
    want = train(eager, data)
    got = train(graphed, data)
    close(torch.stack(got), torch.stack(want), "cuda_graph_losses", "losses")
    for (name, t), (_, u) in zip(eager.state_dict().items(), graphed.state_dict().items()):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            close(u, t, "cuda_graph_state", name)
    assert len(graphed._graphs) == 2


@needs_cuda
def test_real_cuda_graphs_under_autocast_read_the_current_weights():
    """Autocast caches the bf16 copies of weights: a capture that reused the warm-up's copies
    would replay with the weights as they were at capture."""
    model = make_cnn().cuda()
    eager = fxlra.compile(copy.deepcopy(model), wiring="residual")
    graphed = fxlra.compile(copy.deepcopy(model), wiring="residual", cuda_graph=True)
    graphed.load_state_dict(eager.state_dict())
    x = torch.randn(8, 3, 16, 16, device="cuda")
    y = torch.randint(0, 5, (8,), device="cuda")
    for scale in (1.0, 0.5):
        for prog in (eager, graphed):
            with torch.no_grad():
                for p in prog.parameters():
                    p.mul_(scale)
            prog.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                prog.step(x, y)
        for (name, p), q in zip(eager.named_parameters(), graphed.parameters()):
            close(q.grad, p.grad, "autocast_bf16", name)
