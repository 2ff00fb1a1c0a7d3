"""Parallel streams in the generated program (fxlra.streams).

On the CPU the streams run in program order, so these tests check the schedule itself: the
static rules (``streams.verify``: ready, memory, join) over hypothesis-generated models and
wirings, that removing any wait or keep breaks them, and a simulator that runs the blocks of the
generated program in random orders that the schedule allows (each stream in order, a block only
after the blocks it waits on) and must reproduce the one-stream updates exactly. The CUDA runtime
is tested at the end where a GPU is present. ``FXLRA_SLOW=1`` runs 400 hypothesis examples
instead of 40.
"""
import dataclasses
import os
import random

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fxlra
from fxlra import streams
from fxlra.codegen.support import NO_REDUCE
from fxlra.errors import OptionError

from conftest import make_cnn as small_cnn, make_mlp, needs_cuda
from helpers import assert_matches_reference, assert_updates_match
from strategies import (PRESETS, SETTINGS, build_random_net as build, model_specs, preset,
                        random_dags)

pytestmark = pytest.mark.usefixtures("one_thread")
EXAMPLES = 400 if os.environ.get("FXLRA_SLOW") == "1" else 40     # FXLRA_SLOW=1: the long run


def compiled(model, x, wiring, n, **kw):
    return fxlra.compile(model, wiring=wiring, example_inputs=x, streams=n, **kw)


# -- a simulator of stream execution --------------------------------------------------------------
class _Token:
    """ST in simulated runs: stream statements only mark points; the simulator orders blocks."""

    def begin(self):
        pass

    def enter(self, k, wait=(), keep=()):
        pass

    def record(self):
        return object()


def _frees(rows, sched):
    """For each value: the blocks that must be done before its memory can be given to other
    work, as the caching allocator does. Its host reference goes after its last use in program
    order; from then on the stream that allocated it may reuse it once its work enqueued so far
    is done, and so may anyone once every stream that marked it (record_stream) is done."""
    last = {}
    for k, row in enumerate(rows):
        for v in row.defs + row.uses:
            last[v] = k
    made, kept, frees = {}, {}, []
    for k, row in enumerate(rows):
        if row.text.startswith("ST.enter("):
            for v in sched.keeps[row.block]:
                kept.setdefault(v, set()).add(sched.streams[row.block])
        for v in row.defs:
            made[v], kept[v] = row.block, set()
        for v in {v for v in row.defs + row.uses if last[v] == k and not v.startswith("ev_")}:
            owners = kept.get(v, set()) | {sched.streams[made.get(v, 0)]}
            frees.append((v, {b for b in range(row.block + 1) if sched.streams[b] in owners}))
    return frees


def simulate(prog, args, seed, sched=None):
    """Run the program's blocks in a random order its schedule allows (each stream in order, a
    block after the blocks it waits on); a value disappears as soon as its memory could be
    reused (``_frees``), so a read that is not protected fails with NameError."""
    sched, rows = sched or prog.schedule, prog._built.rows
    by_block = [[] for _ in sched.streams]
    for row in rows:
        text = row.text.replace("return ", "RESULT = ", 1) if row.text.startswith("return ") \
            else row.text
        by_block[row.block].append(text)
    ns = dict(prog._generated.__globals__, ST=_Token(), reduce=NO_REDUCE)
    ns.update(args)
    queues = [[b for b in range(len(sched.streams)) if sched.streams[b] == s]
              for s in range(sched.n)]
    pending, done, rng = _frees(rows, sched), set(), random.Random(seed)
    while any(queues):
        ready = [q for q in queues if q and set(sched.waits[q[0]]) <= done]
        assert ready, "no stream can go on: the schedule deadlocks"
        block = rng.choice(ready).pop(0)
        for text in by_block[block]:
            exec(text, ns)  # noqa: S102 (the program's own statements)
        done.add(block)
        for v, protected in [f for f in pending if f[1] <= done]:
            if v != "RESULT":
                ns.pop(v, None)
        pending = [f for f in pending if not f[1] <= done]
    return ns["RESULT"]


def _assert_same_updates(a, b):
    loss_a, errors_a, updates_a, sq_a = a
    loss_b, errors_b, updates_b, sq_b = b
    assert sq_a.keys() == sq_b.keys()
    for k in sq_a:
        assert torch.equal(sq_a[k], sq_b[k]), k
    assert torch.equal(loss_a, loss_b)
    assert errors_a.keys() == errors_b.keys()
    for k in errors_a:
        assert torch.equal(errors_a[k], errors_b[k]), k
    assert len(updates_a) == len(updates_b)
    for u, v in zip(updates_a, updates_b):
        assert torch.equal(u, v)


# -- properties -----------------------------------------------------------------------------------
@settings(max_examples=EXAMPLES, **SETTINGS)
@given(spec=model_specs(), wiring=st.sampled_from(PRESETS + ["dag"]), n=st.integers(2, 5),
       rule=st.sampled_from(["hebbian-z", "hebbian-d", "derived", "bootstrap"]),
       seed=st.integers(0, 2 ** 16), data=st.data())
def test_schedules_are_safe_and_any_allowed_order_gives_the_one_stream_updates(spec, wiring, n,
                                                                               rule, seed, data):
    model, x, y = build(spec)
    if wiring == "dag":
        sites = compiled(model, x, "direct", 1)
        wiring = data.draw(random_dags(sites.sites, sites.plan.outputs))
    else:
        wiring = preset(wiring)
    one = compiled(model, x, wiring, 1, error_rule=rule)
    many = compiled(model, x, wiring, n, error_rule=rule)
    many.load_state_dict(one.state_dict())
    assert one.schedule is None and "ST." not in one.code
    assert streams.verify(many._built.rows, many.schedule) == []
    with torch.no_grad():
        want = one._generated(x, y)
        _assert_same_updates(many._generated(x, y), want)
        for k in range(3):
            _assert_same_updates(simulate(many, {"x": x, "labels": y}, seed + k), want)


def test_removing_any_wait_or_keep_breaks_a_rule():
    """Every wait and every keep the schedule emits is needed by the rules (a schedule with more
    than the rules ask is not what we test here: we test that the checker can fail)."""
    x = torch.randn(2, 3, 12, 12)
    prog = compiled(small_cnn(), x, "residual", 3)
    rows, sched = prog._built.rows, prog.schedule
    assert streams.verify(rows, sched) == []
    removed = 0
    for b in range(len(sched.streams)):
        for field in ("waits", "keeps"):
            items = getattr(sched, field)[b]
            for k in range(len(items)):
                smaller = list(getattr(sched, field))
                smaller[b] = items[:k] + items[k + 1:]
                broken = dataclasses.replace(sched, **{field: tuple(smaller)})
                assert streams.verify(rows, broken), (field, b, items[k])
                removed += 1
    assert removed > 10


def test_the_simulator_catches_a_missing_keep():
    """With a keep removed, some allowed order frees a value before another stream reads it."""
    x = torch.randn(2, 3, 12, 12)
    y = torch.tensor([0, 1])
    prog = compiled(small_cnn(), x, "direct", 3)
    sched = prog.schedule
    b = next(b for b, keep in enumerate(sched.keeps) if keep and sched.streams[b] != 0)
    broken = dataclasses.replace(sched, keeps=sched.keeps[:b] + ((),) + sched.keeps[b + 1:])
    failures = 0
    for seed in range(40):
        try:
            simulate(prog, {"x": x, "labels": y}, seed, broken)
        except NameError:
            failures += 1
    assert failures > 0


def test_where_the_work_goes_on_a_residual_cnn():
    x = torch.randn(2, 3, 12, 12)
    prog = compiled(small_cnn(), x, "residual", 4)
    sched, blocks = prog.schedule, prog._built.blocks
    stream_of = {blk.label: s for blk, s in zip(blocks, sched.streams)}
    assert stream_of["forward"] == 0 and stream_of["scale"] == 0
    output = prog.plan.outputs[0]
    children = sorted(prog.wiring.successors(output))
    assert len(children) >= 2
    assert len({stream_of[f"error_{c}"] for c in children}) >= 2     # siblings side by side
    updates = {stream_of[f"update_{s}"] for s in prog.sites}
    assert len(updates) >= 3                                           # updates of sites too
    assert streams.verify(prog._built.rows, sched) == []
    code = prog.code.splitlines()
    assert code[2].strip() == "ST.begin()"
    assert any(line.strip().startswith("ST.enter(3") for line in code)
    assert sum("= ST.record()" in line for line in code) == len({e for w in sched.waits
                                                                 for e in w})


def test_a_chain_keeps_its_errors_on_one_stream():
    """Pairwise wiring on an MLP: each error depends on the previous one, so the error stage
    stays on the stream of the output error (no events between them)."""
    x = torch.randn(3, 5)
    prog = compiled(make_mlp(), x, "pairwise", 4)
    stream_of = {blk.label: s for blk, s in zip(prog._built.blocks, prog.schedule.streams)}
    assert {stream_of[f"error_{s}"] for s in prog.sites} == {0}


# -- options --------------------------------------------------------------------------------------
def test_auto_means_one_stream_on_the_cpu_and_the_code_is_unchanged():
    x = torch.randn(3, 5)
    model = make_mlp()
    auto = compiled(model, x, "pairwise", "auto")
    one = compiled(model, x, "pairwise", 1)
    assert auto.schedule is None and auto.code == one.code
    assert streams.resolve("auto", torch.device("cuda"), False) == streams.AUTO_STREAMS
    assert streams.resolve("auto", torch.device("cuda"), True) == 1
    assert streams.resolve(3, torch.device("cpu"), False) == 3


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "4", None])
def test_bad_stream_counts_are_refused(bad):
    with pytest.raises(OptionError) as info:
        fxlra.compile(make_mlp(), streams=bad)
    assert str(info.value) == (f"streams={bad!r} is not supported; pass 'auto' (4 CUDA streams "
                               "on a GPU, 1 elsewhere) or the number of streams (an int >= 1)")


def test_streams_and_placement_on_several_devices_are_refused():
    with pytest.raises(OptionError, match=r"^streams=2 cannot be combined with devices= "
                                          r"placement on 2 devices; pass streams=1 or 'auto'$"):
        fxlra.compile(make_mlp(), streams=2, devices=["cpu", "cpu"])


def test_step_with_streams_equals_the_reference_on_the_cpu():
    x, y = torch.randn(4, 3, 12, 12), torch.tensor([0, 1, 2, 3])
    model = small_cnn().double()
    prog = compiled(model, x.double(), "residual", 3)
    assert_matches_reference(prog, x.double(), y, "float64")


# -- on a GPU -------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("kernels", ["torch", "auto"])
def test_cuda_streams_give_the_one_stream_updates(kernels):
    x = torch.randn(8, 3, 16, 16, device="cuda")
    y = torch.randint(0, 4, (8,), device="cuda")
    model = small_cnn().cuda()
    one = compiled(model, x, "residual", 1, kernels=kernels)
    many = compiled(model, x, "residual", 4, kernels=kernels)
    many.load_state_dict(one.state_dict())
    assert isinstance(many._streams, streams.CudaStreams)
    caller = torch.cuda.current_stream()
    for _ in range(3):                  # BN statistics move: both programs see the same ones
        a, b = one.updates(x, y), many.updates(x, y)
        assert torch.cuda.current_stream() == caller
        assert_updates_match(b, a, "cuda_streams")


@needs_cuda
def test_cuda_streams_return_to_the_callers_stream_after_a_failure(monkeypatch):
    x = torch.randn(4, 3, 16, 16, device="cuda")
    y = torch.randint(0, 4, (4,), device="cuda")
    prog = compiled(small_cnn().cuda(), x, "residual", 4)
    calls = []

    def fail_on_a_side_stream(module, err, shape):
        calls.append(torch.cuda.current_stream())
        if len(calls) > 2:
            raise RuntimeError("synapse failed")
        return apply(module, err, shape)
    apply = fxlra.semantics.synapses.apply
    monkeypatch.setattr(fxlra.semantics.synapses, "apply", fail_on_a_side_stream)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        with pytest.raises(RuntimeError, match="synapse failed"):
            prog.step(x, y)
        assert torch.cuda.current_stream() == side
    assert any(s != side for s in calls)     # it did fail while on one of the program's streams
