"""The generated program's statements before they become text: each row is one statement with
the variables it defines and uses and the block it belongs to (the forward, a site's error, a
site's updates, an error synapse's update, the final scale). Rendering frees every value after
its last use; ``fxlra.streams`` uses the blocks to place work on parallel CUDA streams.
"""
import dataclasses
import re
import textwrap
from dataclasses import dataclass

from ..frontend import shapes

WIDTH = 100         # the longest line rendering makes (a single argument may be longer)
# the tokens of a generated statement that rendering looks at: string literals (skipped whole),
# numbers (so that 1e-3 holds no name), names, and brackets and commas
_TOKENS = re.compile(r"""(?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")|(?P<number>\d[\w.]*)"""
                     r"|(?P<name>[A-Za-z_]\w*)|(?P<mark>[()\[\]{},])")


@dataclass
class Row:
    text: str
    defs: tuple
    uses: tuple
    block: int
    note: str = ""      # a trailing comment (the value's shape)


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

    def add(self, text, defs=(), uses=(), note=""):
        self.rows.append(Row(text, tuple(defs), tuple(uses), len(self.blocks) - 1, note))

    def comment(self, text):
        self.add(f"# {text}")

    @staticmethod
    def render(rows):
        """The body's lines (indented once), with ``del`` after each value's last use; a value
        no statement reads is unpacked into ``_``."""
        last = {}
        for k, row in enumerate(rows):
            for v in row.defs + row.uses:
                last[v] = k
        lines = []
        for k, row in enumerate(rows):
            dead = sorted(v for v, at in last.items() if at == k)
            text, dead = _unpack_unused(row, dead)
            if text.startswith("# "):
                lines += textwrap.wrap(text, WIDTH - 4, initial_indent="    ",
                                       subsequent_indent="    # ", break_long_words=False)
            else:
                lines += ["    " + line for line in _wrapped(text, row.note)]
            if dead and not text.startswith("return "):
                lines += ["    " + line for line in _wrapped_del(dead)]
        return lines


def _unpack_unused(row, dead):
    """The row's text with each name of its tuple target that nothing reads (``dead`` at
    definition) as ``_``, and the names still to delete."""
    target, sep, value = row.text.partition(" = ")
    names = [t.strip() for t in target.split(",")]
    if not sep or len(names) < 2 or not all(n.isidentifier() or not n for n in names):
        return row.text, dead
    unused = [n for n in names if n in dead and n not in row.uses]
    if not unused:
        return row.text, dead
    target = ", ".join("_" if n in unused else n for n in names).rstrip()
    return f"{target} = {value}", [v for v in dead if v not in unused]


def _wrapped(text, note=""):
    """A statement as lines at most WIDTH wide once indented: broken after the commas inside its
    brackets (which keep it one statement), continuation lines 4 spaces deeper; the note (the
    value's shape) trails the last line where it fits."""
    cuts, depth = [], 0
    if len(text) + 4 > WIDTH:
        for tok in _TOKENS.finditer(text):
            mark = tok.group("mark")
            if mark and mark in "([{":
                depth += 1
            elif mark and mark in ")]}":
                depth -= 1
            elif mark == "," and depth:
                cuts.append(tok.end())
    pieces = [text[a:b].strip() for a, b in zip([0] + cuts, cuts + [len(text)])]
    lines = [pieces[0]]
    for piece in pieces[1:]:
        if len(lines[-1]) + len(piece) + 5 <= WIDTH:
            lines[-1] += " " + piece
        else:
            lines.append("    " + piece)
    if note and len(lines[-1]) + len(note) + 8 <= WIDTH:
        lines[-1] += f"  # {note}"
    return lines


def _wrapped_del(names):
    """``del`` statements for ``names``, each at most WIDTH wide once indented."""
    out, line = [], []
    for name in names:
        if line and len("    del " + ", ".join(line + [name])) > WIDTH:
            out.append("del " + ", ".join(line))
            line = []
        line.append(name)
    return out + ["del " + ", ".join(line)]


def rename(rows, new_name):
    """The rows with every name token of their code (not strings, not comments) passed
    through ``new_name`` (a name -> name function)."""
    names = {}                                    # each distinct name is renamed once

    def renamed(name):
        if name not in names:
            names[name] = new_name(name)
        return names[name]

    out = []
    for row in rows:
        if row.text.startswith("#"):
            out.append(row)
            continue
        text = _TOKENS.sub(lambda t: renamed(t.group("name")) if t.group("name") else t.group(0),
                           row.text)
        out.append(dataclasses.replace(row, text=text, defs=tuple(map(renamed, row.defs)),
                                       uses=tuple(map(renamed, row.uses))))
    return out


def readable(names):
    """name -> a readable one, for the ``_<index>`` names fx gives the children of an
    ``nn.Sequential`` (``names``: such name -> its readable form, e.g. ``linear_0``): the
    function renames them wherever they stand in a longer name (``err__2`` -> ``err_linear_2``)."""
    if not names:
        return lambda name: name
    pattern = re.compile(r"(?<![A-Za-z0-9])(" + "|".join(
        re.escape(n) for n in sorted(names, key=len, reverse=True)) + r")(?![0-9])")

    def new_name(name):
        return pattern.sub(lambda m: names[m.group(1)], name)
    return new_name


def sequential_names(gm, modules, taken):
    """Readable names for the children of an nn.Sequential, which fx names ``_0``, ``_1``...:
    the module's type and index (``linear_0``; its module ``m_linear_0``), where not ``taken``."""
    names = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and re.fullmatch(r"_\d+", node.name) and node.target.isdigit():
            name = f"{type(modules[node.target]).__name__.lower()}_{node.target}"
            if name not in taken and f"m_{name}" not in taken and name.isidentifier():
                names.update({node.name: name, f"m_{node.target}": f"m_{name}"})
                taken.add(name)
    return names


def shape_note(node):
    """The shape of a node's value as a comment, the batch axis as B ("(B, 16, 8, 8)"); ""
    where unknown."""
    shape = shapes.shape_of(node) if node is not None else None
    if not shape:
        return ""
    dims = [str(d) for d in shape]
    if node.op != "get_attr" and shapes.batch_first(node):
        dims[0] = "B"
    return f"({', '.join(dims)}{',' if len(dims) == 1 else ''})"
