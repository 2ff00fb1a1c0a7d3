"""fxlra.draw: the picture of the sites and the error wiring is a valid, small PNG whose sites
carry their depth's colour; bad paths and a missing Matplotlib give clear errors."""
import pathlib
import struct
import sys

import pytest

import fxlra
from fxlra import draw as draw_mod
from conftest import make_cnn, make_mlp

pytestmark = pytest.mark.usefixtures("one_thread")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path):
    """(width, height) from the PNG's IHDR chunk."""
    head = pathlib.Path(path).read_bytes()[:24]
    assert head[:8] == PNG_MAGIC and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def _drawn_sites(fig):
    """{x position: (face colour, marker path's vertex count)} of every site on the figure."""
    ax = fig.axes[0]
    found = {}
    for coll in ax.collections:
        for (x, _), face in zip(coll.get_offsets(), coll.get_facecolors()):
            found[float(x)] = (tuple(round(float(c), 6) for c in face),
                               len(coll.get_paths()[0].vertices))
    return found


@pytest.mark.parametrize("build, wiring, scope, depths", [
    (make_mlp, "direct", "block", (0, 1)),
    (make_cnn, "residual", "layer", (0, 1, 2)),
    (make_cnn, "residual", "block", (0, 1)),
])
def test_draw_writes_a_png(tmp_path, build, wiring, scope, depths):
    pytest.importorskip("matplotlib")
    prog = fxlra.compile(build(), wiring=wiring, scope=scope)
    path = tmp_path / "wiring.png"
    assert draw_mod.draw(prog, path) == path
    width, height = _png_size(path)
    assert 400 < width < 4000 and 200 < height < 2000
    assert 5_000 < path.stat().st_size < 150_000
    assert sorted(set(prog.plan.depth.values())) == list(depths)


@pytest.mark.parametrize("build, wiring", [
    (make_mlp, "pairwise"),
    (make_mlp, {"_1": "_6", "_3": "_1", "_5": "_6"}),     # _1 -> _3 points forward
    (make_cnn, "residual"),
])
def test_figure_shows_sites_by_depth_and_every_synapse(build, wiring):
    pytest.importorskip("matplotlib")
    from matplotlib.patches import FancyArrowPatch
    prog = fxlra.compile(build(), wiring=wiring)
    fig = draw_mod.figure(prog)
    colors = draw_mod.depth_colors(prog)
    assert len(set(colors)) == len(colors) == max(prog.plan.depth.values()) + 1
    drawn = _drawn_sites(fig)
    assert sorted(drawn) == [float(k) for k in range(len(prog.sites))]   # forward order
    for k, site in enumerate(prog.sites):
        face = tuple(round(float(c), 6) for c in colors[prog.plan.depth[site]])
        assert drawn[float(k)][0] == face, site
    markers = {k: v[1] for k, v in drawn.items()}
    output = float(len(prog.sites) - 1)
    assert all(markers[output] != m for k, m in markers.items() if k != output)  # the star
    arcs = [p for p in fig.axes[0].patches if isinstance(p, FancyArrowPatch)]
    assert len(arcs) == prog.wiring.number_of_edges() == len(prog.plan.edges)
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == list(prog.sites)


def test_draw_takes_a_string_path_and_other_formats(tmp_path):
    pytest.importorskip("matplotlib")
    prog = fxlra.compile(make_mlp(), wiring=fxlra.wiring.blocks(2))
    png = str(tmp_path / "blocks.png")
    assert draw_mod.draw(prog, png, title="blocks(2)") == png
    _png_size(png)
    svg = tmp_path / "blocks.svg"
    draw_mod.draw(prog, svg)
    assert b"<svg" in svg.read_bytes()[:1000]


def test_draw_missing_folder(tmp_path):
    prog = fxlra.compile(make_mlp(), wiring="direct")
    missing = tmp_path / "no_such_folder"
    with pytest.raises(FileNotFoundError, match="no_such_folder.*does not exist"):
        draw_mod.draw(prog, missing / "wiring.png")
    assert not missing.exists()


def test_draw_path_must_be_a_path():
    prog = fxlra.compile(make_mlp(), wiring="direct")
    with pytest.raises(fxlra.OptionError, match="str or os.PathLike"):
        draw_mod.draw(prog, 42)


def test_draw_without_matplotlib(tmp_path, monkeypatch):
    prog = fxlra.compile(make_mlp(), wiring="direct")
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # `import matplotlib` now fails
    with pytest.raises(ImportError, match="pip install matplotlib"):
        draw_mod.draw(prog, tmp_path / "wiring.png")
    assert not (tmp_path / "wiring.png").exists()


def test_prog_draw_delegates_to_fxlra_draw(tmp_path):
    prog = fxlra.compile(make_mlp(), wiring="pairwise")
    path = tmp_path / "w.png"
    assert prog.draw(path) == path
    assert _png_size(path)[0] > 100
