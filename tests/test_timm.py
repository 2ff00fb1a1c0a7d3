"""timm's zoo: each model compiles with wiring="residual" and its generated program's updates
equal the reference interpreter's for every trainable parameter, or fxlra refuses it with an
error that names the fix. Randomly initialised models (no weights are downloaded).

The default tier runs ``timm_zoo.DEFAULT_TIER`` (the models that once failed: attention's
permuted q, k, v; a weight-standardised convolution; a shared module; timm's own fx leaves; a
parameter read for its dtype; BatchNormAct2d; a drop-path mask; heads folded into the batch; a
branch on a default-None input that symbolic tracing takes wrongly).
``test_every_timm_model`` sweeps all of ``timm_zoo.MODELS`` (59 models in 8 families) and is
marked ``slow``: ``FXLRA_SLOW=1 python3 -m pytest -q -m slow tests/test_timm.py`` (about two
minutes on 2 cores).
"""
import pytest
import torch

import fxlra
import timm_zoo
from helpers import assert_matches_reference

timm = pytest.importorskip("timm")


def check(name):
    model, x = timm_zoo.build(name), timm_zoo.example(name)
    y = torch.tensor([1, 2])
    if name in timm_zoo.REFUSED:    # at compile time, or at its first update
        with pytest.raises(fxlra.FxlraError, match=timm_zoo.REFUSED[name]):
            fxlra.compile(model, wiring="residual", example_inputs=(x,)).updates(x, y)
        return
    prog = fxlra.compile(model, wiring="residual", example_inputs=(x,))
    assert prog.frontend == ("export" if name in timm_zoo.EXPORTED else "fx")
    # the same dropout and drop-path masks in both
    updates, _ = assert_matches_reference(prog, x, y, "float32_timm", seed=1)
    for n, u in updates.items():
        assert torch.isfinite(u).all(), n


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
