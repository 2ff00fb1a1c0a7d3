"""Layers from the rec-LRA paper that torch.nn lacks: the pseudo-convolution
(``PerturbativeConv2d``, ``perturbative``) and ``LocallyConnected2d``.

fx traces into user modules, so compile models holding these layers with
``fxlra.compile(model, leaf_modules=fxlra.nn.LEAF_MODULES, ...)``: each layer is then one op
with its own rec-LRA rule ("perturbative", "locally-connected" in fxlra.ops.local).
"""
from .locally_connected import LocallyConnected2d
from .perturbative import PerturbativeConv2d, Replacements, perturbative

LEAF_MODULES = (PerturbativeConv2d, LocallyConnected2d)

__all__ = ["PerturbativeConv2d", "LocallyConnected2d", "perturbative", "Replacements",
           "LEAF_MODULES"]
