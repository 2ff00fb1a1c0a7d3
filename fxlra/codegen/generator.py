"""Code generation: turn a Plan into the Python source of one rec-LRA update function.

The function reads like hand-written code: the forward pass (one statement per node), then the
error stage in an order where parents come before children (a ``# site <name>`` comment before
each block; every depth-1 synapse that reads the same vector error shares one matrix multiply),
then the local updates of every site, then the error-synapse updates. Values are deleted after
their last use. The source is deterministic and compiled under a registered file name so that
tracebacks and ``inspect`` show the generated lines.
"""
import collections
import hashlib
import linecache
import operator
import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from ..analysis import bootstrap
from ..nn import PerturbativeConv2d
from ..ops import local
from ..semantics import rules, synapses as syn
from . import streams
from .source import Source, readable, rename, sequential_names, shape_note
from .support import NO_REDUCE, Fetch, over_batch
from .updates import UpdateStage


def _is_simple(value):
    return value is None or isinstance(value, (bool, int, float, str)) or value is Ellipsis


class Generator(UpdateStage):
    """The update program's source, stage by stage: forward, errors (here) and updates
    (``fxlra.codegen.updates``)."""

    def __init__(self, gm, plan, synapse_modules, options, *, use_kernels=False, streams=1,
                 stream_runtime=None, devices=None, placement=None):
        """``options``: an ``fxlra.options.Options``; where the program runs comes apart:
        ``use_kernels`` (the Triton path), ``streams`` (their number) and ``stream_runtime``
        (``fxlra.streams.runtime``), ``devices`` and ``placement`` (site -> device index)."""
        self.gm, self.plan, self.o, self.synapses = gm, plan, options, synapse_modules
        self.use_kernels, self.n_streams, self.stream_runtime = use_kernels, streams, stream_runtime
        self.modules = dict(gm.named_modules())
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.env = {"torch": torch, "operator": operator, "F": F, "local": local,
                    "rules": rules, "syn": syn, "fetch": Fetch(gm), "NO_REDUCE": NO_REDUCE,
                    "over_batch": over_batch}
        self._global_ids = {}
        self.src = Source()
        self.fallbacks = []              # op names that use torch.func on one op
        self._shared = {}                # edge key -> (shared projection part, synapse kind)
        self.update_names = []           # (parameter name, expression, variable) in order
        self._alias = {}                 # variable never assigned -> the value it would rename
        self._opcalls = {}               # node name -> its OpCall
        self._linear_grads = {}          # (input, output error) -> grads of a Linear op
        self.stages = {}                 # stage -> its statements' (defs, uses), in order
        self.place = dict(placement or {})   # site -> device index (0: home)
        self._copies = {}                # (variable, device index) -> its copy's name
        self._error_sq = {}              # site -> per-sample sum(e^2) from the fused kernel
        self._input_vjp = {}             # op -> its grads, which hold its input-VJP too
        self._region_of = {n: s for s in plan.sites for n in s.region}
        # error_rule="bootstrap": the sites whose carried-back error c_i the synapses fit
        self._boundary, self._free = bootstrap.boundary(gm, plan) \
            if options.error_rule == "bootstrap" else (set(), ())
        self._bootstrapped = set()       # sites whose boot_ sum is defined
        self._here = (set(), 1.0)        # (region, scale on c) of the carry being generated
        if self.place:
            self.env["DEVICES"] = list(devices)
        self._param_ops = {}             # parametrised op (fx node) -> its ParamRules
        for r in plan.params:
            self._param_ops.setdefault(self.nodes[r.op], []).append(r)
        self._uses = collections.Counter(f"model.{r.param}" for r in plan.params)
        self._shared_parts = {}          # shared parameter -> its uses' (update, variable)
        self._bn_stats = {n.name: f"stats_{n.name}" for n in self._param_ops
                          if self._keeps_bn_stats(n)}
        self.schedule = None             # the stream schedule (fxlra.streams), on n > 1 streams
        self.rows = ()                   # the statements, stream statements included

    # -- names and expressions --------------------------------------------------------------------
    def glob(self, obj, hint):
        key = id(obj)
        if key not in self._global_ids:
            name = re.sub(r"\W", "_", hint)
            while name in self.env:
                name += "_"
            self.env[name] = obj
            self._global_ids[key] = name
        return self._global_ids[key]

    def _var(self, name):
        """What the program reads for the variable ``name``: itself, or the value it aliases."""
        return self._alias.get(name, name)

    def _shape_note(self, name):
        return shape_note(self.nodes.get(name))

    def fmt(self, arg, subst=None):
        subst = subst or {}
        if isinstance(arg, fx.Node):
            return subst.get(arg.name, arg.name)
        if isinstance(arg, tuple):
            inner = ", ".join(self.fmt(a, subst) for a in arg)
            return f"({inner},)" if len(arg) == 1 else f"({inner})"
        if isinstance(arg, list):
            return "[" + ", ".join(self.fmt(a, subst) for a in arg) + "]"
        if isinstance(arg, dict):
            return "{" + ", ".join(f"{k!r}: {self.fmt(v, subst)}" for k, v in arg.items()) + "}"
        if isinstance(arg, slice):
            return f"slice({self.fmt(arg.start)}, {self.fmt(arg.stop)}, {self.fmt(arg.step)})"
        if isinstance(arg, torch.dtype):
            return str(arg)
        if _is_simple(arg):
            return repr(arg)
        return self.glob(arg, f"const_{type(arg).__name__.lower()}")

    def _function_name(self, fn):
        name = getattr(fn, "__name__", None)
        for prefix, namespace in (("operator", operator), ("torch", torch), ("F", F)):
            if name and getattr(namespace, name, None) is fn:
                return f"{prefix}.{name}"
        return self.glob(fn, f"fn_{name or 'call'}")

    def call(self, node, subst=None):
        """The expression that computes ``node`` (some inputs replaced by ``subst``)."""
        args = ", ".join([self.fmt(a, subst) for a in node.args] +
                         [f"{k}={self.fmt(v, subst)}" for k, v in node.kwargs.items()])
        if node.op == "call_module":
            return f"{self.glob(self.modules[node.target], 'm_' + node.target)}({args})"
        if node.op == "call_function":
            return f"{self._function_name(node.target)}({args})"
        if node.op == "call_method":
            rest = ", ".join([self.fmt(a, subst) for a in node.args[1:]] +
                             [f"{k}={self.fmt(v, subst)}" for k, v in node.kwargs.items()])
            return f"{self.fmt(node.args[0], subst)}.{node.target}({rest})"
        if node.op == "get_attr":
            return f"fetch({node.target!r})"
        raise AssertionError(node.op)

    def opcall(self, node):
        """The global name of one OpCall per node (made once, reused by every statement)."""
        if node.name not in self._opcalls:
            self._opcalls[node.name] = local.OpCall(node, self.modules)
        return self.glob(self._opcalls[node.name], f"op_{node.name}")

    # -- devices ----------------------------------------------------------------------------------
    def _dev(self, site):
        return self.place.get(site, 0)

    def _on(self, var, k, src):
        """``var`` (a value on device ``src``) on device ``k``: itself, or a copy made once."""
        if k == src:
            return var
        name = self._copies.get((var, k))
        if name is None:
            name = f"{var}__on{k}"
            self.src.add(f"{name} = {var}.to(DEVICES[{k}], non_blocking=True)", [name], [var])
            self._copies[(var, k)] = name
        return name

    # -- stages -----------------------------------------------------------------------------------
    def forward(self):
        self.src.comment("forward: every value the updates read is kept until its last use")
        for node in self.gm.graph.nodes:
            if node.op == "placeholder" and node.args:      # a specialised (concrete) argument
                self.src.add(f"{node.name} = {self.fmt(node.args[0])}", [node.name])
            if node.op in ("placeholder", "output"):
                continue
            uses = [a.name for a in node.all_input_nodes]
            stats = self._bn_stats.get(node.name)
            if stats:          # the batch statistics too, for the norm's update
                self.src.add(f"{node.name}, {stats} = local.batchnorm_forward("
                             f"{self.glob(self.modules[node.target], 'm_' + node.target)}, "
                             f"{node.args[0].name})", [node.name, stats], uses,
                             self._shape_note(node.name))
                continue
            self.src.add(f"{node.name} = {self._kernel_call(node) or self.call(node)}",
                         [node.name], uses, self._shape_note(node.name))

    def _keeps_bn_stats(self, node):
        """Whether the forward runs this op by ``local.batchnorm_forward``, keeping the batch
        statistics its update reads (a torch.nn BatchNorm with trained affine parameters)."""
        return (node.op == "call_module" and len(node.args) == 1 and not node.kwargs and
                type(self.modules[node.target]) in local.BATCHNORM_TYPES and
                self._rule(node) == "batchnorm")

    def _kernel_call(self, node):
        """A forward op computed by a fused kernel on the Triton path (the pseudo-convolution:
        relu(x + noise) formed while loading, never materialised), or None."""
        if not (self.use_kernels and node.op == "call_module"):
            return None
        module = self.modules[node.target]
        if not isinstance(module, PerturbativeConv2d) or len(node.args) != 1 or node.kwargs:
            return None
        return (f"{self.glob(self._kernels(), 'kernels')}.perturbative_forward("
                f"{self.glob(module, 'm_' + node.target)}, {self.fmt(node.args[0])})")

    def errors(self):
        o = self.o
        for name in self.plan.outputs:
            self.src.begin(f"error_{name}", pinned=True)
            self.src.comment(f"site {name} (output): e = "
                             f"{'softmax(v) - onehot(y)' if o.loss == 'cross_entropy' else 'v - y'}")
            self.src.add(f"target_{name} = rules.targets_for({name}, labels, {o.loss!r})",
                         [f"target_{name}"], [name, "labels"])
            self.src.add(f"err_{name}, loss_{name} = rules.output_error({name}, target_{name}, "
                         f"{o.loss!r})", [f"err_{name}", f"loss_{name}"], [name, f"target_{name}"],
                         self._shape_note(name))
            self._shared_projections(name)
        depth = self.plan.depth
        wave, last = self.plan.waves, None
        for i in self.plan.error_order():
            if i in self.plan.outputs:
                continue
            self.src.begin(f"error_{i}")
            if wave[i] != wave.get(last):
                peers = self.plan.in_wave(wave[i])
                note = " (independent: their parents are in earlier waves)" if peers[1:] else ""
                self.src.comment(f"wave {wave[i]}: {', '.join(peers)}{note}")
            last = i
            site = self.plan.site(i)
            parents = self.plan.parents(i)
            self.src.comment(f"site {i} (depth {depth[i]}, error from {', '.join(parents)})")
            terms, uses, k = [], [], self._dev(i)
            for p in parents:
                edge = self.plan.edge(p, i)
                if edge.key in self._shared:
                    part, kind = self._shared.pop(edge.key)
                    terms.append(f"syn.place({part}, {kind!r}, {i}.shape, "
                                 f"{site.layout.channel_dim})")
                    uses += [part]
                else:
                    module = self.glob(self.synapses[edge.key], f"syn_{edge.key}")
                    err = self._on(f"err_{p}", k, self._dev(p))
                    terms.append(f"syn.apply({module}, {err}, {i}.shape)")
                    uses += [err]
            self.src.add(f"disp_{i} = {' + '.join(terms)}", [f"disp_{i}"], uses + [i],
                         self._shape_note(i))
            if self.plan.reader_norm(i):                     # through the norm that reads z_i
                z = self._on(i, k, 0)
                kind, eps = self.plan.reader_norm(i)
                self.src.add(f"disp_{i} = syn.through_norm(disp_{i}, {z}, {kind!r}, {eps!r})",
                             [f"disp_{i}"], [f"disp_{i}", z])
            alpha = rules.at_depth(o.alpha, depth[i])
            kappa = rules.at_depth(o.kappa, depth[i])
            if self._fused_error(site, alpha, kappa):
                self._shared_projections(i)
                continue
            node = self.nodes[i]
            h, z = self._on(site.h, k, 0), self._on(i, k, 0)
            phi, uses = "None", [h, z, f"disp_{i}"]
            if site.kind == "activation":                    # phi with h in place of its input
                phi = self.call(node, {site.h: "v"})
                phi = phi[:-len("(v)")] if phi.endswith("(v)") and "(" not in phi[:-3] \
                    else f"lambda v: {phi}"
                uses += [a.name for a in node.all_input_nodes]
            self.src.add(f"target_{i}, err_{i} = rules.error_neurons({phi}, {h}, {z}, "
                         f"disp_{i}, beta={o.beta!r}, alpha={alpha!r}, kappa={kappa!r})",
                         [f"target_{i}", f"err_{i}"], uses, self._shape_note(i))
            self._shared_projections(i)

    def _fused_error(self, site, alpha, kappa):
        """On the Triton path, the site's error by the fused kernel (one pass, math in float32,
        z recomputed from h, the target never stored, sum(e^2) per sample kept for the norm).
        False when the kernels are off or the site's activation has no kernel row (its torch
        lines are emitted instead)."""
        if not self.use_kernels:
            return False
        found = self._kernel_activation(site)
        if found is None:
            return False
        name, params = found
        i, kern = site.name, self.glob(self._kernels(), "kernels")
        h, z = self._on(site.h, self._dev(i), 0), self._on(i, self._dev(i), 0)
        values = ", ".join(self.glob(p, f"param_{i}") if isinstance(p, torch.Tensor) else repr(p)
                           for p in params)
        self.src.add(f"_, err_{i}, sq_{i} = {kern}.target_and_error({h}, {z}, disp_{i}, "
                     f"{name!r}, beta={self.o.beta!r}, alpha={alpha!r}, kappa={kappa!r}, "
                     f"params=({values}{',' if len(params) == 1 else ''}), "
                     f"channel_dim={site.layout.channel_dim}, with_target=False, "
                     f"recompute_z=True)", [f"err_{i}", f"sq_{i}"], [h, z, f"disp_{i}"])
        self._error_sq[i] = f"sq_{i}"
        return True

    def _kernel_activation(self, site):
        """(kernel activation name, parameters) of a site, or None."""
        if site.kind != "activation":
            return "identity", ()
        node = self.nodes[site.name]
        first = node.args[0] if node.args else None
        if not isinstance(first, fx.Node) or first.name != site.h:
            return None
        rest = torch.utils._pytree.tree_leaves((node.args[1:], node.kwargs))
        if any(isinstance(a, fx.Node) for a in rest):
            return None
        target = self.modules[node.target] if node.op == "call_module" else node.target
        return self._kernels().activation_of(target, node.args, node.kwargs)

    @staticmethod
    def _kernels():
        from .. import kernels          # imports Triton: only on the kernel path
        return kernels

    def _shared_projections(self, parent):
        """One matrix multiply for all dense/broadcast synapses reading the same vector error
        (not when the children live on different devices)."""
        if self.plan.site(parent).layout.kind != "vector" or self.place:
            return
        group = [e for e in self.plan.edges_from(parent)
                 if isinstance(self.synapses[e.key], syn.Synapse) and
                 self.synapses[e.key].kind in ("dense", "broadcast")]
        if len(group) < 2:
            return
        weights = ", ".join(f"{self.glob(self.synapses[e.key], 'syn_' + e.key)}.weight"
                            for e in group)
        sizes = [e.out_features for e in group]
        parts = [f"part_{e.key}" for e in group]
        self.src.add(f"disp_all_{parent} = err_{parent} @ torch.cat([{weights}]).t()",
                     [f"disp_all_{parent}"], [f"err_{parent}"])
        self.src.add(f"{', '.join(parts)}, = torch.split(disp_all_{parent}, {sizes}, dim=1)",
                     parts, [f"disp_all_{parent}"])
        self._shared.update({e.key: (f"part_{e.key}", self.synapses[e.key].kind) for e in group})

    # -- assembly ---------------------------------------------------------------------------------
    def generate(self):
        for stage in (self.forward, self.errors, self.updates):
            start = len(self.src.rows)
            stage()
            self.stages[stage.__name__] = [(r.defs, r.uses) for r in self.src.rows[start:]]
        sign, _ = rules.ERROR_RULES[self.o.error_rule]
        scale = {n: (sign * self.o.gamma if n.startswith("synapses.") else 1.0)
                 for n, _, _ in self.update_names}
        outputs = self.plan.outputs
        self.src.begin("scale", pinned=True)
        self.src.comment("raw updates, averaged over the batch (one multi-tensor scale)")
        self.src.add(f"batch = {outputs[0]}.shape[0]", ["batch"], [outputs[0]])
        self.src.add("updates = [" + ", ".join(e for _, e, _ in self.update_names) + "]",
                     ["updates"], [t for _, _, t in self.update_names])
        self.src.add("reduce.wait()", [], [])
        self.src.add("torch._foreach_mul_(updates, over_batch(SCALES, batch))", [],
                     ["updates", "batch"])
        self.env["SCALES"] = [scale[n] for n, _, _ in self.update_names]
        home = {s.name: self._on(f"err_{s.name}", 0, self._dev(s.name)) for s in self.plan.sites}
        sq = {s: self._on(v, 0, self._dev(s)) for s, v in self._error_sq.items()}
        errors = ", ".join(f"{s!r}: {e}" for s, e in home.items())
        sums = ", ".join(f"{s!r}: {v}" for s, v in sq.items())
        self.src.add(f"return loss_{outputs[0]}, {{{errors}}}, updates, {{{sums}}}", [],
                     [f"loss_{outputs[0]}", "updates"] + list(home.values()) + list(sq.values()))
        inputs = [n.name for n in self.gm.graph.nodes if n.op == "placeholder" and not n.args]
        header = [f"def rec_lra_updates({', '.join(inputs)}, labels, reduce=NO_REDUCE):",
                  f'    """rec-LRA updates for {type(self.gm).__name__}: {len(self.plan.sites)} '
                  f'sites, {len(self.plan.edges)} error synapse(s), wiring {self.plan.wiring}."""']
        rows, n = self.src.rows, self.n_streams
        if n > 1:
            self.schedule = streams.schedule(rows, self.src.blocks, n, inputs + ["labels"])
            problems = streams.verify(rows, self.schedule)
            assert not problems, problems
            rows = streams.render_rows(rows, self.src.blocks, self.schedule)
            self.env["ST"] = self.stream_runtime
        taken = set(self.nodes) | set(self.env)
        new_name = readable(sequential_names(self.gm, self.modules, taken))
        keep = {name for name in self.env if name.startswith("syn_")}   # synapses by edge key
        rows = rename(rows, lambda name: name if name in keep else new_name(name))
        self.env = {(k if k in keep else new_name(k)): v for k, v in self.env.items()}
        self.rows = tuple(rows)
        body = self.src.render(rows)
        return "\n".join(header + body) + "\n", [n for n, _, _ in self.update_names]


@dataclass(frozen=True)
class Built:
    """A generated update program: the function, its source, the names of the updates it
    returns (in order), the ops that fall back to torch.func, the (defs, uses) of each stage's
    statements (for ``fxlra.codegen.paths``), and its stream schedule (None on one stream)."""
    function: object
    code: str
    update_names: list
    fallbacks: tuple
    stages: dict
    schedule: object
    rows: tuple         # the statements (fxlra.codegen.source.Row), stream statements included
    blocks: tuple       # the blocks the rows belong to (fxlra.codegen.source.Block)


def build(gm, plan, synapse_modules, options, **where):
    """Generate, register and compile the update function (a :class:`Built`); ``where``: the
    runtime arguments of :class:`Generator` (kernels, streams, devices, placement)."""
    gen = Generator(gm, plan, synapse_modules, options, **where)
    source, names = gen.generate()
    digest = int(hashlib.sha1(source.encode()).hexdigest()[:8], 16)
    filename = f"<fxlra-generated-{type(gm).__name__}-{digest:08x}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    dump = os.environ.get("FXLRA_DUMP_DIR")
    if dump:
        os.makedirs(dump, exist_ok=True)
        with open(os.path.join(dump, f"{type(gm).__name__}_{digest:08x}.py"), "w") as f:
            f.write(source)
    namespace = dict(gen.env)
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 (our own generated source)
    return Built(namespace["rec_lra_updates"], source, names, tuple(gen.fallbacks), gen.stages,
                 gen.schedule, gen.rows, tuple(gen.src.blocks))
