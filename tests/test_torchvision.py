"""Every torchvision classification model compiles with ``wiring="residual"`` and gets a finite
update of the right shape for every parameter (model and error synapses) on a batch of 2.

Two tiers:

- the default run covers every model family (``FAMILIES``): one full-size member each, at
  32x32 where the model accepts it, plus small instances of the transformer classes (ViT, Swin
  v1/v2, MaxViT) built with torchvision's own classes (same modules and code paths, fewer and
  narrower layers); about a minute on 2 idle CPU cores;
- ``test_every_torchvision_model`` sweeps ``torchvision.models.list_models()`` at full size.
  It is marked ``slow`` and skipped unless ``FXLRA_SLOW=1`` is set or ``-m slow`` is given:
  ``FXLRA_SLOW=1 pytest -q -m slow tests/test_torchvision.py`` (20-40 minutes on 2 cores).

Models stay in train mode, so GoogLeNet's and Inception v3's auxiliary heads are part of the
forward and their logits are output sites. Inputs are 3x64x64 where the model accepts them,
else 224 or 299 (ViT and MaxViT need 224, Inception v3's auxiliary head needs 299).
"""
import gc
from collections import Counter

import pytest
import torch
import torchvision
from torch import nn
from torchvision import models

import fxlra
from helpers import assert_matches_reference

NUM_CLASSES = 10
BATCH = 2
SIZES = (64, 224, 299)
# constructor keywords beyond num_classes; init_weights=False skips scipy's slow truncnorm init
EXTRA_KWARGS = {"googlenet": dict(aux_logits=True, init_weights=False),
                "inception_v3": dict(aux_logits=True, init_weights=False)}
# how many tensors each model returns in train mode (its output sites)
N_OUTPUTS = {"googlenet": 3, "inception_v3": 2}


def build(name):
    torch.manual_seed(0)
    return models.get_model(name, num_classes=NUM_CLASSES, **EXTRA_KWARGS.get(name, {}))


def input_for(model, sizes=SIZES):
    """A batch of 2 at the first size of ``sizes`` the model's forward accepts (train mode, as
    fxlra runs it; without grad, so nothing but BatchNorm statistics changes)."""
    problems = []
    for s in sizes:
        x = torch.randn(BATCH, 3, s, s)
        try:
            with torch.no_grad():
                model(x)
        except Exception as exc:   # a size the model rejects (ViT's fixed size, aux heads)
            problems.append(f"{s}: {type(exc).__name__}: {exc}")
            continue
        return x
    raise AssertionError(f"{type(model).__name__} accepts none of the sizes {sizes}: {problems}")


def check_compiles_and_updates(model, x, n_outputs=1, twice=False):
    """The checks every model must pass; returns the program."""
    prog = fxlra.compile(model, wiring="residual")
    plan = prog.plan
    plan.verify()
    assert plan.wiring == "residual"
    assert prog.sites[-1] == plan.outputs[0]
    assert len(plan.outputs) == n_outputs, plan.outputs

    # every model parameter has exactly one rule, owned by a real site
    model_params = [n for n, p in model.named_parameters() if p.requires_grad]
    counts = Counter(r.param for r in plan.params)
    assert set(counts) == set(model_params), set(counts) ^ set(model_params)
    assert all(c == 1 for c in counts.values()), [p for p, c in counts.items() if c > 1]
    assert all(r.site in prog.sites for r in plan.params)

    # every non-output site is reachable from an output
    depth = plan.depth
    assert all(depth[s] is not None and depth[s] >= 1 for s in prog.sites
               if s not in plan.outputs)

    y = torch.arange(x.shape[0]) % NUM_CLASSES
    updates = prog.updates(x, y)
    params = dict(prog.named_parameters())
    assert set(updates) == set(params), sorted(set(updates) ^ set(params))[:10]
    bad_shape = [n for n, p in params.items() if updates[n].shape != p.shape]
    assert not bad_shape, bad_shape[:10]
    nonfinite = [n for n, u in updates.items() if not torch.isfinite(u).all()]
    assert not nonfinite, nonfinite[:10]
    # the output site sees real errors: its parameters' updates are not all zero (SqueezeNet's
    # output site owns none: its last conv is followed by a ReLU site, then pooling)
    owned = [f"model.{r.param}" for r in plan.params if r.site == plan.outputs[0]]
    assert not owned or any(updates[n].abs().max() > 0 for n in owned)

    if twice:   # a second trace of the same model gives the same plan
        again = fxlra.compile(model, wiring="residual")
        assert again.plan == plan
        assert str(again.plan) == str(plan)
    return prog


# -- default tier: one small model per family -----------------------------------------------------
def _small_vit():
    # torchvision's VisionTransformer class, tiny: 32x32 inputs, 16 patches of 8x8, 2 layers
    return models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                    hidden_dim=16, mlp_dim=32, num_classes=NUM_CLASSES)


def _small_swin(v2=False):
    # torchvision's SwinTransformer class (swin_t / swin_v2_t code paths), 2 narrow stages
    from torchvision.models import swin_transformer as st
    extra = dict(block=st.SwinTransformerBlockV2, downsample_layer=st.PatchMergingV2) if v2 else {}
    return models.SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[2, 2],
                                  num_heads=[2, 2], window_size=[4, 4],
                                  stochastic_depth_prob=0.1, num_classes=NUM_CLASSES, **extra)


def _small_maxvit():
    # torchvision's MaxVit class (maxvit_t code path), 2 stages of 1 layer, 32x32 inputs
    return models.MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2,
                         block_channels=[8, 16], block_layers=[1, 1], head_dim=4,
                         stochastic_depth_prob=0.1, num_classes=NUM_CLASSES)


# family -> (constructor, input sizes to try, number of outputs, compile twice): full-size
# torchvision models at 32x32 where they accept it (else 64, 224 or 299), plus small instances
# of the transformer classes (they differ from the full-size ones in what the probe sizes hit).
FAMILIES = {
    "resnet18": (lambda: build("resnet18"), (32,), 1, True),
    "resnext50_32x4d": (lambda: build("resnext50_32x4d"), (32,), 1, False),
    "googlenet (aux heads)": (lambda: build("googlenet"), (64,), 3, True),
    "inception_v3 (aux head)": (lambda: build("inception_v3"), (299,), 2, False),
    "mobilenet_v2": (lambda: build("mobilenet_v2"), (32,), 1, False),
    "mobilenet_v3_small": (lambda: build("mobilenet_v3_small"), (32,), 1, False),
    "densenet121": (lambda: build("densenet121"), (32,), 1, False),
    "vgg11": (lambda: build("vgg11"), (32,), 1, False),
    "alexnet": (lambda: build("alexnet"), (64,), 1, False),
    "squeezenet1_1": (lambda: build("squeezenet1_1"), (32,), 1, False),
    "efficientnet_b0": (lambda: build("efficientnet_b0"), (32,), 1, False),
    "efficientnet_v2_s": (lambda: build("efficientnet_v2_s"), (32,), 1, False),
    "convnext_tiny": (lambda: build("convnext_tiny"), (32,), 1, True),
    "mnasnet0_5": (lambda: build("mnasnet0_5"), (32,), 1, False),
    "shufflenet_v2_x0_5": (lambda: build("shufflenet_v2_x0_5"), (32,), 1, False),
    "regnet_x_400mf": (lambda: build("regnet_x_400mf"), (32,), 1, False),
    "regnet_y_400mf": (lambda: build("regnet_y_400mf"), (32,), 1, False),
    "vit_b_16": (lambda: build("vit_b_16"), (224,), 1, False),
    "vit (small VisionTransformer)": (_small_vit, (32,), 1, True),
    "swin_t": (lambda: build("swin_t"), (64,), 1, False),
    "swin (small SwinTransformer)": (_small_swin, (32,), 1, True),
    "swin_v2 (small SwinTransformer V2)": (lambda: _small_swin(v2=True), (32,), 1, False),
    "maxvit (small MaxVit)": (_small_maxvit, (32,), 1, True),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family(family):
    make, sizes, n_outputs, twice = FAMILIES[family]
    model = make()
    model.train()
    x = input_for(model, sizes)
    check_compiles_and_updates(model, x, n_outputs, twice)


def test_resnet18_has_eight_residual_blocks_and_one_rule_per_parameter():
    model = build("resnet18")
    prog = fxlra.compile(model, wiring="residual", scope="block")
    plan = prog.plan
    assert len(plan.blocks) == 8
    assert sum(b.downsample for b in plan.blocks) == 3      # layer2/3/4 open with a 1x1 shortcut
    counts = Counter(r.param for r in plan.params)
    assert set(counts) == {n for n, _ in model.named_parameters()}
    assert set(counts.values()) == {1}
    # the shortcut conv belongs to its block's output site (docs/design.md "Owners")
    outputs = {b.output for b in plan.blocks}
    for r in plan.params:
        if ".downsample." in r.param:
            assert r.site in outputs, (r.param, r.site)
    # residual wiring: block outputs (and the stem's last site) hear the output directly
    root = plan.outputs[0]
    for b in plan.blocks:
        assert plan.parents(b.output) == (root,)
    assert fxlra.compile(build("resnet18"), wiring="residual", scope="block").plan == plan


# -- regressions found by the family tests (minimal models of the failing pieces) -----------------
class _SelfAttention(nn.Module):
    """ViT's encoder self-attention as torchvision writes it: nn.MultiheadAttention called with
    need_weights=False returns (output, None)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):                               # x: (B, T, 4)
        h = self.embed(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(torch.tanh(a).mean(1))


def test_multihead_attention_returning_none_weights_gets_updates():
    """The generated program took the attention's weight-gradient with torch.func.vjp over the
    module's whole output (a tuple holding None) and crashed; the reference handles it."""
    torch.manual_seed(0)
    model, x, y = _SelfAttention(), torch.randn(2, 5, 4), torch.tensor([0, 1])
    prog = fxlra.compile(model, wiring="direct", example_inputs=x)
    assert_matches_reference(prog, x, y, "float32")


class _WindowAttentionBlock(nn.Module):
    """Swin's attention half-block on a channels-last (B, H, W, C) map: the residual add after
    torchvision's shifted_window_attention function is an identity site."""

    def __init__(self):
        super().__init__()
        from torchvision.models.swin_transformer import ShiftedWindowAttention
        self.attn = ShiftedWindowAttention(8, [2, 2], [1, 1], 2)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):                       # x: (B, 4, 4, 8), channels last
        h = x + self.attn(x)
        h = h + torch.tanh(self.fc(h))
        return self.head(h.mean((1, 2)))


def test_site_after_window_attention_has_channels_last_layout():
    """The site's layout took channel_dim=1 (the height, 4) because the last parametrised op of
    its region is a function fxlra has no channel rule for; its features are the 8 channels on
    the last axis, and a displacement must be a map to those channels (docs/design.md, error
    synapses). With H == C this is silently wrong; on the small Swin it crashed in a synapse."""
    torch.manual_seed(0)
    model, x = _WindowAttentionBlock(), torch.randn(2, 4, 4, 8)
    prog = fxlra.compile(model, wiring="direct", example_inputs=x)
    site = prog.plan.sites[0]
    assert site.name == "add", prog.plan
    assert site.layout.kind == "spatial"
    assert (site.layout.channels, site.layout.channel_dim % 4) == (8, 3), site.layout
    updates = prog.updates(x, torch.tensor([0, 1]))
    assert all(torch.isfinite(u).all() for u in updates.values())


# -- slow tier: the whole of torchvision (conftest's slow_enabled) --------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", torchvision.models.list_models(module=torchvision.models))
def test_every_torchvision_model(name, slow_enabled):
    model = build(name)
    model.train()
    x = input_for(model)
    try:
        check_compiles_and_updates(model, x, N_OUTPUTS.get(name, 1))
    finally:
        del model
        gc.collect()
