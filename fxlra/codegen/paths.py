"""Critical paths: how many operations must run one after another in a step.

A rec-LRA step is a forward, an error stage and an update stage. The error stage is only as deep
as the error graph (a depth-1 site needs the output error and one synapse projection), and every
site's updates are independent of the others'; backprop's backward must visit every op of the
network in reverse, so it is as deep as the forward. Both are counted on the generated program's
own statements (one statement is one op or one fused helper call): a statement's depth is one
more than the deepest statement that defined a value it uses, within its stage.
"""
from . import streams


def longest_chain(rows):
    """The longest chain of dependent statements among ``rows`` [(defs, uses)]: statements
    that only hand values on (``reduce.ready``, no definitions) are not counted."""
    depth, best = {}, 0
    for defs, uses in rows:
        if not defs:
            continue
        d = 1 + max((depth.get(u, 0) for u in uses), default=0)
        for v in defs:
            depth[v] = d
        best = max(best, d)
    return best


def critical_paths(stages):
    """Sequential op counts of a rec-LRA step and of backprop's step on the same model.

    Backprop's backward mirrors the forward's longest chain (one vector-Jacobian product per op)
    and then needs the first layer's weight-gradient: forward + 1."""
    forward = longest_chain(stages["forward"])
    errors = longest_chain(stages["errors"])
    updates = longest_chain(stages["updates"])
    return {"forward": forward, "rec_lra_errors": errors, "rec_lra_updates": updates,
            "rec_lra_after_forward": errors + updates, "backprop_backward": forward + 1,
            "rec_lra_step": forward + errors + updates, "backprop_step": 2 * forward + 1}


def stream_span(rows, schedule):
    """(work, span) of what follows the forward on a stream schedule, one unit per statement:
    work is every statement of the blocks after the forward; span is when the last of them is
    done if the streams run side by side, a block starting once its stream's previous block
    and every block it waits on are done. work / span bounds what the streams can gain."""
    size = [0] * len(schedule.streams)
    for row in rows:
        size[row.block] += not (row.text.startswith("#") or streams.is_stream_statement(row))
    finish, last_on = [0] * len(size), {}
    for b, s in enumerate(schedule.streams):
        start = max([finish[last_on[s]] if s in last_on else 0] +
                    [finish[e] for e in schedule.waits[b]])
        finish[b] = start + size[b]
        last_on[s] = b
    return sum(size) - size[0], max(finish) - size[0]
