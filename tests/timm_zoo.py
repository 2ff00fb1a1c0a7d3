"""The timm models fxlra is checked on (randomly initialised, 10 classes, no weights downloaded),
shared by tests/test_timm.py and benchmarks/compile_time.py --timm.

Each entry: constructor keywords beyond ``num_classes`` and ``pretrained=False`` (a smaller image
size for the transformers, whose default is 224). Inputs are a batch of 2 at ``image_size``.
"""
import torch

# family -> {model name: constructor keywords}
FAMILIES = {
    "ResNet and kin": {
        "resnet18": {}, "resnet26d": {}, "resnext26ts": {}, "seresnet18": {},
        "legacy_seresnet18": {}, "skresnet18": {}, "res2net50_14w_8s": {}, "resnest14d": {},
        "dla34": {}, "dpn68": {}, "selecsls42b": {}, "xception41": {},
    },
    "mobile and efficient CNNs": {
        "efficientnet_b0": {}, "mobilenetv2_050": {}, "mobilenetv3_small_050": {},
        "mobilenetv4_conv_small": {}, "ghostnet_050": {}, "tinynet_e": {}, "mnasnet_050": {},
        "lcnet_050": {}, "rexnet_100": {},
    },
    "other CNNs": {
        "regnetx_002": {}, "regnety_002": {}, "densenet121": {}, "cspresnet50": {},
        "cspdarknet53": {}, "repvgg_a0": {}, "hrnet_w18_small": {}, "gernet_s": {},
        "ese_vovnet19b_dw": {}, "convnext_atto": {}, "convmixer_768_32": {},
    },
    "normaliser-free": {"nf_resnet26": {}, "nf_regnet_b0": {}},
    "ViT and DeiT": {
        "vit_tiny_patch16_224": dict(img_size=64),
        "deit_tiny_patch16_224": dict(img_size=64),
        "deit_tiny_distilled_patch16_224": dict(img_size=64),
        "beit_base_patch16_224": dict(img_size=64, depth=2),
        "eva02_tiny_patch14_224": dict(img_size=56),
        "cait_xxs24_224": dict(img_size=64),
        "xcit_nano_12_p16_224": dict(img_size=64),
        "pit_ti_224": dict(img_size=64),
    },
    "hierarchical transformers": {
        "swin_tiny_patch4_window7_224": dict(img_size=64, window_size=4),
        "pvt_v2_b0": {}, "twins_pcpvt_small": {}, "focalnet_tiny_srf": {},
        "mvitv2_tiny": dict(img_size=64),
        # symbolic tracing takes its masked branch (``if mask is not None`` of a default-None
        # input), a graph that fails on the batch: the default frontend uses torch.export
        "hiera_tiny_224": dict(img_size=64),
    },
    "MLPs": {
        "mixer_s16_224": dict(img_size=64), "resmlp_12_224": dict(img_size=64),
        "gmlp_ti16_224": dict(img_size=64), "poolformer_s12": {},
    },
    "hybrids": {
        "levit_128s": dict(img_size=64), "fastvit_t8": {}, "coat_lite_tiny": dict(img_size=64),
        "mobilevit_xxs": {}, "edgenext_xx_small": {}, "efficientvit_b0": {},
        "visformer_tiny": dict(img_size=64),
    },
}
MODELS = {name: kw for family in FAMILIES.values() for name, kw in family.items()}

# models fxlra refuses, with the words of the fix its error must name
REFUSED = {
    # pooled attention folds the heads into the batch axis (B * heads, C, H, W) before its
    # pooling convolutions, so a site there would have no per-sample layout (with
    # scope="stage", where that site joins its stage: its relative-position function, a timm
    # leaf, writes into its input in place, which no local VJP can differentiate)
    "mvitv2_tiny": "leaf_modules",
}

# models the default frontend captures with torch.export (symbolic tracing's graph fails)
EXPORTED = {"hiera_tiny_224"}

# the default tier: one model per thing this sweep found broken before (see test_timm.py)
DEFAULT_TIER = ("vit_tiny_patch16_224", "nf_resnet26", "coat_lite_tiny", "mobilevit_xxs",
                "xcit_nano_12_p16_224", "efficientnet_b0", "swin_tiny_patch4_window7_224",
                "mvitv2_tiny", "hiera_tiny_224")


def build(name):
    import timm
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **MODELS[name])
    return model.train()


def image_size(name):
    return MODELS[name].get("img_size", 64)


def example(name):
    s = image_size(name)
    return torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(0))
