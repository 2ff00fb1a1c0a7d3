"""Parallel streams for the generated program: which block of statements runs on which stream,
the events that join them, and the runtime that switches streams.

``schedule`` keeps the forward, the output errors and the final scale on stream 0 (the caller's
stream) and gives every other block (a site's error, its local updates, an error synapse's
update) one of ``n`` streams: the stream whose last block it reads (a child continues on its
parent's stream), else the least loaded one. So the children of an error site, and the updates
of different sites, run side by side. Three rules make this safe:

- ready: a block that reads a value made on another stream first waits on an event recorded on
  that stream after the value's block (vector clocks skip waits already implied by others);
- memory: the value is marked as used on the reading stream (``Tensor.record_stream``), so the
  caching allocator does not give its memory to new work before that stream is done with it;
- join: every side stream starts after an event of stream 0 and the final block waits for the
  last block of every side stream (what a CUDA graph capture requires).

``verify`` re-derives these rules from the rows alone. On the CPU the runtime is serial (the
statements run in program order, which every schedule allows).
"""
import contextlib
from dataclasses import dataclass

import torch

from .source import Row


@dataclass(frozen=True)
class Schedule:
    streams: tuple      # block -> stream
    waits: tuple        # block -> blocks whose end events it waits on
    keeps: tuple        # block -> variables it marks as used on its stream
    n: int
    inputs: tuple       # the program's arguments: made on stream 0 before it starts


def _producers(rows, nblocks, inputs):
    """block -> {variable: block that made the value it reads}, for values from other blocks
    (the arguments count as made by the first block)."""
    reads = [dict() for _ in range(nblocks)]
    made = dict.fromkeys(inputs, 0)
    for row in rows:
        if is_stream_statement(row):       # events: what waits say, not values
            continue
        for v in row.uses:
            if v in made and made[v] != row.block:
                reads[row.block].setdefault(v, made[v])
        for v in row.defs:
            made[v] = row.block
    return reads


def is_stream_statement(row):
    return row.text.startswith(("ST.", "ev_"))


def _sizes(rows, nblocks):
    size = [0] * nblocks
    for row in rows:
        size[row.block] += not row.text.startswith("#")
    return size


def schedule(rows, blocks, n, inputs):
    """Streams, waits and keeps for ``blocks`` (``fxlra.codegen.source.Block``) on ``n`` streams;
    ``inputs`` are the names of the program's arguments."""
    reads = _producers(rows, len(blocks), inputs)
    deps = [set(r.values()) for r in reads]
    size = _sizes(rows, len(blocks))
    stream, order, load = [], [[] for _ in range(n)], [0] * n
    for b, block in enumerate(blocks):
        if block.pinned:
            s = 0
        else:
            tips = [s for s in range(n) if order[s] and order[s][-1] in deps[b]]
            s = tips[0] if tips else min(range(n), key=lambda s: (load[s], s))
            load[s] += size[b]
        stream.append(s)
        order[s].append(b)
    for s in range(1, n):                   # fork from stream 0, join back at the end
        if order[s]:
            first = order[s][0]
            if not any(stream[d] == 0 for d in deps[first]):
                deps[first].add(max(b for b in order[0] if b < first))
            deps[len(blocks) - 1].add(order[s][-1])
    position = {b: k for s in range(n) for k, b in enumerate(order[s])}
    clock = [None] * len(blocks)            # block -> last position of each stream done before
    waits, keeps, kept = [], [], [set() for _ in range(n)]
    for b in range(len(blocks)):
        s = stream[b]
        now = _start_clock(clock, order, position, b, s, n)
        need = {}
        for d in deps[b]:
            t = stream[d]
            if t != s and position[d] > now[t]:
                need[t] = max(need.get(t, -1), position[d])
        wait = sorted(order[t][p] for t, p in need.items())
        for e in wait:
            now = _after_wait(now, clock, e, stream[e], position[e])
        clock[b] = now
        keep = sorted(v for v, d in reads[b].items() if stream[d] != s and (v, d) not in kept[s])
        kept[s].update((v, reads[b][v]) for v in keep)
        waits.append(tuple(wait))
        keeps.append(tuple(keep))
    return Schedule(tuple(stream), tuple(waits), tuple(keeps), n, tuple(inputs))


def _start_clock(clock, order, position, b, s, n):
    """What is known done when block ``b`` starts on stream ``s``: its stream's earlier blocks."""
    k = position[b]
    if k == 0:
        return [-1] * n
    prev = order[s][k - 1]
    now = list(clock[prev])
    now[s] = k - 1
    return now


def _after_wait(now, clock, e, stream, position):
    """What is known done after waiting on block ``e`` (at ``position`` on ``stream``): all
    that was known done when it started, and ``e`` itself."""
    now = [max(a, c) for a, c in zip(now, clock[e])]
    now[stream] = max(now[stream], position)
    return now


def verify(rows, sched):
    """Check the ready, memory and join rules of ``sched`` for ``rows``; returns the list of
    violations (empty when the schedule is safe)."""
    nblocks, n = len(sched.streams), sched.n
    reads = _producers(rows, nblocks, sched.inputs)
    order = [[b for b in range(nblocks) if sched.streams[b] == s] for s in range(n)]
    position = {b: k for s in range(n) for k, b in enumerate(order[s])}
    clock, problems, kept = [None] * nblocks, [], [set() for _ in range(n)]
    for b in range(nblocks):
        s = sched.streams[b]
        now = _start_clock(clock, order, position, b, s, n)
        for e in sched.waits[b]:
            if e >= b:
                problems.append(f"block {b} waits on block {e}, which is not recorded yet")
                continue
            now = _after_wait(now, clock, e, sched.streams[e], position[e])
        clock[b] = now
        kept[s].update((v, reads[b].get(v)) for v in sched.keeps[b])
        for v, d in sorted(reads[b].items()):
            t = sched.streams[d]
            if t != s and now[t] < position[d]:
                problems.append(f"block {b} (stream {s}) reads {v} before block {d} "
                                f"(stream {t}) is known to be done")
            if t != s and (v, d) not in kept[s]:
                problems.append(f"block {b} (stream {s}) reads {v} from stream {t} without "
                                "marking it used on its stream")
    last = nblocks - 1
    for s in range(1, n):
        if order[s] and clock[last][s] < len(order[s]) - 1:
            problems.append(f"stream {s} is not joined back before the end")
        if order[s] and clock[order[s][0]][0] < 0:
            problems.append(f"stream {s} does not start after an event of stream 0")
    return problems


def render_rows(rows, blocks, sched):
    """The rows with the stream statements in place: ``ST.begin()`` first; at the start of a
    block (after its comments), ``ST.enter(stream, wait=[...], keep=[...])`` when it changes
    stream, waits or keeps; at its end, ``ev_<block> = ST.record()`` when another block waits."""
    waited = {e for w in sched.waits for e in w}
    by_block = [[] for _ in blocks]
    for row in rows:
        by_block[row.block].append(row)
    out = [Row("ST.begin()", (), (), 0)]
    current = 0
    for b, block_rows in enumerate(by_block):
        s, wait, keep = sched.streams[b], sched.waits[b], sched.keeps[b]
        lead = 0
        while lead < len(block_rows) and block_rows[lead].text.startswith("#"):
            lead += 1
        out.extend(block_rows[:lead])
        if s != current or wait or keep:
            events = [f"ev_{blocks[e].label}" for e in wait]
            args = [str(s)] + [f"{k}=[{', '.join(v)}]" for k, v in
                               (("wait", events), ("keep", keep)) if v]
            out.append(Row(f"ST.enter({', '.join(args)})", (), tuple(events) + tuple(keep), b))
            current = s
        out.extend(block_rows[lead:])
        if b in waited:
            name = f"ev_{blocks[b].label}"
            out.append(Row(f"{name} = ST.record()", (name,), (), b))
    return out


def _tensors(value):
    return [t for t in torch.utils._pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


class SerialStreams:
    """The CPU runtime: one stream, statements in program order."""

    def begin(self):
        pass

    def enter(self, k, wait=(), keep=()):
        pass

    def record(self):
        return None

    def guard(self):
        return contextlib.nullcontext()


class CudaStreams:
    """Stream 0 is the caller's current stream at ``begin``; streams 1..n-1 are our own."""

    def __init__(self, device, n):
        self.device = device
        self.streams = [None] + [torch.cuda.Stream(device) for _ in range(n - 1)]

    def begin(self):
        self.streams[0] = torch.cuda.current_stream(self.device)

    def enter(self, k, wait=(), keep=()):
        stream = self.streams[k]
        torch.cuda.set_stream(stream)
        for event in wait:
            stream.wait_event(event)
        for value in keep:
            for t in _tensors(value):
                if t.device.type == "cuda":
                    t.record_stream(stream)

    def record(self):
        return torch.cuda.current_stream(self.device).record_event()

    @contextlib.contextmanager
    def guard(self):
        """Back on the caller's stream when the program returns or fails part-way through."""
        caller = torch.cuda.current_stream(self.device)
        try:
            yield
        finally:
            torch.cuda.set_stream(caller)


def runtime(device, n):
    """The stream runtime for a program generated with ``n`` streams on ``device``."""
    return CudaStreams(device, n) if device.type == "cuda" and n > 1 else SerialStreams()


def resolve(choice, device, placed):
    """The number of streams for the ``streams`` option on ``device``: ``"auto"`` gives 4 on a
    CUDA device and 1 elsewhere (and with ``devices=`` placement)."""
    if choice == "auto":
        return AUTO_STREAMS if device.type == "cuda" and not placed else 1
    return choice


AUTO_STREAMS = 4
