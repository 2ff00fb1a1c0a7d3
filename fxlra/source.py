"""The generated program's statements before they become text: each row is one statement with
the variables it defines and uses and the block it belongs to (the forward, a site's error, a
site's updates, an error synapse's update, the final scale). Rendering frees every value after
its last use; ``fxlra.streams`` uses the blocks to place work on parallel CUDA streams.
"""
from dataclasses import dataclass


@dataclass
class Row:
    text: str
    defs: tuple
    uses: tuple
    block: int


@dataclass
class Block:
    label: str          # a unique identifier: forward, error_<site>, update_<site>, ...
    pinned: bool        # runs on stream 0 (the caller's stream)


class Source:
    """Statements in program order, cut into blocks."""

    def __init__(self):
        self.rows = []
        self.blocks = [Block("forward", True)]

    def begin(self, label, pinned=False):
        """Start a new block: the statements that follow belong to it."""
        assert all(b.label != label for b in self.blocks), label
        self.blocks.append(Block(label, pinned))

    def add(self, text, defs=(), uses=()):
        self.rows.append(Row(text, tuple(defs), tuple(uses), len(self.blocks) - 1))

    def comment(self, text):
        self.add(f"# {text}")

    @staticmethod
    def render(rows):
        """The body's lines (indented once), with ``del`` after each value's last use."""
        last = {}
        for k, row in enumerate(rows):
            for v in row.defs + row.uses:
                last[v] = k
        lines = []
        for k, row in enumerate(rows):
            lines.append("    " + row.text)
            dead = sorted(v for v, at in last.items() if at == k)
            if dead and not row.text.startswith("return "):
                lines.append(f"    del {', '.join(dead)}")
        return lines
