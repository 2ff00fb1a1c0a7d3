"""The reference interpreter: the living definition of rec-LRA on a Plan.

It is written like the paper's Algorithm 2 and favours plainness over speed: an fx.Interpreter
records every node's value (RUNINFERENCE), COMPUTESIGNALS recurses from the output sites into
their children (parents before children), and COMPUTEUPDATES forms every parameter's and every
error synapse's update. Local weight-gradients and the local carrying of a site's error through
shape-changing ops are taken by autograd on that one op alone, at its recorded inputs; nothing
ever crosses a site boundary except through error synapses. Any dtype works, float64 included.
"""
import operator
from dataclasses import dataclass, field

import torch
from torch import fx
from torch.func import functional_call

from ..analysis import bootstrap
from ..ops import local, registry
from . import rules, synapses as syn


@dataclass
class Signals:
    """Everything one reference step computed (tensors keyed by site or parameter name)."""
    loss: torch.Tensor
    outputs: tuple
    errors: dict = field(default_factory=dict)          # e_i
    displacements: dict = field(default_factory=dict)   # d_i
    targets: dict = field(default_factory=dict)         # y_i
    params: dict = field(default_factory=dict)          # qualified parameter name -> update
    synapses: dict = field(default_factory=dict)        # edge key -> {param name: update}
    bootstrap: dict = field(default_factory=dict)       # site -> c_i (error_rule="bootstrap")

    @property
    def discrepancies(self):
        """Per-site ||e_i||^2, averaged over the batch."""
        return {s: e.pow(2).sum() / e.shape[0] for s, e in self.errors.items()}


# -- RUNINFERENCE ---------------------------------------------------------------------------------
def run_inference(gm, x):
    """Run the model once (``x``: the input, or a tuple of inputs) and keep every node's value,
    keyed by node name."""
    interp = fx.Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad():
        interp.run(*(x if isinstance(x, tuple) else (x,)))
    return {node.name: value for node, value in interp.env.items()}


def _call(node, modules, args, kwargs):
    if node.op == "call_module":
        return modules[node.target](*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    return getattr(args[0], node.target)(*args[1:], **kwargs)


def rerun(node, env, modules, replace=None):
    """Re-execute one node at its recorded inputs, with some inputs replaced by other values."""
    replace = replace or {}

    def value(a):
        return replace[a.name] if a.name in replace else env[a.name]
    args = fx.node.map_arg(node.args, value)
    kwargs = fx.node.map_arg(node.kwargs, value)
    return _call(node, modules, args, kwargs)


def _pairs(out, cot):
    """(output tensor, cotangent) pairs; tuple-valued nodes carry cotangents as {index: tensor}."""
    if isinstance(cot, dict):             # nested as deep as the op's tuples (LSTM: (h, c))
        return [p for i, c in cot.items() for p in _pairs(out[i], c)]
    return [(out, cot)]


def _local_grad(fn, leaves, cot):
    """Gradient of ``fn()`` with respect to ``leaves`` for the cotangent ``cot`` (one op only)."""
    with torch.enable_grad():
        pairs = _pairs(fn(), cot)
        outs = [o for o, _ in pairs]
        grads = torch.autograd.grad(outs, leaves, [c for _, c in pairs], allow_unused=True)
    return [torch.zeros_like(l) if g is None else g for l, g in zip(leaves, grads)]


def _stateless(module, params):
    """The state for ``functional_call`` of ``module`` with ``params``: its buffers copied, so
    that re-running it (a BatchNorm in training) changes none of them."""
    return {**params, **{n: b.clone() for n, b in module.named_buffers()}}


# -- phi and its derivative -------------------------------------------------------------------------
def phi(site, env, modules, nodes, x):
    """The site's activation applied to ``x`` in place of its pre-activation."""
    if site.kind != "activation":
        return x
    return rerun(nodes[site.name], env, modules, {site.h: x})


def phi_prime(site, env, modules, nodes, x):
    if site.kind != "activation":
        return torch.ones_like(x)
    derivative = registry.kind_of(nodes[site.name], modules).derivative
    if derivative is not None:
        return derivative(x)
    leaf = x.detach().requires_grad_()
    return _local_grad(lambda: phi(site, env, modules, nodes, leaf), [leaf], torch.ones_like(x))[0]


# -- COMPUTEERRORNEURONS / COMPUTESIGNALS -----------------------------------------------------------
class _Run:
    def __init__(self, gm, plan, synapses, options):
        self.gm, self.plan, self.synapses, self.o = gm, plan, synapses, options
        self.modules = dict(gm.named_modules())
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.depth = plan.depth
        self.env = {}                    # node name -> recorded value (RUNINFERENCE)

    def compute_error_neurons(self, y, sig):
        for name, v in zip(self.plan.outputs, sig.outputs):
            target = rules.targets_for(v, y, self.o.loss)
            e, loss = rules.output_error(v, target, self.o.loss)
            sig.errors[name] = e
            if name == self.plan.outputs[0]:
                sig.loss = loss
        for name in self.plan.outputs:
            self.compute_signals(name, sig)

    def compute_signals(self, j, sig):
        """Visit the children of j; a child whose parents all have errors gets its target and
        error, then the recursion enters it (the base case: no children)."""
        for i in self.plan.children(j):
            parents = self.plan.parents(i)
            if i in sig.errors or not all(p in sig.errors for p in parents):
                continue
            site, z = self.plan.site(i), self.env[i]
            d = sum(syn.apply(self.synapses[self.plan.edge(p, i).key], sig.errors[p], z.shape)
                    for p in parents)
            if self.plan.reader_norm(i):
                d = syn.through_norm(d, z, *self.plan.reader_norm(i))
            target = phi(site, self.env, self.modules, self.nodes, self.env[site.h] - self.o.beta * d)
            depth = self.depth[i]
            alpha, kappa = rules.at_depth(self.o.alpha, depth), rules.at_depth(self.o.kappa, depth)
            sig.displacements[i], sig.targets[i] = d, target
            sig.errors[i] = rules.inner_error(z, target, alpha, kappa)
            self.compute_signals(i, sig)

    # -- COMPUTEUPDATES ---------------------------------------------------------------------------
    def carry(self, site, e, boundary=()):
        """Cotangents at every node of the site's region: e at the site (times phi'(h) under
        local_rule="dx"), passed unchanged through shape-preserving ops, and through every other
        op by that op's own local VJP; also at the ``boundary`` sites (other sites' values) that
        the region reads, for error_rule="bootstrap"."""
        region = set(site.region)
        reach = region | set(boundary)
        start = e
        if site.kind == "activation" and self.o.local_rule == "dx":
            start = e * phi_prime(site, self.env, self.modules, self.nodes, self.env[site.h])
        cot = {site.name: e}
        for name in reversed(site.region):
            node, c = self.nodes[name], cot.get(name)
            if c is None:
                continue
            if name == site.name and site.kind == "activation":
                self._add(cot, site.h, start)
                continue
            for a, ca in self._input_cotangents(node, c, reach, name in site.crosses):
                self._add(cot, a, ca)
        return cot

    @staticmethod
    def _add(cot, name, c):
        """Add cotangent ``c`` into ``cot[name]``; tuple-valued ops' are nested dicts."""
        if name not in cot:
            cot[name] = c
        elif isinstance(c, dict):
            merged = dict(cot[name])
            for k, v in c.items():
                _Run._add(merged, k, v)
            cot[name] = merged
        else:
            cot[name] = cot[name] + c

    def _input_cotangents(self, node, c, region, crossing=False):
        """(input, cotangent) pairs for the inputs of ``node`` in the region: unchanged through
        the pass-through ops, else by the op's own VJP (an activation the site's region crosses,
        ``crossing``, always by its VJP)."""
        inputs = [a for a in node.all_input_nodes if a.name in region]
        if not inputs:
            return []
        signs = None if crossing else registry.carry_signs(node, self.modules, self.o.norm_error)
        if signs is not None:
            out = []
            for k, a in enumerate(node.args[:len(signs)]):
                if isinstance(a, fx.Node) and a.name in region:
                    out.append((a.name, local.reduce_to(signs[k] * c, self.env[a.name].shape)))
            return out
        if node.op == "call_function" and node.target is operator.getitem and \
                isinstance(self.env[node.args[0].name], (tuple, list)):
            parts, index = self.env[node.args[0].name], node.args[1]
            part = local.sliced_parts(c, index, parts) if isinstance(index, slice) else {index: c}
            return [(node.args[0].name, part)]
        leaves = {a.name: self.env[a.name].detach().requires_grad_() for a in inputs}
        grads = _local_grad(lambda: self._pure_rerun(node, leaves), list(leaves.values()), c)
        return list(zip(leaves, grads))

    def _pure_rerun(self, node, leaves):
        """Re-execute one op at its recorded inputs without changing any state: a module runs
        on copies of its buffers (a BatchNorm's running statistics do not move), other tensor
        arguments are copies too (F.batch_norm's running statistics)."""
        copies = {a.name: self.env[a.name].clone() for a in node.all_input_nodes
                  if a.name not in leaves and isinstance(self.env[a.name], torch.Tensor)}
        replace = {**copies, **leaves}
        if node.op != "call_module":
            return rerun(node, self.env, self.modules, replace)
        module = self.modules[node.target]
        state = _stateless(module, {n: p.detach() for n, p in module.named_parameters()})
        args = fx.node.map_arg(node.args, lambda a: replace.get(a.name, self.env[a.name]))
        kwargs = fx.node.map_arg(node.kwargs, lambda a: replace.get(a.name, self.env[a.name]))
        return functional_call(module, state, args, kwargs)

    def param_updates(self, site, cot, batch):
        updates = {}
        for op_name in site.ops:
            node = self.nodes[op_name]
            rules = [r for r in self.plan.params if r.op == op_name]
            grads = self._param_grads(node, [r.key for r in rules], cot[op_name])
            for r, g in zip(rules, grads):      # a shared parameter: its uses' updates add up
                updates[r.param] = updates.get(r.param, 0) + g / batch
        return updates

    def _param_grads(self, node, keys, c):
        if node.op == "call_module":
            module = self.modules[node.target]
            local = {n: p.detach().requires_grad_() for n, p in module.named_parameters()}
            state = _stateless(module, local)
            args = fx.node.map_arg(node.args, lambda a: self.env[a.name])
            kwargs = fx.node.map_arg(node.kwargs, lambda a: self.env[a.name])
            return _local_grad(lambda: functional_call(module, state, args, kwargs),
                               [local[k] for k in keys], c)
        attrs = {a.target: a.name for a in node.all_input_nodes if a.op == "get_attr"}
        leaves = {attrs[k]: self.env[attrs[k]].detach().requires_grad_() for k in keys}
        return _local_grad(lambda: rerun(node, self.env, self.modules, leaves),
                           list(leaves.values()), c)

    def synapse_updates(self, sig, batch):
        sign, which = rules.ERROR_RULES[self.o.error_rule]
        updates = {}
        for edge in self.plan.edges:
            i, site = edge.child, self.plan.site(edge.child)
            if which == "d":
                c = sig.displacements[i]
            elif which == "bootstrap":     # least squares: d_i towards the carried-back error
                c = bootstrap.residual(sig.displacements[i], sig.bootstrap.get(i))
            elif which == "z":
                c = self.env[i]
            else:
                pre = self.env[site.h] - self.o.beta * sig.displacements[i]
                c = sig.errors[i] * phi_prime(site, self.env, self.modules, self.nodes, pre)
            module = self.synapses[edge.key]
            local = {n: p.detach().requires_grad_() for n, p in module.named_parameters()}
            e_j, z = sig.errors[edge.parent].detach(), self.env[i]
            # the least-squares fit is of the displacement itself: through the reading norm's
            # VJP where there is one; the Hebbian rules are of the synapse's own output
            norm = self.plan.reader_norm(i) if which == "bootstrap" else None
            grads = _local_grad(
                lambda: _displacement(module, e_j, z, local, norm), list(local.values()), c)
            updates[edge.key] = {n: sign * self.o.gamma * g / batch
                                 for n, g in zip(local, grads)}
        return updates


def _displacement(module, e, z, params, norm):
    d = syn.apply(module, e, z.shape, params)
    return d if norm is None else syn.through_norm(d, z, *norm)


def compute_updates(gm, plan, synapses, x, y, options):
    """COMPUTEUPDATES: the raw rec-LRA updates (before re-projection) and every signal."""
    run = _Run(gm, plan, synapses, options)
    with torch.no_grad():
        run.env = run_inference(gm, x)
        outputs = tuple(run.env[name] for name in plan.outputs)
        sig = Signals(loss=None, outputs=outputs)
        run.compute_error_neurons(y, sig)
        batch = outputs[0].shape[0]
        reach, free = bootstrap.boundary(gm, plan) if options.error_rule == "bootstrap" \
            else ((), ())
        for site in plan.sites:
            cot = run.carry(site, sig.errors[site.name], reach)
            for name, u in run.param_updates(site, cot, batch).items():
                sig.params[name] = sig.params.get(name, 0) + u
            scale = bootstrap.scale(site.name in plan.outputs, options.beta)
            for name in set(reach) - set(site.region):
                if isinstance(cot.get(name), torch.Tensor):
                    run._add(sig.bootstrap, name, scale * cot[name])
        for name in free:               # on through the ops no site owns, to a child site
            if name in sig.bootstrap:
                for a, ca in run._input_cotangents(run.nodes[name], sig.bootstrap[name], reach):
                    run._add(sig.bootstrap, a, ca)
        sig.synapses = run.synapse_updates(sig, batch)
    return sig
