"""``fxlra.compile``: the pipeline from a model to a ``fxlra.Program``, one line a stage: check
the options, trace (frontend), find the error sites and owners (analysis), wire the error graph,
build the error synapses, verify the Plan, place it on the devices, and generate the update
program (the Program's code generator).
"""
import torch

from .analysis import placement, sites as analysis, wiring as wiring_mod
from . import options as options_mod
from .frontend import export as export_mod, passes, shapes, trace
from .semantics import rules, synapses as syn
from .errors import OptionError, PlanError, TraceError
from .analysis.params import multi_op_modules
from .analysis.normed import reading_norms
from .analysis.plan import Plan
from .runtime.program import Program


def _features(gm, name):
    """Features per sample of a node's value (its size without the batch dimension)."""
    shape = shapes.shape_of(next(n for n in gm.graph.nodes if n.name == name)) or (1, 1)
    return int(torch.Size(shape[1:]).numel())


def compile(model, wiring="residual", *, depth=2, loss="cross_entropy", beta=0.1, gamma=1.0,
            alpha=1.0, kappa=1.0, error_rule=None, local_rule="hebbian", clip=1.0,
            error_init_std=0.05, synapses=None, leaf_modules=(), concrete_args=None,
            example_inputs=None, nonfinite="raise", max_skips=10, kernels="auto", devices=None,
            streams="auto", cuda_graph=False, preset=None, scope=None, norm_error=None,
            map_synapse=None, shared_params="sum", frontend="auto", example_kwargs=None):
    """Trace ``model``, find its error sites, wire them, and return a :class:`Program`.

    See the README for every option and the paper's value of each in each experiment.
    """
    options, devices = options_mod.check(
        loss=loss, beta=beta, gamma=gamma, alpha=alpha, kappa=kappa, error_rule=error_rule,
        local_rule=local_rule, clip=clip, error_init_std=error_init_std, nonfinite=nonfinite,
        max_skips=max_skips, kernels=kernels, devices=devices, streams=streams,
        cuda_graph=cuda_graph, preset=preset, scope=scope, norm_error=norm_error,
        map_synapse=map_synapse, shared_params=shared_params)
    given = example_inputs
    gm, example_inputs = _capture(model, frontend, leaf_modules, concrete_args, example_inputs,
                                  example_kwargs)

    def analysed(gm, inputs):
        return analysis.analyse(gm, model, rules.OUTPUT_PHI[options.loss], inputs,
                                options.scope, options.shared_params)
    try:
        sites, params, site_graph = analysed(gm, example_inputs)
    except PlanError as exc:
        if frontend != "auto" or gm.meta["frontend"][0] != "fx" or given is None or \
                not hasattr(exc, "detail"):
            raise
        # symbolic tracing took a branch on a traced value (``if mask is not None`` of a
        # default-None input): its graph fails on the batch the model runs
        gm, example_inputs = _instead(model, given, example_kwargs, exc, "its torch.fx graph "
                                      f"fails on the example batch ({exc.detail})")
        sites, params, site_graph = analysed(gm, example_inputs)
    graph, name = wiring_mod.build(wiring, site_graph, depth)
    edges, modules = syn.build_edges(sites, graph, synapses, error_init_std, gm,
                                     options.map_synapse)
    normed = reading_norms(gm, sites, site_graph.outputs, dict(gm.named_modules())) \
        if options.norm_error == "vjp" else ()
    plan = Plan(sites=sites, outputs=site_graph.outputs, params=params, edges=edges,
                wiring=name, blocks=site_graph.blocks, normed=normed).verify()
    where = _place(model, gm, plan, modules, devices)
    prog = Program(model, gm, plan, graph, modules, options, devices=devices, placement=where)
    return prog.train(model.training)


def _capture(model, frontend, leaf_modules, concrete_args, example_inputs, example_kwargs):
    """(the model's graph, the example batch as its inputs): symbolic tracing, torch.export, or
    with ``frontend="auto"`` the first that works; ``gm.meta["frontend"]`` says which, and why."""
    options_mod.check_choice("frontend", frontend, export_mod.FRONTENDS)
    if frontend == "export":
        return _exported(model, example_inputs, example_kwargs, "frontend='export'")
    if example_kwargs and frontend == "fx":
        raise OptionError("example_kwargs= is for frontend='export' (symbolic tracing takes "
                          "the model's inputs positionally); fix keyword inputs with "
                          "concrete_args={name: value} instead")
    try:
        gm = _trace(model, leaf_modules, concrete_args)
    except TraceError as exc:
        if frontend == "fx":
            raise
        if example_inputs is None and not example_kwargs:
            raise TraceError(f"{exc} Or pass an example batch (example_inputs=x) so that fxlra "
                             "captures the model with torch.export instead") from None
        return _instead(model, example_inputs, example_kwargs, exc,
                        f"torch.fx could not trace it ({getattr(exc, 'kind', exc)})")
    gm.meta["frontend"] = ("fx", "torch.fx symbolic tracing")
    return gm, example_inputs


def _instead(model, example_inputs, example_kwargs, exc, why):
    """torch.export's graph where symbolic tracing failed (``exc``, said by ``why``); where
    export fails too, ``exc`` again, with export's reason."""
    try:
        return _exported(model, example_inputs, example_kwargs, why)
    except TraceError as second:
        raise type(exc)(f"{exc} torch.export could not capture it either: "
                        f"{second.reason}") from None


def _exported(model, example_inputs, example_kwargs, why):
    gm, inputs = export_mod.export(model, example_inputs, example_kwargs)
    gm = passes.make_out_of_place(gm)
    gm.meta["frontend"] = ("export", f"torch.export, training mode, ATen ops: {why}")
    return gm, inputs


def _trace(model, leaf_modules, concrete_args):
    """The model's graph, every op a node of its own (a module that uses a parameter in several
    ops is traced through) and out of place."""
    gm = trace.trace(model, leaf_modules, concrete_args)
    multi = multi_op_modules(gm, model)
    if multi:
        gm = trace.trace(model, tuple(leaf_modules) + tuple(multi), concrete_args)
    return passes.make_out_of_place(gm)


def _place(model, gm, plan, modules, devices):
    """Each error synapse on its child site's device, in the model's dtype; with ``devices``,
    the site -> device index placement (0: the model's device), else None."""
    like = next(model.parameters(), torch.empty(0))
    where = None
    if devices is not None:
        if devices[0] != like.device:
            raise OptionError(f"devices[0] is {devices[0]} but the model is on {like.device}; the "
                              "first device is the model's (its forward and updates run there)")
        sizes = {site.name: _features(gm, site.name) for site in plan.sites}
        where = placement.place(plan, sizes, len(devices))
    for e in plan.edges:
        k = (where or {}).get(e.child, 0)
        modules[e.key].to(device=devices[k] if k else like.device, dtype=like.dtype)
    return where
