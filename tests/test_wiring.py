"""fxlra.wiring: the presets (direct, pairwise, blocks(g), skip(g), residual at depth 2 and 3),
custom error graphs in every accepted form, and the rejection of invalid ones with a
WiringError naming the offending sites (docs/design.md section 1, "Error graph (wiring)")."""
import networkx as nx
import pytest
import torch
import torchvision

import fxlra
from conftest import make_mlp

N_HIDDEN = 6


@pytest.fixture(scope="module")
def chain():
    """An MLP chain with N_HIDDEN activation sites and the output, in forward order."""
    torch.manual_seed(0)
    return make_mlp(n_in=5, widths=(7,) * N_HIDDEN, n_out=4)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def parents(prog):
    """child -> sorted parents, from prog.wiring (edges parent -> child)."""
    g = prog.wiring
    assert isinstance(g, nx.DiGraph)
    return {s: sorted(g.predecessors(s)) for s in g.nodes}


def inner_and_root(prog):
    sites = list(prog.sites)
    assert len(sites) == N_HIDDEN + 1
    return sites[:-1], sites[-1]


# -- presets on a chain -----------------------------------------------------------------------------
def test_direct_every_site_gets_its_error_from_the_output(chain):
    prog = fxlra.compile(chain, wiring="direct")
    inner, root = inner_and_root(prog)
    assert parents(prog) == {**{s: [root] for s in inner}, root: []}
    assert set(prog.plan.depth.values()) == {0, 1}


def test_pairwise_is_l_plus_1_to_l(chain):
    prog = fxlra.compile(chain, wiring="pairwise")
    sites = list(prog.sites)
    expected = {s: [sites[k + 1]] for k, s in enumerate(sites[:-1])}
    expected[sites[-1]] = []
    assert parents(prog) == expected
    assert [prog.plan.depth[s] for s in sites] == list(range(len(sites) - 1, -1, -1))


def expected_blocks(inner, root, g):
    """Algorithm 1: number inner sites 1..L-1; l % g == 0 -> L, else l+1 (L when l+1 == L)."""
    out = {}
    for l, s in enumerate(inner, start=1):
        out[s] = [root] if l % g == 0 or l == len(inner) else [inner[l]]
    return out


def expected_skip(inner, root, g):
    """The site g positions downstream, or L if fewer remain."""
    return {s: [inner[l - 1 + g]] if l - 1 + g < len(inner) else [root]
            for l, s in enumerate(inner, start=1)}


@pytest.mark.parametrize("g", [1, 2, 3, 4, N_HIDDEN, N_HIDDEN + 3])
def test_blocks_g_follows_algorithm_1(chain, g):
    prog = fxlra.compile(chain, wiring=fxlra.wiring.blocks(g))
    inner, root = inner_and_root(prog)
    assert parents(prog) == {**expected_blocks(inner, root, g), root: []}


@pytest.mark.parametrize("g", [1, 2, 3, N_HIDDEN, N_HIDDEN + 3])
def test_skip_g_parent_is_g_positions_downstream(chain, g):
    prog = fxlra.compile(chain, wiring=fxlra.wiring.skip(g))
    inner, root = inner_and_root(prog)
    assert parents(prog) == {**expected_skip(inner, root, g), root: []}


@pytest.mark.parametrize("wiring, expected", [
    ("blocks", lambda s1, s2, s3, s4, s5, s6, root: {s1: [s2], s2: [root], s3: [s4], s4: [root],
                                                     s5: [s6], s6: [root], root: []}),
    ("skip", lambda s1, s2, s3, s4, s5, s6, root: {s1: [s3], s2: [s4], s3: [s5], s4: [s6],
                                                   s5: [root], s6: [root], root: []})])
def test_gap_2_on_six_sites_by_hand(chain, wiring, expected):
    prog = fxlra.compile(chain, wiring=getattr(fxlra.wiring, wiring)(2))
    inner, root = inner_and_root(prog)
    assert parents(prog) == expected(*inner, root)


def test_skip_1_equals_pairwise(chain):
    a = fxlra.compile(chain, wiring=fxlra.wiring.skip(1))
    b = fxlra.compile(chain, wiring="pairwise")
    assert sorted(a.wiring.edges()) == sorted(b.wiring.edges())
    assert [(e.parent, e.child) for e in a.plan.edges] == [(e.parent, e.child) for e in b.plan.edges]


def test_blocks_1_equals_direct(chain):
    a = fxlra.compile(chain, wiring=fxlra.wiring.blocks(1))
    b = fxlra.compile(chain, wiring="direct")
    assert sorted(a.wiring.edges()) == sorted(b.wiring.edges())


def test_wiring_graph_is_a_copy_over_all_sites(chain):
    prog = fxlra.compile(chain, wiring="pairwise")
    g = prog.wiring
    assert set(g.nodes) == set(prog.sites)
    g.remove_edge(*next(iter(g.edges)))
    assert prog.wiring.number_of_edges() == N_HIDDEN      # the program's graph is untouched


# -- residual on torchvision's resnet18 -------------------------------------------------------------
def _stage(site):
    return site.split("_")[0]          # "layer3_1_relu_1" -> "layer3"


def _block(site):
    return "_".join(site.split("_")[:2])   # "layer3_1_relu_1" -> "layer3_1"


def test_residual_resnet18_block_scope_feeds_every_block_output_from_the_output(resnet):
    prog = fxlra.compile(resnet, wiring="residual", scope="block")
    root = prog.sites[-1]
    blocks = [b.output for b in prog.plan.blocks]
    assert len(blocks) == 8 and prog.sites == (prog.plan.blocks[0].input, *blocks, root)
    assert all(prog.plan.parents(s) == (root,) for s in prog.sites[:-1])
    stage = fxlra.compile(resnet, wiring="residual", scope="stage")
    assert [b.output for b in stage.plan.blocks] == blocks[1::2]  # the last block of each stage
    assert stage.sites == (prog.plan.blocks[0].input, *blocks[1::2], root)


def test_residual_resnet18_depth_2(resnet):
    prog = fxlra.compile(resnet, wiring="residual", scope="layer")
    plan, par = prog.plan, parents(prog)
    root = prog.sites[-1]
    assert root == "fc" and plan.outputs == ("fc",)
    blocks = [b.output for b in plan.blocks]
    assert len(blocks) == 8
    assert [_block(b) for b in blocks] == [f"layer{s}_{k}" for s in (1, 2, 3, 4) for k in (0, 1)]
    assert [b.downsample for b in plan.blocks] == [False, False, True, False, True, False, True,
                                                   False]
    stem = plan.blocks[0].input
    assert stem == "relu" and stem in prog.sites and not stem.startswith("layer")
    assert len(prog.sites) == 18
    depth = plan.depth
    for s in prog.sites[:-1]:
        if s in blocks or s == stem:
            assert par[s] == [root], s
            assert depth[s] == 1, s
        else:                            # the inner site of a block: error from its block output
            (out,) = [b for b in blocks if _block(b) == _block(s)]
            assert par[s] == [out], s
            assert depth[s] == 2, s


def test_residual_resnet18_depth_3_groups_blocks_by_stage(resnet):
    prog = fxlra.compile(resnet, wiring="residual", depth=3, scope="layer")
    plan, par = prog.plan, parents(prog)
    root, stem = "fc", plan.blocks[0].input
    blocks = [b.output for b in plan.blocks]
    stage_out = {}
    for b in blocks:
        stage_out[_stage(b)] = b       # the last block of each stage
    assert len(stage_out) == 4
    assert par[stem] == [root]
    for b in blocks:
        if b == stage_out[_stage(b)]:
            assert par[b] == [root], b
            assert plan.depth[b] == 1
        else:
            assert par[b] == [stage_out[_stage(b)]], b
            assert plan.depth[b] == 2
    for s in prog.sites[:-1]:
        if s not in blocks and s != stem:
            (out,) = [b for b in blocks if _block(b) == _block(s)]
            assert par[s] == [out], s
            assert plan.depth[s] == plan.depth[out] + 1
    assert max(plan.depth.values()) == 3


def test_residual_depth_4_is_rejected(resnet):
    with pytest.raises(fxlra.WiringError, match="depth"):
        fxlra.compile(resnet, wiring="residual", depth=4)


# -- custom wirings ---------------------------------------------------------------------------------
def _custom_expected(prog):
    """A non-preset graph: s1 <- s3 and L, every other inner site from L."""
    inner, root = inner_and_root(prog)
    exp = {s: [root] for s in inner}
    exp[inner[0]] = sorted([inner[2], root])
    exp[root] = []
    return exp


def test_custom_networkx_digraph(chain):
    sites = fxlra.compile(chain, wiring="direct").sites
    inner, root = list(sites[:-1]), sites[-1]
    g = nx.DiGraph([(root, s) for s in inner] + [(inner[2], inner[0])])
    prog = fxlra.compile(chain, wiring=g)
    assert parents(prog) == _custom_expected(prog)
    assert prog.plan.wiring == "custom"


def test_custom_mapping_child_to_parent_and_to_parents(chain):
    sites = fxlra.compile(chain, wiring="direct").sites
    inner, root = list(sites[:-1]), sites[-1]
    single = {s: root for s in inner[1:]}
    single[inner[0]] = [inner[2], root]
    prog = fxlra.compile(chain, wiring=single)
    assert parents(prog) == _custom_expected(prog)
    assert sorted(prog.plan.parents(inner[0])) == sorted([inner[2], root])
    listed = {s: [root] for s in inner[1:]}
    listed[inner[0]] = (inner[2], root)
    assert parents(fxlra.compile(chain, wiring=listed)) == _custom_expected(prog)


def test_custom_callable_receives_the_site_names(chain):
    seen = []

    def wire(sites):
        seen.append(tuple(sites))
        inner, root = list(sites[:-1]), sites[-1]
        return [(root, s) for s in inner] + [(inner[2], inner[0])]
    prog = fxlra.compile(chain, wiring=wire)
    assert seen == [tuple(prog.sites)]
    assert parents(prog) == _custom_expected(prog)


# -- invalid wirings --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def names(chain):
    sites = fxlra.compile(chain, wiring="direct").sites
    return list(sites[:-1]), sites[-1]


def _wiring_error(chain, spec, **kw):
    with pytest.raises(fxlra.WiringError) as info:
        fxlra.compile(chain, wiring=spec, **kw)
    assert isinstance(info.value, ValueError)
    return str(info.value)


def test_cycle_is_rejected_naming_its_sites(chain, names):
    inner, root = names
    spec = {s: root for s in inner}
    spec[inner[1]] = inner[3]
    spec[inner[3]] = inner[1]              # s2 <- s4 <- s2
    msg = _wiring_error(chain, spec)
    assert "cycle" in msg
    assert f"'{inner[1]}'" in msg and f"'{inner[3]}'" in msg


def test_unknown_site_is_rejected_naming_it(chain, names):
    inner, root = names
    spec = {s: root for s in inner}
    spec[inner[0]] = "no_such_site"
    msg = _wiring_error(chain, spec)
    assert "no_such_site" in msg and "unknown" in msg


def test_site_without_parent_is_rejected_naming_it(chain, names):
    inner, root = names
    spec = {s: root for s in inner if s != inner[4]}
    msg = _wiring_error(chain, spec)
    assert f"'{inner[4]}'" in msg
    assert all(f"'{s}'" not in msg for s in inner if s != inner[4])


def test_edge_into_the_output_is_rejected_naming_it(chain, names):
    inner, root = names
    g = nx.DiGraph([(root, s) for s in inner] + [(inner[5], root)])
    msg = _wiring_error(chain, g)
    assert f"{inner[5]} -> {root}" in msg


def test_self_loop_is_rejected_naming_the_site(chain, names):
    inner, root = names
    g = nx.DiGraph([(root, s) for s in inner] + [(inner[2], inner[2])])
    msg = _wiring_error(chain, g)
    assert f"'{inner[2]}'" in msg


def test_callable_returning_bad_edges_is_rejected(chain):
    msg = _wiring_error(chain, lambda sites: [(sites[0], sites[1])])
    assert "no error" in msg or "parent" in msg


@pytest.mark.parametrize("make", [lambda: fxlra.wiring.blocks(0), lambda: fxlra.wiring.skip(-1),
                                  lambda: fxlra.wiring.skip(0), lambda: fxlra.wiring.blocks(1.5),
                                  lambda: fxlra.wiring.skip(True)])
def test_bad_gaps_are_rejected(make):
    with pytest.raises(fxlra.WiringError, match="gap"):
        make()


def test_unknown_preset_string_is_rejected_naming_it(chain):
    msg = _wiring_error(chain, "diagonal")
    assert "'diagonal'" in msg
    assert "direct" in msg and "pairwise" in msg and "residual" in msg


def test_wiring_of_an_unsupported_type_is_rejected(chain):
    msg = _wiring_error(chain, 42)
    assert "42" in msg


def test_invalid_wiring_builds_nothing(chain, names):
    """A rejected wiring leaves the model untouched (no .grad, same values)."""
    inner, root = names
    before = [p.clone() for p in chain.parameters()]
    _wiring_error(chain, {inner[0]: "nowhere"})
    assert all(torch.equal(a, b) and b.grad is None for a, b in zip(before, chain.parameters()))
