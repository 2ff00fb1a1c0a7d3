"""The command-line flags every training script shares (``examples/train_*.py``), as one table,
and the ``fxlra.compile`` keywords they map to. A script passes its own defaults and the paper's
value of each option, which ``--help`` shows next to the default.
"""
import argparse

from ..semantics import rules
from ..analysis import wiring as wiring_mod

WIRINGS = {"direct": "direct", "pairwise": "pairwise", "residual": "residual",
           "blocks2": wiring_mod.blocks(2), "blocks3": wiring_mod.blocks(3),
           "skip2": wiring_mod.skip(2), "skip3": wiring_mod.skip(3)}
ERROR_RULES = tuple(rules.ERROR_RULES)
OPTIMIZER_NAMES = ("adam", "adamw", "sgd")

# -- flags ----------------------------------------------------------------------------------------
OPTIONS = (  # flags, keywords, help; "{paper}" is filled with the script's PAPER entry
    (("--preset",), dict(choices=("fxlra", "paper"), default="fxlra"),
     "fxlra: what trains (fxlra.compile's defaults: the local VJP inside residual blocks, norms "
     "carried by their input-VJP, error synapses dense to feature maps) with the script's "
     "hyperparameters below; paper: the paper's per-layer rule and every hyperparameter the "
     "paper gives (each still overridable by its flag)"),
    (("--data-path",), dict(default=None), "folder of the data set"),
    (("--output-dir",), dict(default="runs"), "metrics, curves, checkpoints and diagnostics"),
    (("--algo",), dict(choices=("reclra", "bp", "both"), default="both"),
     "rec-LRA (prog.step), backprop (loss.backward), or both in turn"),
    (("--epochs",), dict(type=int), "epochs"),
    (("-b", "--batch-size"), dict(type=int), "training batch size (of each process under "
     "torchrun)"),
    (("--eval-batch-size",), dict(type=int, default=256), "test batch size"),
    (("--optimizer",), dict(choices=OPTIMIZER_NAMES), "optimizer (sgd: momentum 0.9)"),
    (("--lr",), dict(type=float), "learning rate"),
    (("--wd", "--weight-decay"), dict(type=float, default=0.0, dest="weight_decay"),
     "weight decay"),
    (("--lr-steps",), dict(type=int, nargs="*", default=[]),
     "epochs after which the learning rate is multiplied by --lr-decay"),
    (("--lr-decay",), dict(type=float, default=0.1), "factor of each --lr-steps decay"),
    (("--clip",), dict(type=float, default=1.0),
     "re-projection radius c of every update tensor, rec-LRA and backprop alike (0: off)"),
    (("--wiring",), dict(choices=tuple(WIRINGS)), "rec-LRA error graph (blocksG: "
     "fxlra.wiring.blocks(G), skipG: fxlra.wiring.skip(G))"),
    (("--recursion-depth",), dict(type=int, default=2), "depth of --wiring residual (2 or 3)"),
    (("--error-rule",), dict(choices=ERROR_RULES), "error-synapse update rule"),
    (("--local-rule",), dict(choices=("hebbian", "dx"), default="hebbian"),
     "forward update without (hebbian) or with phi' (dx)"),
    (("--beta",), dict(type=float, default=0.1), "target step size"),
    (("--gamma",), dict(type=float, default=1.0), "error-synapse update scale"),
    (("--alpha",), dict(type=float, nargs="+", default=[1.0]),
     "error-neuron mix alpha, one value or one per error-graph depth 1, 2, ..."),
    (("--error-init-std",), dict(type=float, default=0.05),
     "std of the Gaussian that initialises the error synapses"),
    (("--seed",), dict(type=int, default=0), "initial weights and batch order"),
    (("--device",), dict(default=None), "cuda if available, else cpu"),
    (("--threads",), dict(type=int, default=1), "torch CPU threads (more gain little on small "
     "models and slow a busy machine down badly)"),
    (("-j", "--workers"), dict(type=int, default=0), "data-loading processes (image folders)"),
    (("--print-freq",), dict(type=int, default=0),
     "log the running train loss every N batches (0: once per epoch)"),
    (("--amp",), dict(action="store_true"), "bf16 autocast (CUDA only)"),
    (("--resume",), dict(nargs="?", const="auto", default=None, metavar="PATH"),
     "continue from <output-dir>/checkpoint-<algo>.pt of each algorithm, or from PATH (with a "
     "single --algo)"),
    (("--diagnostics-batch",), dict(type=int, default=64),
     "training samples that fxlra.diagnostics.report sees each epoch (0: no report)"),
)


# the CNN experiments' settings in the paper, which --paper-settings applies
PAPER_CNN_VALUES = dict(batch_size=10, optimizer="adamw", lr=1e-4, weight_decay=0.01,
                        error_rule="hebbian-d", beta=0.1205, gamma=0.1524, alpha=[0.19, 0.24],
                        error_init_std=1.0)

# what the paper says of them, for the help text (each script adds its epochs, lr, wiring)
PAPER_CNN_NOTES = dict(batch_size="10", optimizer="adamw", error_rule="hebbian-d",
                       beta="0.1205", gamma="0.1524", alpha="0.19 at depth 1, 0.24 at depth 2",
                       clip="re-projection used, radius not stated",
                       error_init_std="1.0 (unit Gaussian)", recursion_depth="2")


def perturbative_flags(p, paper_masks):
    """--nmasks and --noise-level of the pResNet-18 scripts (``paper_masks``: what the paper
    used, for the help text)."""
    p.add_argument("--nmasks", type=int, default=1,
                   help="presnet18: noise masks per input channel (default: %(default)s; "
                        f"paper: {paper_masks})")
    p.add_argument("--noise-level", type=float, default=0.1,
                   help="presnet18: std of the noise masks (default: %(default)s; paper: 0.1)")


def parser(description, defaults, paper):
    """The flags every training script shares; ``defaults`` sets the script's values and
    ``paper`` maps an option's dest to what the paper used (shown in ``--help``)."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for flags, kw, text in OPTIONS:
        action = p.add_argument(*flags, **kw, help=text)
        note = paper.get(action.dest)
        action.help = f"{text} (default: %(default)s" + (f"; paper: {note})" if note else ")")
    p.set_defaults(**defaults)
    return p


def parse(p, argv=None, paper_values=None):
    """Parse the flags; with ``--preset paper`` the script's ``paper_values`` replace its
    defaults first (a flag given on the command line still wins)."""
    first, _ = p.parse_known_args(argv)
    if first.preset == "paper" and paper_values:
        p.set_defaults(**paper_values)
    return p.parse_args(argv)


def compile_options(args):
    """``fxlra.compile`` keywords from the flags."""
    alpha = args.alpha[0] if len(args.alpha) == 1 else dict(enumerate(args.alpha, start=1))
    return dict(preset=args.preset, wiring=WIRINGS[args.wiring], depth=args.recursion_depth,
                beta=args.beta,
                gamma=args.gamma, alpha=alpha, error_rule=args.error_rule,
                local_rule=args.local_rule, clip=args.clip or None,
                error_init_std=args.error_init_std)
