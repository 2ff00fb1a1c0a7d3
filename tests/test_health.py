"""fxlra.runtime.health through Program.step: a non-finite loss, error or update stops the step before
anything changes and names the step and the first site in the error graph's order; the "skip"
option and its limit; inputs of the wrong shape or dtype (docs/design.md section 4)."""
import pytest
import torch

import fxlra
from conftest import make_cnn, make_mlp


def cnn_batch(b=4):
    return torch.randn(b, 3, 8, 8), torch.arange(b) % 5


def state(prog, opt=None):
    """Everything a step could change: state_dict (parameters, buffers, counters), .grad and the
    optimizer state."""
    snap = {k: v.clone() if torch.is_tensor(v) else dict(v) for k, v in prog.state_dict().items()}
    snap.update({f"grad:{n}": None if p.grad is None else p.grad.clone()
                 for n, p in prog.named_parameters()})
    if opt is not None:
        snap.update({f"opt:{i}:{k}": v.clone() for i, st in enumerate(opt.state.values())
                     for k, v in st.items()})
    return snap


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True,
                                       msg=f"{k} changed")
        else:
            assert a[k] == b[k], f"{k} changed"


def poison_synapse(prog, child):
    """NaN in one error synapse into ``child``: only that site's displacement, error and
    updates become NaN; the forward and the loss stay finite."""
    parent = prog.plan.parents(child)[0]
    with torch.no_grad():
        next(prog.synapse(parent, child).parameters()).fill_(float("nan"))


def trained_cnn(wiring="pairwise", **options):
    prog = fxlra.compile(make_cnn(), wiring=wiring, **options)
    opt = torch.optim.Adam(prog.parameters(), lr=1e-3)
    x, y = cnn_batch()
    prog.step(x, y)
    opt.step()                      # optimizer state exists, .grad is kept (no zero_grad)
    return prog, opt


def test_nan_at_one_site_stops_the_step_naming_it_and_changes_nothing():
    prog, opt = trained_cnn()
    child = prog.sites[1]
    poison_synapse(prog, child)
    before = state(prog, opt)
    with pytest.raises(fxlra.NumericalError) as info:
        prog.step(*cnn_batch())
    msg = str(info.value)
    assert msg.startswith(f"step 2: its error at site {child!r} is not finite"), msg
    assert "nonfinite='skip'" in msg
    assert isinstance(info.value, FloatingPointError)
    assert_same(before, state(prog, opt))         # BN running stats and counters included


def test_the_first_site_in_error_graph_order_is_named():
    """Pairwise wiring: a NaN displacement at a site spreads to every site below it; the one
    named is the first the error graph visits (the poisoned one, nearest the output)."""
    prog, _ = trained_cnn("pairwise")
    order = prog.plan.error_order()
    first = order[2]
    poison_synapse(prog, first)
    with pytest.raises(fxlra.NumericalError, match=f"at site {first!r}"):
        prog.step(*cnn_batch())


def test_a_non_finite_loss_names_the_output_site():
    prog = fxlra.compile(make_mlp())
    out = prog.plan.outputs[0]
    with torch.no_grad():
        prog.model[-1].bias.fill_(float("inf"))
    with pytest.raises(fxlra.NumericalError, match=f"step 1: the loss at site {out!r}"):
        prog.step(torch.randn(6, 5), torch.arange(6) % 4)


def test_an_update_whose_norm_overflows_is_named():
    """A huge but finite input overflows only the update's norm, not the forward: the update
    could not be re-projected, so the step stops."""
    prog = fxlra.compile(make_mlp(), wiring="direct")
    x = torch.randn(6, 5)
    x[0, 0] = 3e38
    with torch.no_grad():
        prog.model[0].weight.zero_()          # the forward ignores x: sites stay finite
    with pytest.raises(fxlra.NumericalError, match="the norm of the update of model.0.weight"):
        prog.step(x, torch.arange(6) % 4)


def test_skip_option_skips_and_stops_after_max_skips_in_a_row():
    prog, opt = trained_cnn(nonfinite="skip", max_skips=2)
    good = [p.detach().clone() for p in prog.synapses.parameters()]
    child = prog.sites[1]
    poison_synapse(prog, child)
    before = state(prog, opt)
    for k in (1, 2):
        out = prog.step(*cnn_batch())
        assert out.skipped
        after = state(prog, opt)
        assert after.pop("_extra_state") == {"steps": 1 + k, "skips": k}
        before.pop("_extra_state", None)
        assert_same(before, after)
    with pytest.raises(fxlra.NumericalError, match="after 2 skipped steps in a row"):
        prog.step(*cnn_batch())
    with torch.no_grad():                         # healed: the next good step resets the count
        for p, g in zip(prog.synapses.parameters(), good):
            p.copy_(g)
    assert not prog.step(*cnn_batch()).skipped
    assert prog.skips == 0 and prog.steps == 4


def test_unchecked_option_writes_whatever_it_computed():
    prog = fxlra.compile(make_cnn(), wiring="pairwise", nonfinite="unchecked")
    poison_synapse(prog, prog.sites[1])
    prog.step(*cnn_batch())
    assert any(not torch.isfinite(p.grad).all() for p in prog.model.parameters())


@pytest.mark.parametrize("option, value", [("nonfinite", "warn"), ("max_skips", 0),
                                           ("max_skips", 1.5)])
def test_bad_health_options_are_option_errors(option, value):
    with pytest.raises(fxlra.OptionError, match=option):
        fxlra.compile(make_mlp(), **{option: value})


BAD_INPUTS = {
    "channels": (torch.randn(4, 2, 8, 8), "2 channels/features instead of 3"),
    "rank": (torch.randn(4, 3, 8), "3 dimensions instead of 4"),
    "dtype": (torch.randn(4, 3, 8, 8, dtype=torch.float64), "dtype torch.float64 instead of"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_inputs_of_the_wrong_shape_or_dtype_are_input_errors_and_change_nothing(case):
    prog, opt = trained_cnn()
    x, needle = BAD_INPUTS[case]
    before = state(prog, opt)
    with pytest.raises(fxlra.InputError) as info:
        prog.step(x, torch.arange(4) % 5)
    assert needle in str(info.value) and "compiled for inputs like ('B', 3" in str(info.value)
    assert_same(before, state(prog, opt))


def test_nan_inputs_are_input_errors_and_change_nothing():
    prog, opt = trained_cnn()
    x, y = cnn_batch()
    x[1, 0, 2, 2] = float("nan")
    before = state(prog, opt)
    with pytest.raises(fxlra.InputError, match="NaN"):
        prog.step(x, y)
    assert_same(before, state(prog, opt))


def test_finite_inputs_whose_sum_overflows_are_not_called_non_finite():
    """The input check sums the batch first (fast); an overflowing sum of finite values falls
    back to the exact check instead of rejecting the batch."""
    from fxlra.rules import all_finite
    big = torch.full((4, 8), 3e38)
    assert not torch.isfinite(big.sum()) and all_finite(big)
    big[1, 2] = float("inf")
    assert not all_finite(big)
    assert not all_finite(torch.tensor([1.0, float("nan")]))


@pytest.mark.parametrize("labels, ok", [
    (torch.tensor([0, 1, 2, 1], dtype=torch.uint8), True),
    (torch.tensor([0, 1, 2, 1], dtype=torch.int16), True),
    (torch.tensor([True, False, True, False]), False),
    (torch.zeros(4, 3, dtype=torch.complex64), False)])
def test_label_dtypes(labels, ok):
    """Any integer dtype is a class index; bool and complex labels are input errors."""
    prog = fxlra.compile(make_mlp(n_in=4, widths=(5,), n_out=3))
    x = torch.randn(4, 4)
    if ok:
        prog.step(x, labels)
        reference = fxlra.compile(make_mlp(n_in=4, widths=(5,), n_out=3))
        reference.load_state_dict(prog.state_dict())
        assert torch.equal(prog.updates(x, labels)["model.2.weight"],
                           reference.updates(x, labels.long())["model.2.weight"])
    else:
        with pytest.raises(fxlra.InputError, match=f"labels have dtype {labels.dtype}"):
            prog.step(x, labels)
