"""Named sets of the options that decide how rec-LRA meets a CNN: fxlra's defaults, measured to
train (benchmarks/learning.py), and the paper's own mechanisms, one switch away.

    scope        "stage": the sites inside a stage of residual blocks (at most two, split at
                 every downsampling block) join its output site; "block": the same per residual
                 block (the paper's hybrid, Section 3); "layer": every activation is a site
                 (the per-layer rule)
    error_rule   "bootstrap": each error synapse is fitted to the error of the sites that read
                 its child, carried back by their local VJP (fxlra/analysis/bootstrap.py); "hebbian-z":
                 +gamma z_i e_j^T (the paper's rule for its MNIST models)
    norm_error   "vjp": a normalisation layer carries the error by its input-VJP with the
                 statistics the forward used, and the displacement into a site that a LayerNorm
                 or RMSNorm over its features reads goes through that norm's input-VJP at the
                 site's statistics (fxlra/analysis/normed.py); "pass": unchanged (the paper)
    map_synapse  "spatial": the error synapse from a vector error to a feature map is dense to
                 the map (coarsened past a budget); "broadcast": dense to channels, the same at
                 every position (the paper)
"""
from .errors import OptionError

PRESETS = {
    "fxlra": {"scope": "stage", "norm_error": "vjp", "map_synapse": "spatial",
              "error_rule": "bootstrap"},
    "paper": {"scope": "layer", "norm_error": "pass", "map_synapse": "broadcast",
              "error_rule": "hebbian-z"},
}


def resolve(preset, **given):
    """The options of ``preset`` (None: "fxlra"), with every option given (not None) kept."""
    name = "fxlra" if preset is None else preset
    if name not in PRESETS:
        raise OptionError(f"preset={preset!r} is not supported; choose one of {list(PRESETS)} "
                          "or None (fxlra's defaults)")
    unknown = sorted(set(given) - set(PRESETS[name]))
    assert not unknown, unknown
    return {k: (PRESETS[name][k] if v is None else v) for k, v in
            {**dict.fromkeys(PRESETS[name]), **given}.items()}
