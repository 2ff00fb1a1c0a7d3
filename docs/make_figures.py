"""Draw the pictures in docs/: the error wiring of ResNet-18 (CIFAR stem, ``wiring="residual"``)
and of the paper's 8x256 MLP under Algorithm 1 (``fxlra.wiring.blocks(2)``).

    python3 docs/make_figures.py            # from the repository root; needs matplotlib
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fxlra                      # noqa: E402  (the checkout's fxlra, installed or not)
import fxlra.draw                 # noqa: E402
import fxlra.models               # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FIGURES = {
    "resnet18_wiring.png": (
        fxlra.models.resnet18_cifar, "residual",
        "ResNet-18 (CIFAR stem), wiring=\"residual\": {sites} error sites, {synapses} error "
        "synapses"),
    "mlp_wiring_blocks.png": (
        lambda: fxlra.models.mlp(8, 256), fxlra.wiring.blocks(2),
        "8x256 tanh MLP, wiring=fxlra.wiring.blocks(2) (Algorithm 1): {sites} error "
        "sites, {synapses} error synapses"),
}


def main():
    torch.manual_seed(0)
    for name, (build, wiring, title) in FIGURES.items():
        prog = fxlra.compile(build(), wiring=wiring)
        title = title.format(sites=len(prog.sites), synapses=len(prog.plan.edges))
        path = fxlra.draw.draw(prog, os.path.join(HERE, name), title=title, dpi=100)
        print(f"{path}: {os.path.getsize(path) / 1024:.0f} KB")


if __name__ == "__main__":
    main()
