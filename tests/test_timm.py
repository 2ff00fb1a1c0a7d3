"""timm's zoo: each model compiles with wiring="residual" and its generated program's updates
equal the reference interpreter's for every trainable parameter, or fxlra refuses it with an
error that names the fix. Randomly initialised models (no weights are downloaded).

The default tier runs ``timm_zoo.DEFAULT_TIER`` (the models that once failed: attention's
permuted q, k, v; a weight-standardised convolution; a shared module; timm's own fx leaves; a
parameter read for its dtype; BatchNormAct2d; a drop-path mask; heads folded into the batch).
``test_every_timm_model`` sweeps all of ``timm_zoo.MODELS`` (58 models in 8 families) and is
marked ``slow``: ``FXLRA_SLOW=1 python3 -m pytest -q -m slow tests/test_timm.py`` (about two
minutes on 2 cores).
"""
import pytest
import torch

import fxlra
import timm_zoo

timm = pytest.importorskip("timm")

# relative to the largest entry of each parameter's update, floored at 1e-3 of the largest entry
# of any update (an update that is zero in exact arithmetic differs by rounding only)
RTOL = 1e-3


def check(name):
    model, x = timm_zoo.build(name), timm_zoo.example(name)
    y = torch.tensor([1, 2])
    if name in timm_zoo.REFUSED:    # at compile time, or at its first update
        with pytest.raises(fxlra.FxlraError, match=timm_zoo.REFUSED[name]):
            fxlra.compile(model, wiring="residual", example_inputs=(x,)).updates(x, y)
        return
    prog = fxlra.compile(model, wiring="residual", example_inputs=(x,))
    torch.manual_seed(1)          # the same dropout and drop-path masks in both
    updates = prog.updates(x, y)
    torch.manual_seed(1)
    ref = prog.reference_updates(x, y)
    assert set(updates) == set(ref) == {n for n, _ in prog.named_parameters()}
    floor = 1e-3 * max(r.abs().max().item() for r in ref.values())
    for n, r in ref.items():
        assert torch.isfinite(updates[n]).all(), n
        scale = max(r.abs().max().item(), floor)
        assert (updates[n] - r).abs().max().item() <= RTOL * scale, n


@pytest.mark.parametrize("name", timm_zoo.DEFAULT_TIER)
def test_timm_model(name):
    check(name)


def test_the_zoo_covers_at_least_forty_models_across_families():
    assert len(timm_zoo.MODELS) >= 40 and len(timm_zoo.FAMILIES) >= 8
    assert set(timm_zoo.DEFAULT_TIER) <= set(timm_zoo.MODELS)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(timm_zoo.MODELS))
def test_every_timm_model(name, slow_enabled):
    check(name)
