"""What the generated update program calls besides torch and fxlra's rules: parameter reads,
the single-process ``reduce``, and the per-update batch scales.
"""

from ..ops.local import attribute


class Fetch:
    """Reads a parameter, buffer or constant of the GraphModule at call time (so .to() works)."""

    def __init__(self, gm):
        self.gm = gm

    def __call__(self, target):
        return attribute(self.gm, target)


class NoReduce:
    """The ``reduce`` of a single process: updates stay as they are."""

    def ready(self, tensors):
        pass

    def wait(self):
        pass


NO_REDUCE = NoReduce()


def over_batch(scales, batch):
    """Each update's scale divided by the batch size. A function, not a comprehension in the
    generated code: the comprehension would make ``batch`` a closure cell, and torch.compile
    breaks the graph where the program deletes a cell."""
    return [s / batch for s in scales]
