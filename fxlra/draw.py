"""A picture of a compiled program: its error sites and the error graph that wires them.

``draw(prog, path)`` writes it to a file; ``figure(prog)`` returns the Matplotlib figure. It is
an arc diagram. The sites stand on one axis in forward order (the input side left, the output
site, a star, right), so the picture reads like the model; every error synapse
``parent -> child`` is an arc above the axis with its arrow at the child, coloured like its
parent. A site's colour and number are its depth in the error graph (the fewest synapses from
an output; the colour bar gives the scale), and grey bands mark the residual blocks fxlra found.

For the wirings fxlra builds this reads better than a layered layout by depth: ``"residual"`` on
ResNet-18 puts 9 of its 18 sites at depth 1 and 8 at depth 2, so the layers of a layered drawing
would be tall columns with the forward order lost, while the arcs show at a glance which sites
take their error from the output (long arcs) and which from their block's output (short ones).

networkx draws the sites and arcs on a ``matplotlib.figure.Figure`` rendered by Agg, so pyplot's
global state and backend are left alone. Matplotlib is imported only when a picture is made.
"""
import os
from types import SimpleNamespace

import networkx as nx

from .errors import OptionError

# site kind -> (marker, size in points^2, legend text)
MARKERS = {"output": ("*", 700, "output site"), "activation": ("o", 300, "activation site"),
           "identity": ("s", 260, "identity site")}
COLORMAP, COLOR_RANGE = "plasma", 0.85       # depth 0 darkest; the pale yellow end is left out
ARC_HEIGHT = 0.92                            # peak of the longest arc; the axes span [-0.13, 1]
BANDS = ("0.86", "0.93")                     # grey levels of alternate residual blocks


def _matplotlib():
    """The Matplotlib pieces used here, or an ImportError that says how to install it."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import BoundaryNorm, ListedColormap
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
    except ImportError as exc:
        raise ImportError("drawing a program needs matplotlib, which is not installed; install "
                          "it with `python3 -m pip install matplotlib` (fxlra's `examples` extra "
                          "includes it)") from exc
    return SimpleNamespace(colormaps=matplotlib.colormaps, Canvas=FigureCanvasAgg, Figure=Figure,
                           ScalarMappable=ScalarMappable, BoundaryNorm=BoundaryNorm,
                           ListedColormap=ListedColormap, Line2D=Line2D, Patch=Patch)


def _check_path(path):
    if not isinstance(path, (str, os.PathLike)):
        raise OptionError(f"draw's path must be a file name (str or os.PathLike), got "
                          f"{type(path).__name__}")
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write the picture to {os.fspath(path)!r}: the folder "
                                f"{folder!r} does not exist; create it first (os.makedirs) or "
                                "pass a path in an existing folder")


def depth_colors(prog):
    """The fill colour (RGBA) of every depth 0..max of ``prog``'s error graph, dark to light."""
    return _colors(_matplotlib(), prog.plan.depth)


def _colors(mpl, depth):
    top = max(depth.values())
    cmap = mpl.colormaps[COLORMAP]
    return [cmap(COLOR_RANGE * d / max(top, 1)) for d in range(top + 1)]


def _text_color(rgba):
    """Black on light fills, white on dark ones (relative luminance)."""
    r, g, b = rgba[:3]
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.5 else "white"


def _block_bands(ax, plan, index):
    """Alternating grey bands over the sites of each residual block: those after its input site,
    up to and including its output site."""
    for k, block in enumerate(plan.blocks):
        first = index[block.input] + 1 if block.input in index else 0
        ax.axvspan(first - 0.45, index[block.output] + 0.45, color=BANDS[k % 2], zorder=0,
                   linewidth=0)


def _arcs(ax, graph, pos, sizes, colors, depth):
    """One arc per synapse. arc3 bends in display space by ``rad`` times the arc's length, so
    ``rad`` is measured on the axes as laid out to make the longest arc peak at ARC_HEIGHT."""
    x = {s: p[0] for s, p in pos.items()}
    spans = [abs(x[p] - x[c]) for p, c in graph.edges()] or [1]
    (x0, y0), (x1, y1) = ax.transData.transform([(0, 0), (1, 1)])
    rad = min(0.9, 2.0 * ARC_HEIGHT * (y1 - y0) / (max(spans) * (x1 - x0)))
    for sign in (1, -1):              # up whichever way a synapse points along the axis
        edges = [(p, c) for p, c in graph.edges() if (x[p] > x[c]) == (sign > 0)]
        if edges:
            nx.draw_networkx_edges(
                graph, pos, edgelist=edges, ax=ax, arrows=True, arrowstyle="-|>", arrowsize=9,
                width=1.1, alpha=0.75, nodelist=list(pos), node_size=sizes,
                edge_color=[colors[depth[p]] for p, _ in edges],
                connectionstyle=f"arc3,rad={sign * rad}")


def _sites(ax, graph, plan, pos, colors, depth):
    for kind, (marker, size, _) in MARKERS.items():
        members = [s for s in pos if plan.site(s).kind == kind]
        if members:
            nx.draw_networkx_nodes(graph, pos, nodelist=members, node_shape=marker, ax=ax,
                                   node_size=size, node_color=[colors[depth[s]] for s in members],
                                   edgecolors="black", linewidths=0.8)
    for s, (x, y) in pos.items():
        ax.text(x, y, str(depth[s]), ha="center", va="center", fontsize=7, zorder=5,
                color=_text_color(colors[depth[s]]))
    ax.set_xticks(range(len(pos)))
    ax.set_xticklabels(list(pos), rotation=90, fontsize=8)
    ax.tick_params(axis="x", length=0, pad=9, labelbottom=True)    # networkx hides them
    ax.set_xlabel("error sites in forward order (input side left)", fontsize=8)
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _colorbar(mpl, fig, cax, colors):
    top = len(colors) - 1
    norm = mpl.BoundaryNorm([d - 0.5 for d in range(top + 2)], top + 1)
    bar = fig.colorbar(mpl.ScalarMappable(norm=norm, cmap=mpl.ListedColormap(colors)), cax=cax)
    bar.set_label("depth in the error graph", fontsize=8)
    bar.set_ticks(range(0, top + 1, max(1, (top + 1) // 10)))
    bar.ax.tick_params(labelsize=7)


def _legend(mpl, ax, plan, width):
    kinds = {s.kind for s in plan.sites}
    handles = [mpl.Line2D([], [], marker=m, linestyle="", markersize=9 if m == "*" else 7,
                          markerfacecolor="white", markeredgecolor="black", label=text)
               for kind, (m, _, text) in MARKERS.items() if kind in kinds]
    handles.append(mpl.Line2D([], [], color="0.3", label="error synapse (arrow at the child)"))
    if plan.blocks:
        handles.append(mpl.Patch(color=BANDS[0], label="residual block"))
    ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False,
              ncol=max(2, min(len(handles), int(width // 2.8))), fontsize=8)


def figure(prog, *, title=None, dpi=110):
    """The picture as a ``matplotlib.figure.Figure`` (a notebook shows it inline)."""
    mpl = _matplotlib()
    plan, graph = prog.plan, prog.wiring
    depth = dict(plan.depth)
    pos = {s: (float(k), 0.0) for k, s in enumerate(prog.sites)}
    colors = _colors(mpl, depth)
    n = len(pos)

    width = max(6.5, 0.5 * n + 3.0)
    fig = mpl.Figure(figsize=(width, 4.6), dpi=dpi)
    mpl.Canvas(fig)
    ax = fig.add_axes([0.4 / width, 0.30, 1.0 - 1.5 / width, 0.52])
    ax.set_xlim(-0.7, n - 0.3)
    ax.set_ylim(-0.13, 1.0)
    _block_bands(ax, plan, {s: k for k, s in enumerate(pos)})
    ax.axhline(0.0, color="0.6", linewidth=0.8, zorder=1)
    _arcs(ax, graph, pos, [MARKERS[plan.site(s).kind][1] for s in pos], colors, depth)
    _sites(ax, graph, plan, pos, colors, depth)
    _colorbar(mpl, fig, fig.add_axes([1.0 - 0.95 / width, 0.30, 0.12 / width, 0.52]), colors)
    _legend(mpl, ax, plan, width)
    fig.suptitle(title or f"{type(prog.model).__name__}: {n} error sites, "
                 f"{graph.number_of_edges()} error synapses, wiring {plan.wiring}",
                 fontsize=11, y=0.97)
    return fig


def draw(prog, path, *, title=None, dpi=110):
    """Draw ``prog``'s sites and error wiring to ``path`` (PNG, or any format Matplotlib knows
    by the file's suffix) and return ``path``. ``title`` replaces the default heading."""
    _check_path(path)
    figure(prog, title=title, dpi=dpi).savefig(path, dpi=dpi, bbox_inches="tight")
    return path
