"""``fxlra.compile``: the pipeline from a model to a :class:`~fxlra.program.Program`: check the
options, trace, analyse, wire, build the error synapses, verify the Plan.
"""
import torch

from . import (analysis, health, passes, placement, presets, registry, rules,
               scope as scope_mod, shapes, synapses as syn, trace, wiring as wiring_mod)
from .errors import OptionError, WiringError
from .params import SHARED_PARAMS, multi_op_modules
from .plan import Edge, Plan
from .program import KERNEL_CHOICES, Program


def _node(gm, name):
    return next(n for n in gm.graph.nodes if n.name == name)


def _features(gm, name):
    """Features per sample of a node's value (its size without the batch dimension)."""
    shape = shapes.shape_of(next(n for n in gm.graph.nodes if n.name == name)) or (1, 1)
    return int(torch.Size(shape[1:]).numel())


def _check_streams(choice, devices, cuda_graph):
    if choice != "auto" and (not isinstance(choice, int) or isinstance(choice, bool) or
                             choice < 1):
        raise OptionError(f"streams={choice!r} is not supported; pass 'auto' (4 CUDA streams on "
                          "a GPU, 1 elsewhere) or the number of streams (an int >= 1)")
    if isinstance(choice, int) and choice > 1 and devices is not None and len(devices) > 1:
        raise OptionError(f"streams={choice} cannot be combined with devices= placement on "
                          f"{len(devices)} devices; pass streams=1 or 'auto'")
    if not isinstance(cuda_graph, bool):
        raise OptionError(f"cuda_graph must be True or False, got {cuda_graph!r}")


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
    chosen = presets.resolve(preset, scope=scope, norm_error=norm_error, map_synapse=map_synapse,
                             error_rule=error_rule)
    scope, norm_error, map_synapse, error_rule = (chosen[k] for k in (
        "scope", "norm_error", "map_synapse", "error_rule"))
    rules.check_options(loss, local_rule, error_rule, beta, gamma, alpha, kappa, clip,
                        error_init_std)
    rules.check_choice("norm_error", norm_error, registry.NORM_ERRORS)
    rules.check_choice("map_synapse", map_synapse, syn.MAP_SYNAPSES)
    rules.check_choice("scope", scope, scope_mod.SCOPES)
    rules.check_choice("shared_params", shared_params, SHARED_PARAMS)
    health.check_options(nonfinite, max_skips)
    devices = placement.check_devices(devices)
    _check_streams(streams, devices, cuda_graph)
    if kernels not in KERNEL_CHOICES:
        raise OptionError(f"kernels={kernels!r} is not supported; choose one of "
                          f"{list(KERNEL_CHOICES)}")
    gm = trace.trace(model, leaf_modules, concrete_args)
    multi = multi_op_modules(gm, model)
    if multi:                      # modules using a parameter in several ops: one op each
        gm = trace.trace(model, tuple(leaf_modules) + tuple(multi), concrete_args)
    gm = passes.make_out_of_place(gm)
    sites, params, site_graph = analysis.analyse(gm, model, rules.OUTPUT_PHI[loss],
                                                 example_inputs, scope, shared_params)
    graph, name = wiring_mod.build(wiring, site_graph, depth)
    edges, modules = _build_edges(sites, graph, synapses, error_init_std, gm, map_synapse)
    plan = Plan(sites=sites, outputs=site_graph.outputs, params=params, edges=edges,
                wiring=name, blocks=site_graph.blocks).verify()
    options = dict(loss=loss, beta=beta, gamma=gamma, alpha=alpha, kappa=kappa,
                   error_rule=error_rule, local_rule=local_rule, clip=clip,
                   nonfinite=nonfinite, max_skips=max_skips, kernels=kernels, streams=streams,
                   cuda_graph=cuda_graph, preset=preset or "fxlra", scope=scope, norm_error=norm_error,
                   map_synapse=map_synapse, shared_params=shared_params)
    like = next(model.parameters(), torch.empty(0))
    if devices is not None:
        if devices[0] != like.device:
            raise OptionError(f"devices[0] is {devices[0]} but the model is on {like.device}; the "
                              "first device is the model's (its forward and updates run there)")
        sizes = {site.name: _features(gm, site.name) for site in sites}
        options.update(devices=devices, placement=placement.place(plan, sizes, len(devices)))
    for e in plan.edges:              # each error synapse on its child's device
        k = (options.get("placement") or {}).get(e.child, 0)
        modules[e.key].to(device=devices[k] if k else like.device, dtype=like.dtype)
    prog = Program(model, gm, plan, graph, modules, options)
    prog.train(model.training)
    return prog
