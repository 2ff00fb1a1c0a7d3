"""The update stage of the generated program: each site's local updates (its error carried back
through shape-changing ops to every parametrised op it owns, then that op's weight-gradient), the
error-synapse updates, and the hand-off of finished updates to ``reduce``. A mixin of
``fxlra.codegen.Generator``, which holds the source, the names and the globals it uses.
"""
import operator

import torch
from torch import fx

from ..analysis import bootstrap
from ..ops import local, registry
from ..semantics import rules
from ..frontend import shapes

# rules whose weight-gradient fxlra.kernels computes in one fused Triton kernel (same signature)
KERNEL_GRADS = ("perturbative",)


class UpdateStage:
    """The updates stage of ``Generator``, which sets in its ``__init__`` everything read here:
    the inputs ``plan``, ``o`` (Options), ``nodes``, ``modules``, ``synapses``, ``use_kernels``;
    the output ``src`` (with ``glob``, ``fmt``, ``opcall``, ``_on``, ``_dev``); what the earlier
    stages found: ``_param_ops``, ``_bn_stats``, ``_uses``, ``_boundary``, ``_free``,
    ``_region_of``; and what this stage records: ``update_names``, ``fallbacks``, ``_alias``,
    ``_linear_grads``, ``_input_vjp``, ``_shared_parts``, ``_bootstrapped``, ``_here``."""

    def updates(self):
        for site in self.plan.sites:
            self.src.begin(f"update_{site.name}")
            start = len(self.update_names)
            self._site_updates(site)
            self._ready(start)
        self._bootstrap_free()
        start = len(self.update_names)
        self._synapse_updates()
        if self.update_names[start:]:
            self.src.begin("ready_synapses")
        self._ready(start)

    def _ready(self, start):
        """Hand finished updates to ``reduce`` (a no-op unless data-parallel), so that their
        communication starts while later updates are still computed."""
        done = self.update_names[start:]
        if done:
            self.src.add(f"reduce.ready([{', '.join(e for _, e, _ in done)}])", [],
                         [t for _, _, t in done])

    def _phi_prime(self, site, value):
        return self._derivative(self.nodes[site.name], value)

    def _derivative(self, node, value):
        """phi'(value) of the activation ``node``, as source."""
        name, row = registry.activation_name(node, self.modules), self._kind(node)
        if row.phi_prime is not None:
            fn = self.glob(row.phi_prime, f"phi_prime_{name}")
            return f"{fn}({self.opcall(node)}, {value})"
        derivative = row.derivative
        if derivative is not None:
            return f"{self.glob(derivative, 'derivative_' + name)}({value})"
        fn = self.glob(local.recorded_prime, "jvp_derivative")
        return f"{fn}({self.opcall(node)}, {value})"

    def _site_updates(self, site):
        region = set(site.region)
        # the region the carry below stays in, and the factor on what it leaves it with
        self._here = (region, bootstrap.scale(site.name in self.plan.outputs, self.o.beta))
        self.src.comment(f"site {site.name}: local updates of {', '.join(site.ops) or 'nothing'}")
        err = self._on(f"err_{site.name}", 0, self._dev(site.name))    # updates run at home
        cot = {site.name: err}
        defined = set()
        if site.kind == "activation":
            start = err
            if self.o.local_rule == "dx":
                start = f"{err} * {self._phi_prime(site, site.h)}"
            self._cot(site.h, start, defined, [err, site.h])
        for name in reversed(site.region):
            node = self.nodes[name]
            c = self._var(f"cot_{name}") if name in defined else cot.get(name)
            if c is None:
                continue
            if node in self._param_ops:
                self._param_update(node, c)
            if name == site.name and site.kind == "activation":
                continue
            if name in site.crosses:            # an activation inside a block: its own VJP
                x = node.args[0].name
                self._cot(x, f"{c} * {self._derivative(node, x)}", defined, [c, x])
                continue
            self._carry(node, c, region, defined)

    def _cot(self, name, expr, defined, uses):
        if name in self._boundary and name not in self._here[0]:
            self._bootstrap_part(name, expr, uses)
            return
        var, note = f"cot_{name}", self._shape_note(name)
        before = self._alias.pop(var, var)               # what cot_name reads so far
        if name in defined and _tuple_parts(expr):       # parts of a tuple-valued op's output
            self.src.add(f"{var} = local.add_cotangents({before}, {expr})", [var],
                         uses + [before], note)
        elif name in defined:
            self.src.add(f"{var} = {before} + {expr}", [var], uses + [before], note)
        else:
            defined.add(name)
            if expr.isidentifier():                      # a plain alias of another error value:
                self._alias[var] = expr                  # later statements read that value
            else:
                self.src.add(f"{var} = {expr}", [var], uses, note)

    def _bootstrap_free(self):
        """error_rule="bootstrap": carry the collected c on through the ops no site owns
        (pooling, flattening between sites), last op first, to the child sites."""
        if not any(n in self._bootstrapped for n in self._free):
            return
        self.src.begin("bootstrap")
        self._here = (set(), 1.0)                       # c is scaled already
        for name in self._free:
            if name in self._bootstrapped:
                self._carry(self.nodes[name], self._var(f"boot_{name}"), set(), set())

    def _bootstrap_part(self, name, expr, uses):
        """Add this site's error, carried back to the value ``name`` that its region reads
        (a child site or an op no site owns), into c_name (error_rule="bootstrap")."""
        if _tuple_parts(expr):                           # a tuple part: not a site's value
            return
        scale = self._here[1]
        part = expr if scale == 1.0 else f"{scale!r} * {expr}"
        target, note = f"boot_{name}", self._shape_note(name)
        if name in self._bootstrapped:
            before = self._alias.pop(target, target)
            self.src.add(f"{target} = {before} + {part}", [target], uses + [before], note)
        elif part.isidentifier():                        # a plain alias, as in _cot
            self._alias[target] = part
            self._bootstrapped.add(name)
        else:
            self.src.add(f"{target} = {part}", [target], uses, note)
            self._bootstrapped.add(name)

    def _carry(self, node, c, region, defined):
        region = region | self._boundary                 # bootstrap: on to the sites read
        inputs = [a for a in node.all_input_nodes if a.name in region]
        if not inputs:
            return
        signs = registry.carry_signs(node, self.modules, self.o.norm_error)
        row = self._kind(node)
        if signs is not None:
            for k, a in enumerate(node.args[:len(signs)]):
                if isinstance(a, fx.Node) and a.name in region:
                    expr = c if signs[k] == 1 else f"-{c}"
                    if shapes.shape_of(a) != shapes.shape_of(node):
                        expr = f"local.reduce_to({expr}, {a.name}.shape)"
                    self._cot(a.name, expr, defined, [c, a.name])
            return
        if node.op == "call_function" and node.target is operator.getitem and \
                shapes.shape_of(node.args[0]) is None:
            parts, index = node.args
            expr = f"{{{index!r}: {c}}}" if not isinstance(index, slice) else \
                f"local.sliced_parts({c}, {self.fmt(index)}, {parts.name})"
            self._cot(parts.name, expr, defined, [c] if expr[0] == "{" else [c, parts.name])
            return
        if row.concat:
            tensors = node.args[0]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            listed = "[" + ", ".join(t.name for t in tensors) + "]"
            for k, t in enumerate(tensors):
                if t.name in region:
                    self._cot(t.name, f"local.cat_part({c}, {dim}, {listed}, {k})", defined,
                              [c] + [u.name for u in tensors])
            return
        rule = row.carry
        x = node.args[0]
        if node.name in self._input_vjp and len(inputs) == 1 and inputs[0] is x:
            self._cot(x.name, f"{self._input_vjp[node.name]}['input']", defined,
                      [self._input_vjp[node.name]])
            return
        if node.op == "call_function" and row.norm:
            self._cot(x.name, f"local.functional_norm_vjp({self.opcall(node)}, "
                      f"{self._call_form(node)}, {c})", defined,
                      [c] + [a.name for a in node.all_input_nodes])
            return
        if rule is not None and len(inputs) == 1 and inputs[0] is x:
            fn = self.glob(rule, f"carry_{rule.__name__}")
            self._cot(x.name, f"{fn}({self.opcall(node)}, {x.name}, {c})", defined, [c, x.name])
            return
        at = [k for k, a in enumerate(node.args) if isinstance(a, fx.Node) and a.name in region]
        if (fn := registry.function_carry(node, self.modules, at)) is not None:
            args = "[" + ", ".join(self.fmt(a) for a in node.args) + "]"
            for k in at:
                self._cot(node.args[k].name, f"local.{fn.__name__}({args}, {c}, {k})", defined,
                          [c] + [a.name for a in node.all_input_nodes])
            return
        self.fallbacks.append(node.name)
        leaves = _leaves(node)
        wrt = [k for k, a in enumerate(leaves) if isinstance(a, fx.Node) and a.name in region]
        outs = [f"vjp_{node.name}_{k}" for k in range(len(wrt))]
        self.src.add(f"{', '.join(outs)}, = local.local_vjp({self.opcall(node)}, "
                     f"{self._call_form(node)}, {c}, {wrt})", outs,
                     [c] + [a.name for a in node.all_input_nodes])
        for out, k in zip(outs, wrt):
            self._cot(leaves[k].name, out, defined, [out])

    def _call_form(self, node):
        """``[args], {kwargs}`` of a node, as source."""
        args = "[" + ", ".join(self.fmt(a) for a in node.args) + "]"
        return f"{args}, {self.fmt(dict(node.kwargs))}"

    def _param_update(self, node, c):
        rules = self._param_ops[node]
        names = [r.param for r in rules]
        target = f"grads_{node.name}"
        if node.op == "call_module" and self._rule(node) in registry.WEIGHT_GRADS:
            fn = registry.WEIGHT_GRADS[self._rule(node)]
            module = self.glob(self.modules[node.target], "m_" + node.target)
            x = node.args[0].name
            owner = "local"
            if self.use_kernels and self._rule(node) in KERNEL_GRADS:
                owner = self.glob(self._kernels(), "kernels")     # the fused Triton update
            stats = [self._bn_stats[node.name]] if node.name in self._bn_stats else []
            args = [module, x, c] + stats
            if owner == "local" and self._fuses_input_vjp(node, fn):
                args = [module, x, c] + ([(stats or ["None"])[0]] if fn is local.batchnorm_grads
                                         else []) + ["with_input=True"]
                self._input_vjp[node.name] = target      # the input-VJP from the same call
            self.src.add(f"{target} = {owner}.{fn.__name__}({', '.join(args)})", [target],
                         [c, x] + stats)
            keys = [r.key for r in rules]
            if fn is local.linear_grads:
                self._linear_grads[(x, self._alias.get(c, c))] = target
        elif node.op == "call_module":
            self.fallbacks.append(node.name)
            module = self.glob(self.modules[node.target], "m_" + node.target)
            uses = [a.name for a in node.all_input_nodes]
            self.src.add(f"{target} = local.module_param_vjp({module}, {self._call_form(node)}, "
                         f"{c})", [target], uses + [c])
            keys = [r.key for r in rules]
        elif (fn := registry.function_grads(node, self.modules)) is not None:
            args = "[" + ", ".join(self.fmt(a) for a in node.args) + "]"
            self.src.add(f"{target} = local.{fn.__name__}({args}, {c})", [target],
                         [a.name for a in node.all_input_nodes] + [c])
            where = {a.target: k for k, a in enumerate(node.args)
                     if isinstance(a, fx.Node) and a.op == "get_attr"}
            keys = [where[r.key] for r in rules]
        else:
            self.fallbacks.append(node.name)
            where = {a.target: k for k, a in enumerate(_leaves(node))
                     if isinstance(a, fx.Node) and a.op == "get_attr"}
            wrt = [where[r.key] for r in rules]
            uses = [a.name for a in node.all_input_nodes]
            self.src.add(f"{target} = local.local_vjp({self.opcall(node)}, "
                         f"{self._call_form(node)}, {c}, {wrt})", [target], uses + [c])
            keys = list(range(len(names)))
        for key, qual in zip(keys, names):
            self._add_update(f"model.{qual}", f"{target}[{key!r}]", target)

    def _add_update(self, name, expr, variable):
        """Record one update; a parameter used by several ops (shared) gets one, the sum of its
        uses' updates, once the last of them is computed."""
        uses = self._uses[name]
        if uses == 1:
            self.update_names.append((name, expr, variable))
            return
        parts = self._shared_parts.setdefault(name, [])
        parts.append((expr, variable))
        if len(parts) == uses:
            total = "sum_" + name.replace(".", "_")
            self.src.add(f"{total} = {' + '.join(e for e, _ in parts)}", [total],
                         [v for _, v in parts])
            self.update_names.append((name, total, total))

    def _fuses_input_vjp(self, node, fn):
        """Whether the op's weight-gradient call also returns its input-VJP: the site's error
        goes on to the op's input (in the same region: a norm under norm_error="vjp", a conv or
        linear inside a block) and the rule can give it from the same backward call."""
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            return False
        if fn is local.batchnorm_grads:
            wanted = self.o.norm_error == "vjp"
        else:
            wanted = fn in (local.conv_grads, local.linear_grads) and \
                local.fuses_input_vjp(self.modules[node.target])
        site = self._region_of.get(node.name)
        return wanted and site is not None and (node.args[0].name in site.region or
                                                node.args[0].name in self._boundary)

    def _kind(self, node):
        return registry.kind_of(node, self.modules)

    def _rule(self, node):
        return self.plan.rule_at(node.name)

    def _synapse_updates(self):
        sign, which = rules.ERROR_RULES[self.o.error_rule]
        for edge in self.plan.edges:
            self.src.begin(f"synapse_{edge.key}")
            i, site = edge.child, self.plan.site(edge.child)
            k = self._dev(i)                                  # on the child's device
            if which == "d":
                c, uses = f"disp_{i}", [f"disp_{i}"]
            elif which == "bootstrap":      # least squares: d_i towards the carried-back error
                boot = self._on(self._var(f"boot_{i}"), k, 0) if i in self._bootstrapped \
                    else None
                c, uses = (f"disp_{i} - {boot}", [f"disp_{i}", boot]) if boot else \
                    (f"disp_{i}", [f"disp_{i}"])
                if self.plan.reader_norm(i):  # the fit is of the displacement, after the norm
                    z = self._on(i, k, 0)
                    kind, eps = self.plan.reader_norm(i)
                    c, uses = f"syn.through_norm({c}, {z}, {kind!r}, {eps!r})", uses + [z]
            elif which == "z":
                z = self._on(i, k, 0)
                c, uses = z, [z]
            elif site.kind != "activation":                   # phi = identity: phi' = 1
                c, uses = f"err_{i}", [f"err_{i}"]
            else:
                h = self._on(site.h, k, 0)
                pre = f"torch.sub({h}, disp_{i}, alpha={self.o.beta!r})"
                c = f"err_{i} * {self._phi_prime(site, pre)}"
                uses = [f"err_{i}", h, f"disp_{i}"]
            err_parent = self._on(f"err_{edge.parent}", k, self._dev(edge.parent))
            module = self.glob(self.synapses[edge.key], f"syn_{edge.key}")
            target = f"synapse_grads_{edge.key}"
            self.src.comment(f"error synapse {edge.parent} -> {i} ({self.o.error_rule})")
            shared = self._linear_grads.get((i, f"err_{edge.parent}")) if k == 0 else None
            if which == "z" and edge.synapse == "dense" and shared is not None:
                # z_i^T e_j is the transpose of the weight update of the Linear that reads z_i
                # and whose output error is e_j: reuse it instead of a second matmul
                self.src.add(f"{target} = [{shared}['weight'].t().contiguous()]", [target],
                             [shared])
            else:
                self.src.add(f"{target} = syn.weight_grads({module}, {err_parent}, {c})",
                             [target], uses + [err_parent])
            for k, (pname, _) in enumerate(self.synapses[edge.key].named_parameters()):
                self.update_names.append((f"synapses.{edge.key}.{pname}", f"{target}[{k}]",
                                          target))


def _tuple_parts(expr):
    """Whether a cotangent expression holds parts of a tuple-valued op ({index: cotangent})."""
    return expr.startswith(("{", "local.sliced_parts("))


def _leaves(node):
    """The flattened (args, kwargs) of a node; local_vjp differentiates leaves by position. A
    tuple or list without nodes (a constant size) is one leaf, as local_vjp flattens it."""
    return torch.utils._pytree.tree_flatten((node.args, node.kwargs), is_leaf=_node_free)[0]


def _node_free(v):
    return isinstance(v, (tuple, list)) and len(v) > 0 and not any(
        isinstance(t, fx.Node) for t in torch.utils._pytree.tree_leaves(v))
