"""fxlra.codegen.paths: critical paths counted on the generated program. The error stage of a direct
wiring does not grow with the network's depth; a pairwise chain's does; backprop's backward
always does."""
import ast
import dataclasses

import pytest
from torch import nn

import fxlra
from fxlra.codegen import paths
from fxlra.codegen.paths import longest_chain

from conftest import make_cnn


def test_longest_chain_counts_dependent_statements_only():
    rows = [(("a",), ("x",)), (("b",), ("x",)), (("c",), ("a", "b")), ((), ("c",)),
            (("d",), ("c",)), (("e",), ("x",))]
    assert longest_chain(rows) == 3            # a -> c -> d; the hand-off row is not an op


def mlp(depth):
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(6, 6), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(6, 3))


@pytest.mark.parametrize("wiring", ["direct", "pairwise"])
def test_error_stage_depth_follows_the_error_graph(wiring):
    shallow = fxlra.compile(mlp(3), wiring=wiring).critical_paths()
    deep = fxlra.compile(mlp(6), wiring=wiring).critical_paths()
    assert deep["forward"] - shallow["forward"] == 6           # 3 more Linear + Tanh
    assert deep["backprop_backward"] - shallow["backprop_backward"] == 6
    grows = deep["rec_lra_errors"] - shallow["rec_lra_errors"]
    if wiring == "direct":
        assert grows == 0
    else:                                    # the same statements for each of 3 more sites
        assert grows > 0 and grows % 3 == 0
    assert deep["rec_lra_updates"] == shallow["rec_lra_updates"]   # updates are independent
    c = deep
    assert c["rec_lra_step"] == c["forward"] + c["rec_lra_errors"] + c["rec_lra_updates"]
    assert c["backprop_step"] == c["forward"] + c["backprop_backward"]


def test_stream_span_of_a_schedule():
    """One stream: the span is all the work. Four streams on a residual CNN: the work is the
    same statements, the span is shorter but no shorter than a quarter of the work."""
    prog = fxlra.compile(make_cnn(), wiring="residual", streams=4)
    rows, sched = prog._built.rows, prog.schedule
    work, span = paths.stream_span(rows, sched)
    serial = dataclasses.replace(sched, streams=(0,) * len(sched.streams),
                                 waits=((),) * len(sched.waits))
    assert paths.stream_span(rows, serial) == (work, work)
    assert work / 4 <= span < work
    one = fxlra.compile(make_cnn(), wiring="residual", streams=1)
    body = [s for s in ast.parse(one.code).body[0].body[1:]         # after the docstring
            if not isinstance(s, ast.Delete)]
    forward = sum(1 for r in rows if r.block == 0 and not r.text.startswith(("#", "ST.", "ev_")))
    assert work == len(body) - forward
