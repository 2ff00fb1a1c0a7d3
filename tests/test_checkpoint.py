"""fxlra.checkpoint: save/load split runs equal unsplit ones bit for bit (in new processes), a
save killed by SIGKILL leaves the previous checkpoint loadable, a checkpoint of another program is
refused naming the difference, a crafted pickle is refused without running, and seeding makes
runs repeatable (docs/design.md section 4)."""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import fxlra
from conftest import make_cnn, make_mlp

ROOT = Path(__file__).resolve().parents[1]

# A run of rec-LRA steps with everything that carries state across steps: dropout (torch RNG),
# batch norm (running stats), Adam (moments), a scheduler, a data order from its own generator,
# and the program's step counter. `python run.py OUT TOTAL [STOP] [RESUME]` runs steps
# [start, STOP), saving a checkpoint at STOP when STOP < TOTAL, and writes the final state to OUT.
RUN = textwrap.dedent('''
    import sys
    import torch
    from torch import nn
    import fxlra
    out, total = sys.argv[1], int(sys.argv[2])
    stop = int(sys.argv[3]) if len(sys.argv) > 3 else total
    resume = sys.argv[4] if len(sys.argv) > 4 else None
    torch.set_num_threads(1)
    fxlra.seed_everything(7, deterministic=True)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Dropout(0.2), nn.Flatten(), nn.Linear(6 * 6 * 6, 5))
    prog = fxlra.compile(model, wiring="pairwise", error_rule="hebbian-d",
                         example_inputs=torch.zeros(2, 3, 6, 6))
    opt = torch.optim.Adam(prog.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    data = torch.Generator().manual_seed(3)
    xs, ys = torch.randn(40, 3, 6, 6), torch.arange(40) % 5
    start = 0
    if resume:
        state = fxlra.load(resume, prog, opt, sched)
        start = state["step"]
        data.set_state(state["data_rng"])
    for k in range(start, stop):
        idx = torch.randperm(40, generator=data)[:8]
        prog.step(xs[idx], ys[idx])
        opt.step(); opt.zero_grad(); sched.step()
    if stop < total:
        fxlra.save(out + ".ckpt", prog, opt, sched, step=stop, data_rng=data.get_state())
    torch.save({"prog": prog.state_dict(), "opt": opt.state_dict(),
                "rng": torch.get_rng_state()}, out)
''')


def run(tmp_path, *args):
    script = tmp_path / "run.py"
    script.write_text(RUN)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, str(script), *map(str, args)], check=True, env=env,
                   cwd=tmp_path, timeout=300)


def assert_bitwise_equal(a, b, where=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_bitwise_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for k, (u, v) in enumerate(zip(a, b)):
            assert_bitwise_equal(u, v, f"{where}[{k}]")
    elif torch.is_tensor(a):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    else:
        assert a == b, where


def test_a_run_split_by_save_and_load_in_new_processes_equals_the_unsplit_run(tmp_path):
    run(tmp_path, tmp_path / "whole.pt", 6)
    run(tmp_path, tmp_path / "first.pt", 6, 3)
    run(tmp_path, tmp_path / "second.pt", 6, 6, tmp_path / "first.pt.ckpt")
    whole = torch.load(tmp_path / "whole.pt", weights_only=True)
    split = torch.load(tmp_path / "second.pt", weights_only=True)
    assert split["prog"]["_extra_state"] == {"steps": 6, "skips": 0}
    assert_bitwise_equal(whole, split)
    first = torch.load(tmp_path / "first.pt", weights_only=True)   # the split changed something
    assert not torch.equal(first["prog"]["model.5.weight"], whole["prog"]["model.5.weight"])


# A process that saves a first checkpoint, then starts a second save and is killed while the
# second one waits in fsync (a hook stands in for a slow disk).
KILLED = textwrap.dedent('''
    import os, sys, time
    import torch
    import fxlra
    from torch import nn
    path = sys.argv[1]
    model = nn.Linear(4, 3)
    fxlra.save(path, model, epoch=1)
    with torch.no_grad():
        model.weight.add_(1.0)
    def stall(fd):
        print("writing", flush=True)
        time.sleep(60)
    os.fsync = stall
    fxlra.save(path, model, epoch=2)
''')


def test_a_save_killed_by_sigkill_leaves_the_previous_checkpoint_loadable(tmp_path):
    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    path = tmp_path / "ckpt.pt"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE,
                            env=env, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt.pt.tmp-")]
    assert leftovers, "the killed save should have left its temporary file"
    model = nn.Linear(4, 3)
    before = model.weight.clone()
    assert fxlra.load(path, model) == {"epoch": 1}
    assert not torch.equal(before, model.weight)
    fxlra.save(path, model, epoch=3)                 # a new save ignores the leftovers
    assert fxlra.load(path, nn.Linear(4, 3)) == {"epoch": 3}


def test_loading_into_another_wiring_names_the_difference_and_changes_nothing(tmp_path):
    prog = fxlra.compile(make_cnn(), wiring="pairwise")
    fxlra.save(tmp_path / "c.pt", prog)
    other = fxlra.compile(make_cnn(), wiring="direct")
    before = {k: v.clone() for k, v in other.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(fxlra.CheckpointError) as info:
        fxlra.load(tmp_path / "c.pt", other)
    msg = str(info.value)
    assert "saved from another program" in msg
    assert "wiring: checkpoint 'pairwise', this program 'direct'" in msg
    for k, v in other.state_dict().items():
        if torch.is_tensor(v):
            assert torch.equal(v, before[k])


def test_loading_into_another_model_names_the_tensors_that_differ(tmp_path):
    fxlra.save(tmp_path / "m.pt", fxlra.compile(make_mlp(widths=(8, 7))))
    with pytest.raises(fxlra.CheckpointError) as info:
        fxlra.load(tmp_path / "m.pt", fxlra.compile(make_mlp(widths=(8, 9))))
    assert "shapes differ" in str(info.value) and "model.2.weight [7, 8] vs [9, 8]" in \
        str(info.value)


def test_options_are_part_of_the_fingerprint(tmp_path):
    fxlra.save(tmp_path / "o.pt", fxlra.compile(make_mlp(), beta=0.1))
    with pytest.raises(fxlra.CheckpointError, match="options"):
        fxlra.load(tmp_path / "o.pt", fxlra.compile(make_mlp(), beta=0.2))
    # how a run reacts to a non-finite step may change on resume (e.g. to skip a bad batch)
    fxlra.load(tmp_path / "o.pt", fxlra.compile(make_mlp(), beta=0.1, nonfinite="skip"))
    # so may how it runs: kernels, streams, CUDA graphs
    fxlra.load(tmp_path / "o.pt", fxlra.compile(make_mlp(), beta=0.1, kernels="torch",
                                                 streams=3, cuda_graph=True))


class Exploit:
    """A pickle that would create a file when unpickled without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_crafted_checkpoint_is_refused_and_its_code_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "fxlra-checkpoint-1", "model": Exploit(str(marker))}, path)
    with pytest.raises(fxlra.CheckpointError, match="refused to load .*weights_only=True"):
        fxlra.load(path, nn.Linear(2, 2))
    assert not marker.exists()


def test_state_that_cannot_be_loaded_safely_is_refused_before_writing(tmp_path):
    import argparse
    with pytest.raises(fxlra.CheckpointError, match=r"\['args'\] is a Namespace.*vars\(args\)"):
        fxlra.save(tmp_path / "n.pt", nn.Linear(2, 2), args=argparse.Namespace(lr=1))
    assert list(tmp_path.iterdir()) == []


def test_missing_files_and_folders_are_clear_errors(tmp_path):
    with pytest.raises(fxlra.CheckpointError, match="no checkpoint at"):
        fxlra.load(tmp_path / "none.pt", nn.Linear(2, 2))
    with pytest.raises(fxlra.CheckpointError, match="folder .* does not exist"):
        fxlra.save(tmp_path / "no" / "c.pt", nn.Linear(2, 2))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(fxlra.CheckpointError, match="refused to load"):
        fxlra.load(tmp_path / "junk.pt", nn.Linear(2, 2))


def test_optimizer_and_scheduler_round_trip(tmp_path):
    prog = fxlra.compile(make_mlp())
    opt = torch.optim.AdamW(prog.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10)
    for _ in range(3):
        prog.step(torch.randn(6, 5), torch.arange(6) % 4)
        opt.step(); opt.zero_grad(); sched.step()
    fxlra.save(tmp_path / "s.pt", prog, opt, sched, epoch=3)
    twin = fxlra.compile(make_mlp())
    opt2 = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, 10)
    assert fxlra.load(tmp_path / "s.pt", twin, opt2, sched2) == {"epoch": 3}
    assert twin.steps == 3 and sched2.last_epoch == 3
    assert_bitwise_equal(opt.state_dict(), opt2.state_dict())
    with pytest.raises(fxlra.CheckpointError, match="holds no scheduler state"):
        fxlra.save(tmp_path / "t.pt", prog, opt)
        fxlra.load(tmp_path / "t.pt", twin, opt2, sched2)


def test_seed_everything_makes_two_runs_identical():
    def train():
        fxlra.seed_everything(11)
        prog = fxlra.compile(nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.3),
                                           nn.Linear(8, 4)), wiring="pairwise")
        opt = torch.optim.SGD(prog.parameters(), lr=0.1)
        for _ in range(4):
            prog.step(torch.randn(6, 5), torch.randint(0, 4, (6,)))
            opt.step(); opt.zero_grad()
        return {k: v for k, v in prog.state_dict().items() if torch.is_tensor(v)}
    a, b = train(), train()
    assert_bitwise_equal(a, b)
    with pytest.raises(TypeError, match="seed must be an int"):
        fxlra.seed_everything("1")
