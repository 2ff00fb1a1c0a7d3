"""Language-model benchmark: a small GPT-2 (Hugging Face ``GPT2LMHeadModel`` from a config, no
weights downloaded) trained by rec-LRA as a byte-level language model, against backprop with the
same model, initial weights, optimizer and token windows. The corpus is the Python standard
library's own ``.py`` files, split by file (every tenth file, by sorted path, is held out), so
every machine has it. A benchmark, not a test: it prints a table and writes JSON.

    python3 benchmarks/language_model.py                 # 3 epochs of 150 steps: every variant
    python3 benchmarks/language_model.py --epochs 1 --steps 50 --variants default
    python3 benchmarks/language_model.py --family llama       # results/language_model_llama.json

The model goes through ``fxlra.compile``'s torch.export frontend (symbolic tracing cannot trace
it). Held-out loss is the mean cross-entropy per byte (nats) over fixed held-out windows;
perplexity is its exponential. The unigram baseline is the held-out cross-entropy of the
training bytes' own frequencies. Results go to benchmarks/results/language_model.json.
"""
import argparse
import copy
import json
import math
import os
import sys
import sysconfig
import time

import torch
import torch.nn.functional as F

import fxlra

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "language_model.json")
LLAMA_RESULTS = os.path.join(HERE, "results", "language_model_llama.json")

# variant -> fxlra.compile options (None: backprop)
VARIANTS = {"bp": None, "default": {}, "paper": {"preset": "paper"},
            "hebbian-z": {"error_rule": "hebbian-z"},
            # the norms' input-VJP off (the residual stream's displacements among them)
            "norm-pass": {"norm_error": "pass"}}


def corpus(train_bytes, held_bytes):
    """(train, held-out) byte tensors from the standard library's top-level ``.py`` files."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(f for f in os.listdir(root) if f.endswith(".py"))
    parts = {True: [], False: []}
    for k, name in enumerate(files):
        with open(os.path.join(root, name), "rb") as fh:
            parts[k % 10 == 9].append(fh.read())
    train, held = b"".join(parts[False])[:train_bytes], b"".join(parts[True])[:held_bytes]
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8).long()  # noqa: E731
    return as_tensor(train), as_tensor(held), len(files)


def windows(data, starts, context):
    """(inputs, next-byte labels) for the windows starting at ``starts``: (B, T) each."""
    index = starts[:, None] + torch.arange(context + 1)
    chunk = data[index]
    return chunk[:, :-1], chunk[:, 1:]


def unigram_loss(train, held):
    counts = torch.bincount(train, minlength=256).double() + 1.0      # add-one smoothing
    log_p = (counts / counts.sum()).log()
    return float(-log_p[held].mean())


def make_model(args, seed):
    """GPT-2 (LayerNorms), or with ``--family llama`` Llama (RMSNorms written out, rotary
    positions, a SwiGLU MLP of twice the width), at the same sizes."""
    import transformers
    torch.manual_seed(seed)
    if args.family == "llama":
        config = transformers.LlamaConfig(
            vocab_size=256, hidden_size=args.width, intermediate_size=2 * args.width,
            num_hidden_layers=args.layers, num_attention_heads=args.heads,
            num_key_value_heads=args.heads, max_position_embeddings=args.context,
            bos_token_id=0, eos_token_id=0, pad_token_id=0)
        return transformers.LlamaForCausalLM(config).train()
    config = transformers.GPT2Config(vocab_size=256, n_positions=args.context, n_embd=args.width,
                                     n_layer=args.layers, n_head=args.heads,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).train()


@torch.no_grad()
def held_out_loss(model, held_x, held_y):
    model.eval()
    total = sum(F.cross_entropy(model(held_x[k:k + 64])[0].flatten(0, 1),
                                held_y[k:k + 64].flatten(), reduction="sum").item()
                for k in range(0, len(held_x), 64))
    model.train()
    return total / held_y.numel()


def run(variant, args, data, seed):
    train, held_x, held_y = data
    base = make_model(args, seed)
    model = copy.deepcopy(base)
    options = VARIANTS[variant]
    if options is None:
        step = None
        params = list(model.parameters())
    else:
        prog = fxlra.compile(model, example_inputs=held_x[:2], **options)
        step, params = prog.step, list(prog.parameters())
    opt = torch.optim.Adam(params, lr=args.lr)
    order = torch.Generator().manual_seed(seed)
    curve, start = [held_out_loss(model, held_x, held_y)], time.time()
    for _ in range(args.epochs):
        for _ in range(args.steps):
            starts = torch.randint(0, len(train) - args.context - 1, (args.batch,),
                                   generator=order)
            x, y = windows(train, starts, args.context)
            if step is None:
                logits = model(x)[0]
                F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
            else:
                step(x, y)
            opt.step()
            opt.zero_grad(set_to_none=True)
        curve.append(held_out_loss(model, held_x, held_y))
    return {"variant": variant, "seed": seed, "held_out_loss": curve,
            "seconds": time.time() - start}


def table(results, unigram):
    epochs = len(results[0]["held_out_loss"])
    head = "| variant | " + " | ".join(f"epoch {k}" for k in range(epochs)) + \
        " | perplexity (last) | seconds |"
    lines = [head, "|" + "---|" * (epochs + 3)]
    for r in results:
        cells = " | ".join(f"{v:.3f}" for v in r["held_out_loss"])
        lines.append(f"| {r['variant']} | {cells} | {math.exp(r['held_out_loss'][-1]):.2f} | "
                     f"{r['seconds']:.0f} |")
    lines.append(f"| unigram baseline | {unigram:.3f} | | {math.exp(unigram):.2f} | |")
    return "\n".join(lines)


def add_model_args(p, out):
    """The model, optimizer and data arguments this benchmark and its probe share."""
    p.add_argument("--family", choices=("gpt2", "llama"), default="gpt2")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--held-windows", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=out)


def setup(args):
    """Threads set; (train bytes, held-out bytes, held-out windows and labels, unigram loss,
    file count)."""
    torch.set_num_threads(args.threads)
    train, held, files = corpus(2_000_000, 200_000)
    starts = torch.linspace(0, len(held) - args.context - 2, args.held_windows).long()
    held_x, held_y = windows(held, starts, args.context)
    return train, held, held_x, held_y, unigram_loss(train, held_y.flatten()), files


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps", type=int, default=150, help="steps per epoch")
    add_model_args(p, None)
    args = p.parse_args(argv)
    args.out = args.out or (LLAMA_RESULTS if args.family == "llama" else RESULTS)
    train, held, held_x, held_y, unigram, files = setup(args)
    results = []
    for variant in args.variants:
        results.append(run(variant, args, (train, held_x, held_y), args.seed))
        print(f"{variant}: {results[-1]['held_out_loss']}", file=sys.stderr, flush=True)
    print(table(results, unigram))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"settings": vars(args), "files": files, "train_bytes": len(train),
                   "held_out_bytes": len(held), "unigram": unigram, "results": results}, fh,
                  indent=1)


if __name__ == "__main__":
    main()
