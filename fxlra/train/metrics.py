"""Per-epoch classification metrics and the files they go to: ``metrics.csv``, ``metrics.json``
and the learning-curve picture ``curves.png`` (rec-LRA against backprop).

``Scores`` accumulates a test pass batch by batch (no logits are kept): mean cross-entropy,
top-1 and top-5 accuracy, and macro precision, recall and F1 from the confusion matrix (averaged
over the classes that occur among the labels or the predictions; a class never predicted has
precision 0). Accuracies and the macro scores are in %.

The files hold one row per algorithm and epoch; ``merge_rows`` replaces one algorithm's rows and
keeps the others', so runs of ``--algo reclra`` and ``--algo bp`` into the same output folder end
up side by side in one table and one picture.
"""
import csv
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

FIELDS = ("algo", "epoch", "lr", "train_loss", "test_loss", "accuracy", "top5", "precision",
          "recall", "f1", "seconds")
LABELS = {"reclra": "rec-LRA", "bp": "backprop"}
PANELS = (("train_loss", "train loss"), ("test_loss", "test loss"),
          ("accuracy", "test accuracy (%)"))


class Scores:
    """Running test metrics for ``classes`` classes; ``add(logits, labels)`` per batch."""

    def __init__(self, classes):
        self.classes = classes
        self.count = 0
        self.loss = self.top1 = self.top5 = 0.0
        self.confusion = torch.zeros(classes * classes, dtype=torch.long)

    @torch.no_grad()
    def add(self, logits, labels):
        logits = logits.float()
        self.count += len(labels)
        self.loss += F.cross_entropy(logits, labels, reduction="sum").item()
        top = logits.topk(min(5, self.classes), dim=1).indices
        hits = top == labels[:, None]
        self.top1 += hits[:, 0].sum().item()
        self.top5 += hits.any(1).sum().item()
        pairs = labels * self.classes + top[:, 0]
        self.confusion += torch.bincount(pairs, minlength=self.classes ** 2).cpu()

    def merge(self, all_reduce_sum):
        """Add up the scores of every process (``all_reduce_sum``: list of floats -> sums)."""
        sums = all_reduce_sum([self.count, self.loss, self.top1, self.top5]
                              + self.confusion.tolist())
        self.count, self.loss, self.top1, self.top5 = int(sums[0]), sums[1], sums[2], sums[3]
        self.confusion = torch.tensor(sums[4:], dtype=torch.float64).round().long()

    def summary(self):
        """{test_loss, accuracy, [top5,] precision, recall, f1}; top5 only for > 5 classes."""
        n = max(self.count, 1)
        cm = self.confusion.view(self.classes, self.classes).double()   # rows: true class
        tp, predicted, actual = cm.diagonal(), cm.sum(0), cm.sum(1)
        seen = (predicted + actual) > 0
        precision = torch.where(predicted > 0, tp / predicted.clamp_min(1), torch.zeros_like(tp))
        recall = torch.where(actual > 0, tp / actual.clamp_min(1), torch.zeros_like(tp))
        f1 = torch.where(precision + recall > 0,
                         2 * precision * recall / (precision + recall).clamp_min(1e-12),
                         torch.zeros_like(tp))
        macro = {k: 100.0 * v[seen].mean().item() if seen.any() else 0.0
                 for k, v in (("precision", precision), ("recall", recall), ("f1", f1))}
        out = {"test_loss": self.loss / n, "accuracy": 100.0 * self.top1 / n}
        if self.classes > 5:
            out["top5"] = 100.0 * self.top5 / n
        return {**out, **macro}


def read_rows(folder):
    """The rows of ``folder/metrics.json`` (empty if there is none)."""
    path = Path(folder) / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else []


def merge_rows(rows, algo, history):
    """``rows`` with ``algo``'s rows replaced by ``history``, ordered by algorithm and epoch."""
    order = {a: k for k, a in enumerate(LABELS)}
    kept = [r for r in rows if r.get("algo") != algo] + list(history)
    return sorted(kept, key=lambda r: (order.get(r["algo"], len(order)), r["algo"], r["epoch"]))


def _replace(path, write):
    """Write a file through a temporary one in the same folder, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        write(f)
    os.replace(tmp, path)


def write_tables(folder, rows):
    """``metrics.json`` (a list of rows) and ``metrics.csv`` (a header, then one line a row)."""
    folder = Path(folder)
    _replace(folder / "metrics.json", lambda f: json.dump(rows, f, indent=1))
    fields = [k for k in FIELDS if any(k in r for r in rows)]
    fields += sorted({k for r in rows for k in r} - set(fields))

    def write_csv(f):
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)
    _replace(folder / "metrics.csv", write_csv)


def plot_curves(rows, path, title=""):
    """Train loss, test loss and test accuracy against epoch, one line per algorithm."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4))
    for algo in dict.fromkeys(r["algo"] for r in rows):
        mine = [r for r in rows if r["algo"] == algo]
        for ax, (key, name) in zip(axes, PANELS):
            points = [(r["epoch"], r[key]) for r in mine if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="." if len(points) < 30 else None,
                        label=LABELS.get(algo, algo))
    for ax, (_, name) in zip(axes, PANELS):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
