"""``torchrun --nproc_per_node=2`` runs the MNIST and ImageNet scripts to completion on the CPU
(gloo), on tiny data sets in the real formats, printing one summary line per epoch (not one per
process); the two processes share the work and the metrics are reduced across them."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_data import write_image_folder, write_mnist

ROOT = Path(__file__).resolve().parents[1]


def torchrun(script, *args, timeout=240):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "examples" / script), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def epoch_lines(stdout, algo):
    return [ln for ln in stdout.splitlines() if ln.strip().startswith(f"{algo} epoch")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_mnist(root)
    write_image_folder(root / "imagenet")
    return root


def test_mnist_under_torchrun(tiny, tmp_path):
    out = torchrun("train_mnist.py", "--data-path", str(tiny), "--output-dir", str(tmp_path),
                   "--layers", "2", "--width", "16", "-b", "5", "--lr", "2e-2",
                   "--epochs", "2", "--algo", "both")
    for algo in ("rec-LRA", "backprop"):
        lines = epoch_lines(out, algo)
        assert [ln.split()[2] for ln in lines] == ["1/2", "2/2"], out
    assert sum("test accuracy" in ln for ln in out.splitlines()) == 1   # the summary, once
    rows = json.loads((tmp_path / "metrics.json").read_text())
    assert [(r["algo"], r["epoch"]) for r in rows] == [("reclra", 1), ("reclra", 2),
                                                       ("bp", 1), ("bp", 2)]
    assert (tmp_path / "checkpoint-reclra.pt").is_file()
    assert not list(tmp_path.glob(".checkpoint-*.tmp-*"))


def test_imagenet_under_torchrun(tiny, tmp_path):
    out = torchrun("train_imagenet.py", "--data-path", str(tiny / "imagenet"),
                   "--output-dir", str(tmp_path), "--model", "resnet18", "--width", "4",
                   "--image-size", "32", "--epochs", "1", "-b", "2", "-j", "0",
                   "--algo", "reclra")
    assert len(epoch_lines(out, "rec-LRA")) == 1, out
    rows = json.loads((tmp_path / "metrics.json").read_text())
    assert len(rows) == 1 and rows[0]["epoch"] == 1
