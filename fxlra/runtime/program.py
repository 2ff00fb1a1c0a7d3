"""The program object ``fxlra.compile`` (fxlra/compiler.py) returns: an ``nn.Module`` holding the model and its error
synapses, with ``step``, ``updates``, ``sites``, ``wiring``, ``synapse``, ``explain`` and the
model's forward as ``prog(x)``.
"""
import collections
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import nn

from ..codegen import generator as codegen, paths, streams
from ..codegen.support import NO_REDUCE
from . import graphs, health
from ..semantics import reference, rules
from ..errors import InputError, OptionError, WiringError


@dataclass
class StepResult:
    """What ``prog.step`` returns: the loss, the per-site discrepancies ||e_i||^2, and whether
    the step was skipped (a non-finite value under ``nonfinite="skip"``: nothing was written)."""
    loss: torch.Tensor
    discrepancies: dict
    skipped: bool = False


class Program(nn.Module):
    """A model compiled for rec-LRA training. ``prog.parameters()`` are the model's parameters
    followed by the error synapses'; ``step`` writes their updates into ``.grad``."""

    def __init__(self, model, graph_module, plan, graph, synapse_modules, options, *,
                 devices=None, placement=None):
        super().__init__()
        self.model = model
        self.synapses = nn.ModuleDict(synapse_modules)
        object.__setattr__(self, "graph_module", graph_module)
        object.__setattr__(self, "plan", plan)
        object.__setattr__(self, "_wiring", graph)
        self._options = options     # fxlra.options.Options
        self._devices = devices     # with devices=: the devices, the model's first
        self._placement = placement  # with devices=: site -> device index (0: the model's)
        self._built_for = None      # the device the update program was generated for
        self._build()
        object.__setattr__(self, "_by_name", dict(self.named_parameters()))
        inputs = [n for n in graph_module.graph.nodes if n.op == "placeholder" and not n.args]
        self._input_names = tuple(n.target for n in inputs)
        self._input_meta = inputs[0].meta.get("tensor_meta") if inputs else None
        self.steps = 0              # completed steps (skipped ones included)
        self.skips = 0              # consecutive skipped steps
        self.reducer = None         # averages updates across processes (fxlra.distributed)

    def _build(self):
        """Generate the update program for the device the model is on: Triton kernels on CUDA
        (``kernels="auto"``) or wherever they can run (``"triton"``), torch ops otherwise."""
        device = next(self.parameters()).device
        o = self._options
        n = streams.resolve(o.streams, device, self._placement is not None)
        self._streams = streams.runtime(device, n)
        backend = graphs.backend_for(device) if o.cuda_graph else None
        self._graphs = graphs.GraphCache(backend) if backend is not None else None
        built = codegen.build(self.graph_module, self.plan, dict(self.synapses.items()), o,
                              use_kernels=_use_kernels(o.kernels, device),
                              stream_runtime=self._streams, streams=n, devices=self._devices,
                              placement=self._placement)
        self._built = built
        self._built_for = device

    def _apply(self, fn, *args, **kwargs):
        """``prog.to(device)``, ``.cuda()``, ``.double()``...: regenerate when the device changes
        (the kernel path depends on it)."""
        out = super()._apply(fn, *args, **kwargs)
        if self._built_for is not None and next(self.parameters()).device != self._built_for:
            self._placement = self._devices = None    # everything is on one device now
            self._build()
        elif getattr(self, "_graphs", None) is not None:   # graphs would read the old tensors
            self._graphs = graphs.GraphCache(self._graphs.backend)
        return out

    def get_extra_state(self):
        """The step counters, so that a checkpoint holds them with the weights."""
        return {"steps": self.steps, "skips": self.skips}

    def set_extra_state(self, state):
        self.steps, self.skips = int(state["steps"]), int(state["skips"])

    # -- what users read --------------------------------------------------------------------------
    @property
    def options(self):
        """The options, read-only: every ``fxlra.options.Options`` field, and with ``devices=``
        the devices and the placement (site -> device index) until the program moves."""
        placed = {} if self._placement is None else {"devices": self._devices,
                                                     "placement": self._placement}
        return MappingProxyType({**self._options, **placed})

    @property
    def sites(self):
        """Site names in forward order, the output last."""
        return self.plan.site_names

    @property
    def wiring(self):
        """The error graph as a networkx.DiGraph (edges parent -> child)."""
        return self._wiring.copy()

    def synapse(self, parent, child):
        """The error synapse module E_{parent -> child}."""
        try:
            return self.synapses[self.plan.edge(parent, child).key]
        except KeyError:
            raise WiringError(f"there is no error synapse {parent} -> {child}; the edges into "
                              f"{child} come from {list(self.plan.parents(child))}") from None

    def explain(self):
        """For every parameter: its site, its rule, and the sites its error comes from."""
        lines = [self._frontend_line(), f"{'parameter':<44} {'site':<22} {'rule':<12} error from"]
        depth = self.plan.depth
        crossed = {s.name: s.crosses for s in self.plan.sites if s.crosses}
        uses = collections.Counter(r.param for r in self.plan.params)
        for r in self.plan.params:
            parents = ", ".join(self.plan.parents(r.site)) or "labels (output)"
            note = "  (local VJP of the op: fxlra has no rule of its own)" \
                if r.rule == "local-vjp" else ""
            if uses[r.param] > 1:
                note += f"  (shared by {uses[r.param]} ops, at {r.op}: the updates are summed)"
            if r.site in crossed and self._crosses_to(r):
                note += "  (block-local VJP: its error crosses an activation inside the block)"
            lines.append(f"model.{r.param:<38} {r.site:<22} {r.rule:<12} {parents}"
                         f" [depth {depth[r.site]}]{note}")
        for e in self.plan.edges:
            for name, _ in self.synapses[e.key].named_parameters():
                lines.append(f"synapses.{e.key}.{name:<12} {e.child:<22} "
                             f"{'synapse-' + self._options.error_rule:<12} {e.parent}")
        carried = [n for n in self.fallbacks if n not in {r.op for r in self.plan.params}]
        if carried:
            lines.append(f"Errors are carried back through {', '.join(carried)} by that op's own "
                         "local VJP (torch.func; fxlra has no explicit rule for it).")
        if self._options.error_rule == "bootstrap" and self.plan.edges:
            lines.append("error_rule='bootstrap': each error synapse is fitted (least squares) to "
                         "the error of the sites that read its child site, carried back to the "
                         "child by those sites' own local VJP; that carried error trains the "
                         "synapse only and updates no parameter of the model.")
        if self.plan.normed:
            lines.append("norm_error='vjp': the displacements into "
                         f"{', '.join(n for n, _, _ in self.plan.normed)} go through the input-VJP "
                         "of the norm that reads each (LayerNorm or RMSNorm over the features), at "
                         "the site's own statistics and without the norm's weight, so that they "
                         "change with the input as the gradient there does; norm_error='pass' "
                         "leaves them as the synapses give them.")
        if crossed:
            unit = "stage of at most two residual blocks" if self._options.scope == "stage" \
                else "residual block"
            lines.append(f"scope={self._options.scope!r} (the paper's hybrid): the parameters "
                         f"marked 'block-local VJP' are updated by the local VJP of their {unit}, "
                         "from its output's error, through the activations "
                         f"{', '.join(a for c in crossed.values() for a in c)} inside it (backprop "
                         "within one block or stage; no error crosses its boundary except through "
                         "an error synapse). scope='layer' gives every activation its own site.")
            lines.append("No parameter is trained by backpropagation across a block boundary: "
                         "every update uses only its own site's error.")
        else:
            lines.append("No parameter is trained by backpropagation: every update uses only its "
                         "own site's error.")
        return "\n".join(lines)

    def _crosses_to(self, rule):
        """Whether the error reaching ``rule``'s op crossed an activation of the block (the op
        comes before one of the activations its site's region crosses)."""
        site = self.plan.site(rule.site)
        position = {n: k for k, n in enumerate(site.region)}
        return any(position[rule.op] < position[a] for a in site.crosses)

    def draw(self, path, **kwargs):
        """Draw the sites and the error wiring to ``path`` (PNG, SVG, ...); see fxlra.draw."""
        from ..draw import draw
        return draw(self, path, **kwargs)

    def critical_paths(self):
        """Sequential op counts of this program's step stages and of backprop's (fxlra.codegen.paths)."""
        return paths.critical_paths(self._built.stages)

    @property
    def frontend(self):
        """How the model's graph was captured: "fx" (symbolic tracing) or "export"
        (torch.export's ATen graph)."""
        return self.graph_module.meta.get("frontend", ("fx",))[0]

    def _frontend_line(self):
        how = self.graph_module.meta.get("frontend", ("fx", "torch.fx symbolic tracing"))[1]
        return f"graph: {how}"

    def __repr__(self):
        return f"fxlra.Program({type(self.model).__name__})\n{self._frontend_line()}\n{self.plan}"

    def forward(self, *args, **kwargs):
        return self.graph_module(*args, **kwargs)

    # -- training ---------------------------------------------------------------------------------
    @property
    def code(self):
        """The generated update program's Python source."""
        return self._built.code

    @property
    def fallbacks(self):
        """The ops whose local VJP comes from torch.func (no rule of fxlra's own)."""
        return self._built.fallbacks

    @property
    def schedule(self):
        """Each block's stream, waits and keeps (``fxlra.streams.Schedule``); None on one
        stream."""
        return self._built.schedule

    @property
    def _generated(self):
        return self._built.function

    @property
    def _update_names(self):
        return self._built.update_names

    @torch.compiler.disable     # checks that read tensors on the host: never traced
    def _check_input(self, x, y):
        """The batch's inputs as a tuple (a model with several inputs takes ``(x1, x2, ...)``),
        after checking them and the labels; raises InputError before anything runs."""
        inputs = x if isinstance(x, tuple) else (x,)
        names = self._input_names
        if len(inputs) != len(names):
            raise InputError(f"the model takes {len(names)} input(s) ({', '.join(names)}) but "
                             f"{len(inputs)} were given; pass "
                             f"{'x' if len(names) == 1 else '(' + ', '.join(names) + ')'}")
        like = next(self.model.parameters(), None)
        for what, t in [("inputs", t) for t in inputs] + [("labels", y)]:
            if like is not None and isinstance(t, torch.Tensor) and t.device != like.device:
                raise InputError(f"{what} are on {t.device} but the model is on {like.device}; "
                                 f"move them with .to({str(like.device)!r})")
        fixed = self.graph_module.meta.get("fixed_batch")
        if fixed is not None and isinstance(inputs[0], torch.Tensor) and \
                inputs[0].shape[:1] != (fixed,):
            raise InputError(f"the batch has {inputs[0].shape[0]} samples but "
                             f"{type(self.model).__name__} was captured by torch.export at its "
                             f"example's batch size, {fixed}, because it computes with its batch "
                             f"size (len(x), a loop over the samples); pass batches of {fixed} "
                             "(drop_last=True), or compile with an example batch of the size "
                             "you train with")
        out = self.plan.site(self.plan.outputs[0]).layout
        for t in inputs:
            rules.check_batch(t, y, out, self._options.loss)
        return inputs

    def reference_signals(self, x, y):
        """Every signal of the reference interpreter (the specification) for one batch."""
        inputs = self._check_input(x, y)
        edges = {e.key: self.synapses[e.key] for e in self.plan.edges}
        return reference.compute_updates(self.graph_module, self.plan, edges, inputs, y,
                                         self._options)

    def reference_updates(self, x, y):
        """The reference interpreter's raw updates, keyed like ``updates``."""
        sig = self.reference_signals(x, y)
        updates = {f"model.{n}": u for n, u in sig.params.items()}
        for key, per_param in sig.synapses.items():
            updates.update({f"synapses.{key}.{n}": u for n, u in per_param.items()})
        return {n: updates[n] for n, _ in self.named_parameters() if n in updates}

    def _run(self, x, y, reduce=None, step=False):
        """Run the update program (for a step: replayed as a CUDA graph with ``cuda_graph=True``,
        and with the norms of the errors and updates); on failure, restore the buffers the
        forward wrote and turn a failure caused by the batch's shape or dtype into an
        InputError. Returns (loss, errors, updates, error norms, update norms), snapshot."""
        inputs = self._check_input(x, y)
        graphed = step and self._options.cuda_graph
        if graphed:
            graphs.check_usable(self._graphs, self._built_for, self.reducer)
        buffers = health.mutable_buffers(self.model)
        snapshot = health.BufferSnapshot(buffers)
        try:
            with torch.no_grad(), self._streams.guard():
                if graphed:
                    out = self._graphs.run(self._program_with_norms, inputs, y, self.training,
                                           buffers)
                else:
                    out = self._generated(*inputs, y, reduce or NO_REDUCE)
                    out = _with_norms(*out) if step else out[:3] + (None, None)
        except RuntimeError as exc:
            snapshot.restore()
            mismatch = health.input_mismatch(self._input_meta, inputs[0], exc)
            if mismatch is not None:
                raise mismatch from exc
            raise
        return out, snapshot

    def _program_with_norms(self, *args):
        """The program's outputs and the norms of its errors and updates (what is captured)."""
        return _with_norms(*self._generated(*args))

    def updates(self, x, y):
        """The raw rec-LRA updates (before re-projection), keyed by ``named_parameters()``."""
        (_, _, updates, _, _), _ = self._run(x, y)
        found = dict(zip(self._update_names, updates))
        return {n: found[n] for n, _ in self.named_parameters() if n in found}

    def step(self, x, y):
        """Forward, targets, errors, local updates; re-projected and added into ``.grad``.

        Nothing changes (parameters, ``.grad``, buffers) if the loss, an error or an update is
        not finite: the step raises ``NumericalError`` or, with ``nonfinite="skip"``, returns a
        result with ``skipped=True``."""
        out, snapshot = self._run(x, y, self.reducer, step=True)
        return self._finish_step(out, snapshot, x)

    @torch.compiler.disable     # host syncs and decisions on their values: under torch.compile
    def _finish_step(self, out, snapshot, x):   # a traced copy would recompile for each value
        """Check, re-project and accumulate one step's updates (``step``'s host side)."""
        loss, errors, updates, error_norms, update_norms = out
        policy = health.NONFINITE[self._options.nonfinite]
        graphed = self._options.cuda_graph     # outputs are overwritten by the next replay
        with torch.no_grad():
            if graphed:
                loss, error_norms = loss.clone(), error_norms.clone()
            host = health.host_norms(loss, error_norms, update_norms) if policy else None
            if policy and not health.finite(host):
                snapshot.restore()
                site, what = health.first_bad_site(self.plan, loss, errors, error_norms,
                                                   self._update_names, updates, update_norms)
                if policy == "skip" and self.skips < self._options.max_skips:
                    self.skips += 1
                    self.steps += 1
                    return StepResult(loss, self._discrepancies(errors, error_norms, x), True)
                raise health.nonfinite_error(self.steps + 1, site, what, self.skips)
            params = [self._by_name[n] for n in self._update_names]
            if host is not None:           # the norms are on the host already: no more syncs
                rules.reproject_known(updates, self._options.clip, host[1 + len(errors):])
            else:
                rules.reproject_all(updates, self._options.clip, update_norms)
            rules.accumulate_grads(params, updates, copy=graphed)
        self.steps += 1
        self.skips = 0
        return StepResult(loss, self._discrepancies(errors, error_norms, x))

    @staticmethod
    def _discrepancies(errors, norms, x):
        batch = (x[0] if isinstance(x, tuple) else x).shape[0]
        return dict(zip(errors, (norms * norms / batch).unbind()))


def _with_norms(loss, errors, updates, error_sq):
    """(loss, errors, updates, the errors' norms stacked, the updates' norms stacked or None).
    A site whose error came from the fused kernel has its norm from the kernel's per-sample
    ``sum(e^2)`` (of the stored, rounded values), so its error is not read again."""
    return loss, errors, updates, _error_norms(errors, error_sq), \
        (_stacked_norms(updates, loss.device) if updates else None)


def _error_norms(errors, error_sq):
    """Every site's error norm, in float32 or wider, in the order of ``errors``."""
    norms = {}
    rest = [s for s in errors if s not in error_sq]
    if rest:
        tensors = [errors[s] for s in rest]
        wide = any(e.dtype == torch.float64 for e in tensors)
        norms.update(zip(rest, torch._foreach_norm(tensors, 2, dtype=torch.float64 if wide
                                                   else torch.float32)))
    if error_sq:
        norms.update(zip(error_sq, torch.stack(list(error_sq.values())).sum(1).sqrt().unbind()))
    return torch.stack([norms[s] for s in errors])


def _stacked_norms(tensors, device):
    """Frobenius norms of tensors that may live on several devices, stacked on ``device``."""
    norms = torch._foreach_norm(tensors)
    if any(n.device != device for n in norms):
        norms = [n.to(device) for n in norms]
    return torch.stack(norms)


def _kernels_available(device):
    try:
        from .. import kernels
    except ImportError:                  # a source checkout without the installed package
        return False
    return kernels.available(device)


def _use_kernels(choice, device):
    """Whether the program takes the Triton path for ``kernels=choice`` (checked by
    ``fxlra.options.check``) on ``device``."""
    if choice == "triton" and not _kernels_available(device):
        raise OptionError(f"kernels='triton' needs Triton and a CUDA device (or TRITON_INTERPRET=1 "
                          f"set before torch is imported); the model is on {device}. Use "
                          "kernels='auto' to fall back to torch ops")
    return choice == "triton" or (choice == "auto" and device.type == "cuda" and
                                  _kernels_available(device))
