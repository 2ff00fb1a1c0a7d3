"""``fxlra.compile``: the pipeline from a model to a :class:`~fxlra.program.Program`: check the
options, trace, analyse, wire, build the error synapses, verify the Plan.
"""
import torch

from . import (analysis, options as options_mod, passes, placement, rules, shapes,
               synapses as syn, trace, wiring as wiring_mod)
from .errors import OptionError, WiringError
from .params import multi_op_modules
from .plan import Edge, Plan
from .program import Program


def _node(gm, name):
    return next(n for n in gm.graph.nodes if n.name == name)


def _features(gm, name):
    """Features per sample of a node's value (its size without the batch dimension)."""
    shape = shapes.shape_of(next(n for n in gm.graph.nodes if n.name == name)) or (1, 1)
    return int(torch.Size(shape[1:]).numel())


def _build_edges(plan_sites, graph, overrides, std, gm=None, map_synapse="spatial"):
    """Edges of the error graph with their synapse modules, in a deterministic order."""
    index = {s.name: s for s in plan_sites}
    position = {s.name: k for k, s in enumerate(plan_sites)}
    pairs = sorted(graph.edges(), key=lambda e: (position[e[1]], position[e[0]]))
    overrides = dict(overrides or {})
    unknown = [k for k in overrides if tuple(k) not in set(pairs)]
    if unknown:
        raise WiringError(f"synapses= names edges {unknown} that are not in the error graph")
    edges, modules = [], {}
    for parent, child in pairs:
        override = overrides.get((parent, child))
        shape = shapes.shape_of(_node(gm, child)) if gm is not None else None
        module = syn.make(index[parent].layout, index[child].layout, std, override, shape,
                          map_synapse)
        kind = module.kind if isinstance(module, syn.Synapse) else "custom"
        edge = Edge(parent, child, kind, index[parent].layout.channels,
                    index[child].layout.channels)
        edges.append(edge)
        modules[edge.key] = module
    return tuple(edges), modules


def compile(model, wiring="residual", *, depth=2, loss="cross_entropy", beta=0.1, gamma=1.0,
            alpha=1.0, kappa=1.0, error_rule=None, local_rule="hebbian", clip=1.0,
            error_init_std=0.05, synapses=None, leaf_modules=(), concrete_args=None,
            example_inputs=None, nonfinite="raise", max_skips=10, kernels="auto", devices=None,
            streams="auto", cuda_graph=False, preset=None, scope=None, norm_error=None,
            map_synapse=None, shared_params="sum"):
    """Trace ``model``, find its error sites, wire them, and return a :class:`Program`.

    See the README for every option and the paper's value of each in each experiment.
    """
    options, devices = options_mod.check(
        loss=loss, beta=beta, gamma=gamma, alpha=alpha, kappa=kappa, error_rule=error_rule,
        local_rule=local_rule, clip=clip, error_init_std=error_init_std, nonfinite=nonfinite,
        max_skips=max_skips, kernels=kernels, devices=devices, streams=streams,
        cuda_graph=cuda_graph, preset=preset, scope=scope, norm_error=norm_error,
        map_synapse=map_synapse, shared_params=shared_params)
    gm = trace.trace(model, leaf_modules, concrete_args)
    multi = multi_op_modules(gm, model)
    if multi:                      # modules using a parameter in several ops: one op each
        gm = trace.trace(model, tuple(leaf_modules) + tuple(multi), concrete_args)
    gm = passes.make_out_of_place(gm)
    sites, params, site_graph = analysis.analyse(gm, model, rules.OUTPUT_PHI[options.loss],
                                                 example_inputs, options.scope,
                                                 options.shared_params)
    graph, name = wiring_mod.build(wiring, site_graph, depth)
    edges, modules = _build_edges(sites, graph, synapses, error_init_std, gm,
                                  options.map_synapse)
    plan = Plan(sites=sites, outputs=site_graph.outputs, params=params, edges=edges,
                wiring=name, blocks=site_graph.blocks).verify()
    like = next(model.parameters(), torch.empty(0))
    where = None                      # site -> device index (0: the model's), with devices=
    if devices is not None:
        if devices[0] != like.device:
            raise OptionError(f"devices[0] is {devices[0]} but the model is on {like.device}; the "
                              "first device is the model's (its forward and updates run there)")
        sizes = {site.name: _features(gm, site.name) for site in sites}
        where = placement.place(plan, sizes, len(devices))
    for e in plan.edges:              # each error synapse on its child's device
        k = (where or {}).get(e.child, 0)
        modules[e.key].to(device=devices[k] if k else like.device, dtype=like.dtype)
    prog = Program(model, gm, plan, graph, modules, options, devices=devices, placement=where)
    prog.train(model.training)
    return prog
