"""The Plan: the frozen, printable, verifiable result of analysis and wiring.

A Plan says, by fx node name, where every error site is, which nodes form its region (the ops
between the previous sites and it, through which its error is carried locally), which parameter
is updated by which rule with which site's error, and which error synapses connect the sites.
The reference interpreter and the code generator both read only the Plan and the GraphModule.
"""
from dataclasses import dataclass, field
from types import MappingProxyType

SITE_KINDS = ("output", "activation", "identity")
SYNAPSE_KINDS = ("dense", "spatial", "broadcast", "pointwise", "pool")


@dataclass(frozen=True)
class Layout:
    """How a site's tensor holds its features: a vector (B, C) or a spatial map with C channels
    on ``channel_dim`` (1 for NCHW maps, -1 for tokens and channels-last tensors)."""
    kind: str
    channels: int
    channel_dim: int

    def __str__(self):
        if self.kind == "vector":
            return f"vector[{self.channels}]"
        return f"spatial[{self.channels}@{self.channel_dim}]"


@dataclass(frozen=True)
class Site:
    name: str            # the fx node whose output is z
    kind: str            # "output", "activation" or "identity"
    h: str               # the node holding the pre-activation (== name for identity/output)
    activation: str      # what phi is: "identity", "softmax", "Tanh", "relu", ...
    layout: Layout
    region: tuple        # nodes whose output error is this site's, in forward order (site last)
    ops: tuple           # parametrised ops in the region, in forward order
    crosses: tuple = ()  # activations inside the region that its error crosses by their VJP
                         # (scope="block": the sites inside a residual block joined its output)


@dataclass(frozen=True)
class ParamRule:
    param: str           # qualified parameter name in the model
    op: str              # the fx node that uses it
    rule: str            # "linear", "conv", "batchnorm", ..., "local-vjp"
    site: str            # the owner site whose error drives it
    key: str = ""        # how the op names it: its module's own attribute, or the get_attr target


@dataclass(frozen=True)
class Block:
    """A residual block found at a merge (an add whose inputs include a skip path): its output
    site, the site feeding it (None: the model input), and whether its skip path has
    parametrised ops (a downsample shortcut)."""
    output: str
    input: object
    downsample: bool


def stages_of(blocks, most=None):
    """Residual blocks grouped into stages (a stage starts at a block with a downsample
    shortcut, or after ``most`` blocks), each stage as one Block from its first block's input
    to its last one's output."""
    groups = []
    for b in blocks:
        if not groups or b.downsample or (most is not None and len(groups[-1]) == most):
            groups.append([])
        groups[-1].append(b)
    return tuple(Block(g[-1].output, g[0].input, g[0].downsample) for g in groups)


@dataclass(frozen=True)
class Edge:
    parent: str          # the site whose error is sent
    child: str           # the site that receives the displacement
    synapse: str         # one of SYNAPSE_KINDS, or "custom"
    in_features: int
    out_features: int

    @property
    def key(self):
        return f"{self.parent}__to__{self.child}"


def _tuples(lists):
    return {k: tuple(v) for k, v in lists.items()}


def _frozen_mapping(pairs):
    return MappingProxyType(dict(pairs))


@dataclass
class _Lookups:
    """A Plan's queries as dicts, built once by ``Plan.__post_init__``."""
    sites: dict          # name -> Site
    parents: dict        # site -> the sites whose errors it receives, in the order of the edges
    children: dict       # site -> the sites it sends its error to
    edge: dict           # (parent, child) -> Edge
    edges_from: dict     # parent -> its Edges
    position: dict       # site -> its forward position
    rules: dict          # site -> its ParamRules
    op_rule: dict        # op -> the rule of its first parameter
    normed: dict = field(default_factory=dict)      # site -> (norm kind, eps)
    order: tuple = None  # the error order (None: the error graph has a cycle)
    depth: object = None  # site -> depth
    wave: dict = field(default_factory=dict)        # site -> its wave of the error stage
    wave_sites: dict = field(default_factory=dict)  # wave -> its sites, in the error order


@dataclass(frozen=True)
class Plan:
    sites: tuple                     # Site, in forward order, primary output last
    outputs: tuple                   # names of the output sites, primary first
    params: tuple                    # ParamRule, in model order
    edges: tuple                     # Edge, sorted by (child, parent) forward positions
    wiring: str                      # how the error graph was made ("residual", "custom", ...)
    blocks: tuple = ()               # Block, one per residual merge, in forward order
    normed: tuple = ()               # (site, "layer" or "rms", eps): the feature-axis norm that
                                     # reads the site, its displacement through its input-VJP
    _index: object = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        """Every lookup built once, as dicts: a query is a dict read (a scan per query made
        compiling DenseNet-121 quadratic in its 120 sites)."""
        parents, children, rules, from_parent = {}, {}, {}, {}
        for e in self.edges:
            parents.setdefault(e.child, []).append(e.parent)
            children.setdefault(e.parent, []).append(e.child)
            from_parent.setdefault(e.parent, []).append(e)
        for r in self.params:
            rules.setdefault(r.site, []).append(r)
        lookups = _Lookups(
            sites={s.name: s for s in self.sites}, parents=_tuples(parents),
            children=_tuples(children), edge={(e.parent, e.child): e for e in self.edges},
            edges_from=_tuples(from_parent), position={s.name: k for k, s in enumerate(self.sites)},
            rules=_tuples(rules), op_rule={r.op: r.rule for r in reversed(self.params)},
            normed={name: (kind, eps) for name, kind, eps in self.normed})
        object.__setattr__(self, "_index", lookups)
        lookups.order = self._error_order()
        lookups.depth = self._depth()
        for name in lookups.order or ():       # a site's wave: one more than its latest parent's
            parents = self.parents(name)
            wave = 1 + max(lookups.wave[p] for p in parents) if parents else 0
            lookups.wave[name] = wave
            lookups.wave_sites.setdefault(wave, []).append(name)

    # -- queries ----------------------------------------------------------------------------
    def site(self, name):
        return self._index.sites[name]

    @property
    def site_names(self):
        return tuple(s.name for s in self.sites)

    def parents(self, name):
        return self._index.parents.get(name, ())

    def children(self, name):
        return self._index.children.get(name, ())

    def edge(self, parent, child):
        found = self._index.edge.get((parent, child))
        if found is None:
            raise KeyError(f"no error synapse {parent} -> {child}")
        return found

    def edges_from(self, parent):
        """The error synapses that read ``parent``'s error, in the order of ``edges``."""
        return self._index.edges_from.get(parent, ())

    def rule_at(self, op):
        """The rule of the first parameter the op ``op`` updates."""
        return self._index.op_rule[op]

    @property
    def depth(self):
        """Shortest number of error synapses from an output site, for every site."""
        return self._index.depth

    def _depth(self):
        depth = {name: 0 for name in self.outputs}
        frontier = list(self.outputs)
        while frontier:
            nxt = []
            for parent in frontier:
                for child in self.children(parent):
                    if child not in depth:
                        depth[child] = depth[parent] + 1
                        nxt.append(child)
            frontier = nxt
        return _frozen_mapping((s.name, depth.get(s.name)) for s in self.sites)

    @property
    def waves(self):
        """The error stage in waves: a site's wave is one more than its latest parent's."""
        return self._index.wave

    def in_wave(self, wave):
        """The sites of one wave, in the error order."""
        return tuple(self._index.wave_sites.get(wave, ()))

    def error_order(self):
        """Sites in an order where every parent comes before its children (outputs first)."""
        if self._index.order is None:
            raise AssertionError("error graph has a cycle; Plan.verify should have caught it")
        return self._index.order

    def _error_order(self):
        """The order, wave by wave (a site is ready once all its parents are placed; each
        wave latest site first); None when the error graph has a cycle."""
        done, order = set(), []
        pending = [s.name for s in self.sites]
        while pending:
            ready = [n for n in pending if all(p in done for p in self.parents(n))]
            if not ready:
                return None
            for n in sorted(ready, key=self._index.position.__getitem__, reverse=True):
                order.append(n)
                done.add(n)
            pending = [n for n in pending if n not in done]
        return tuple(order)

    def rules_of(self, site):
        return self._index.rules.get(site, ())

    def reader_norm(self, site):
        """(kind, eps) of the norm whose input-VJP the site's displacement goes through, or
        None."""
        return self._index.normed.get(site)

    # -- checks -------------------------------------------------------------------------------
    def verify(self):
        """Check the Plan's invariants; raise AssertionError naming the first one broken."""
        names = self.site_names
        assert len(set(names)) == len(names), "duplicate site names"
        assert self.outputs and names[-1] == self.outputs[0], "primary output must be last"
        for s in self.sites:
            assert s.kind in SITE_KINDS, f"site {s.name}: unknown kind {s.kind}"
            assert s.region and s.region[-1] == s.name, f"site {s.name}: region must end at it"
        seen = {}
        for s in self.sites:
            for node in s.region:
                assert node not in seen, f"node {node} is in the regions of {seen[node]} and {s.name}"
                seen[node] = s.name
        uses = [(r.param, r.op) for r in self.params]
        assert len(set(uses)) == len(uses), "a parameter has two rules at one op"
        for r in self.params:
            assert r.site in self._index.sites, f"{r.param}: unknown site {r.site}"
            assert r.op in self._index.sites[r.site].ops, f"{r.param}: op {r.op} not in {r.site}"
        for e in self.edges:
            assert e.parent in self._index.sites and e.child in self._index.sites, f"edge {e.key}: unknown site"
            assert e.child not in self.outputs, f"edge {e.key}: outputs take no displacement"
        for b in self.blocks:
            assert b.output in self._index.sites, f"block output {b.output} is not a site"
        for name, kind, _ in self.normed:
            assert name in self._index.sites and name not in self.outputs, \
                f"normed site {name} is not an inner site"
            assert kind in ("layer", "rms"), f"normed site {name}: unknown norm {kind}"
        for s in self.sites:
            if s.name not in self.outputs:
                assert self.parents(s.name), f"site {s.name} has no parent in the error graph"
        self.error_order()
        assert all(d is not None for d in self.depth.values()), "a site is unreachable"
        return self

    # -- printing -----------------------------------------------------------------------------
    def __str__(self):
        depth = self.depth
        lines = [f"Plan: {len(self.sites)} sites, {len(self.edges)} error synapses, "
                 f"{len(self.params)} parameters, wiring {self.wiring}"]
        lines.append("sites (forward order):")
        for s in self.sites:
            parents = ", ".join(self.parents(s.name)) or "labels"
            lines.append(f"  {s.name:<24} {s.kind:<10} phi={s.activation:<10} {str(s.layout):<18}"
                         f" depth {depth[s.name]}  error from: {parents}")
            if self.reader_norm(s.name):
                lines.append(f"  {'':<24} read by a {self.reader_norm(s.name)[0]} norm: its "
                             "displacement goes through that norm's input-VJP at its statistics")
            if s.crosses:
                lines.append(f"  {'':<24} block-local VJP: its error crosses {', '.join(s.crosses)}"
                             " inside its block or stage (scope='block' or 'stage')")
        if self.blocks:
            lines.append("residual blocks (merge -> output site, fed by, shortcut):")
            for b in self.blocks:
                lines.append(f"  {b.output:<24} from {b.input or 'input'}"
                             f"{'  (downsample)' if b.downsample else ''}")
        lines.append("error synapses:")
        for e in self.edges:
            lines.append(f"  {e.parent} -> {e.child}: {e.synapse} {e.in_features}->{e.out_features}")
        lines.append("parameters:")
        for r in self.params:
            lines.append(f"  {r.param:<40} rule {r.rule:<12} op {r.op:<20} site {r.site}")
        return "\n".join(lines)
