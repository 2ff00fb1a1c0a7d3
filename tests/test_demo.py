"""The README's demo runs end to end: one epoch of examples/mnist_demo.py prints both accuracies,
and rec-LRA's is above chance."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mlxtend", reason="the demo needs the examples extra: pip install -e '.[examples]'")

ROOT = Path(__file__).resolve().parents[1]
FINAL = re.compile(r"rec-LRA test accuracy ([0-9.]+)% \| backprop test accuracy ([0-9.]+)%")


def test_mnist_demo_one_epoch():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "mnist_demo.py"),
                           "--epochs", "1"], capture_output=True, text=True, env=env,
                          timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    match = FINAL.search(done.stdout)
    assert match, f"no final accuracy line in the demo's output:\n{done.stdout}"
    lra, bp = (float(v) for v in match.groups())
    assert 0.0 <= lra <= 100.0 and 0.0 <= bp <= 100.0
    assert lra > 20.0, f"rec-LRA reached only {lra}% after one epoch (chance is 10%)"
