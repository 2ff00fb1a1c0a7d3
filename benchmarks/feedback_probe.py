"""Can error synapses between feature maps carry the input-dependent part of the gradient that
the output's error alone cannot? A probe beside the learning benchmark (``benchmarks/learning.py``:
same models, digits, Adam lr 1e-3, batch 32, re-projection radius 1, seeds and batch order).

fxlra's default feeds every site of a CNN from the output's class error (the error graph of
``wiring="residual"`` there), so a site's feedback is one linear map of a 10-number error: the
same for every input with that error. A chain of sites (``wiring="pairwise"``) instead feeds
each site from the sites that read it, whose errors already differ from input to input. Between
two feature maps fxlra's synapse is "pointwise" (a 1x1 map); this probe gives those edges a
3x3 convolution instead (the parent's error resized to the child's map, then convolved: the
shape of a convolution's own transpose), as a user synapse module through ``synapses=``:

- ``default``: fxlra's defaults;
- ``chain-conv``: ``wiring="pairwise"``, every map-to-map synapse a 3x3 convolution;
- ``both-conv``: every site fed by the output and by the next site, the map-to-map synapses
  3x3 convolutions (their sum is fitted to the carried-back error);
- ``layer-chain-conv``: ``scope="layer"`` and ``wiring="pairwise"``: every activation a site,
  fed by the sites that read it through 3x3 convolutions, whose least-squares fit
  (``error_rule="bootstrap"``) is the convolution's transpose for an edge across one
  convolution: feedback learned to track the forward weights, layer by layer.

It prints a table (test accuracy after each epoch, each inner site's median update angle to
backprop's gradient after epoch 1) and writes benchmarks/results/feedback_probe.json.

    python3 benchmarks/feedback_probe.py                   # resnet18, presnet18, lcnet; seeds 0 1
    python3 benchmarks/feedback_probe.py --models lcnet --rows default chain-conv --seeds 0
"""
import copy
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn

import fxlra
from fxlra.frontend import shapes

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cnn_probe  # noqa: E402
import learning  # noqa: E402

RESULTS = os.path.join(learning.HERE, "results", "feedback_probe.json")


class ConvFeedback(nn.Module):
    """An error synapse from a (B, C_j, h, w) error to a (B, C_i, H, W) map: the error resized
    to H x W (nearest when growing, average when shrinking), then a 3x3 convolution."""

    def __init__(self, in_channels, out_channels, size, std=0.05):
        super().__init__()
        self.size = tuple(size)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 3, 3) * std)

    def forward(self, e):
        if tuple(e.shape[2:]) != self.size:
            grow = all(s >= t for s, t in zip(self.size, e.shape[2:]))
            e = F.interpolate(e, size=self.size) if grow else F.adaptive_avg_pool2d(e, self.size)
        return F.conv2d(e, self.weight, padding=1)


def _chain_and_output(sites):
    """Each inner site fed by the output and by the next site in forward order."""
    names = list(sites)
    out = names[-1]
    return {c: sorted({out, names[k + 1]}) for k, c in enumerate(names[:-1])}


# row -> (fxlra.compile options, whether map-to-map edges get ConvFeedback)
ROWS = {
    "default": ({}, False),
    "chain-conv": ({"wiring": "pairwise"}, True),
    "both-conv": ({"wiring": _chain_and_output}, True),
    "layer-chain-conv": ({"scope": "layer", "wiring": "pairwise"}, True),
}


def compile_row(model, row, extra, example):
    """``fxlra.compile`` with the row's options; its map-to-map synapses replaced by
    ConvFeedback modules where the row says so."""
    options, conv = ROWS[row]
    kwargs = {**extra, **options, "example_inputs": (example,)}
    if not conv:
        return fxlra.compile(model, **kwargs)
    probe = fxlra.compile(copy.deepcopy(model), **kwargs)
    nodes = {n.name: n for n in probe.graph_module.graph.nodes}   # their recorded shapes
    convs = {(e.parent, e.child): ConvFeedback(e.in_features, e.out_features,
                                               shapes.shape_of(nodes[e.child])[2:])
             for e in probe.plan.edges if probe.synapses[e.key].kind == "pointwise"}
    return fxlra.compile(model, synapses=convs, **kwargs)


def run(model_name, row, seed, epochs, data):
    model, extra, (x_train, y_train, x_test, y_test) = learning.cell(model_name, seed, data)
    prog = compile_row(model, row, extra, x_train[:2])
    opt = torch.optim.Adam(prog.parameters(), lr=1e-3)
    order = torch.Generator().manual_seed(seed)
    history, angles = [], None
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(x_train), generator=order)
        for k in range(0, len(x_train), 32):
            idx = perm[k:k + 32]
            prog.step(x_train[idx], y_train[idx])
            opt.step()
            opt.zero_grad(set_to_none=True)
        history.append(learning._accuracy(model, x_test, y_test))
        if epoch == 1:
            angles = learning._angles(prog, model, x_train[:256], y_train[:256])
    return {"model": model_name, "row": row, "seed": seed, "accuracy": history,
            "angles": angles}


def table(cells):
    def angles(mine):
        worst = statistics.mean(max(c["angles"].values()) for c in mine)
        median = statistics.mean(statistics.median(c["angles"].values()) for c in mine)
        return f"{worst:.0f} / {median:.0f}"
    return cnn_probe.probe_table(
        cells, ROWS, "worst / median inner site angle after epoch 1 (deg, mean)", angles)


def main(argv=None):
    # a model without residual blocks (the locally connected CNN) has no layer-chain-conv
    # of its own: with every activation a site, it is its chain-conv
    cnn_probe.probe_main(argv, __doc__.split("\n\n")[0], ("resnet18", "presnet18", "lcnet"),
                         ROWS, RESULTS, run, table,
                         skip=lambda m, r: r == "layer-chain-conv" and m == "lcnet")


if __name__ == "__main__":
    main()
