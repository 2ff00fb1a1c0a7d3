"""The training scripts end to end on the CPU, on tiny data sets written in the real formats
(tests/test_data.py's writers): every script with both ``--algo`` values, the files they write,
``--resume`` equal to an unsplit run, separate runs sharing one metrics table, and the metrics
and the backprop re-projection themselves."""
import contextlib
import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from fxlra import training
from fxlra.train import metrics
from fxlra.errors import DataError
from test_data import write_cifar, write_image_folder, write_mnist

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_mnist(root)
    write_cifar(root / "cifar")
    write_image_folder(root / "imagenet")
    return root


MLP = ["--layers", "2", "--width", "16", "-b", "10", "--lr", "2e-2"]


def mnist(tiny, out, *extra):
    return script("train_mnist").main(["--data-path", str(tiny), "--output-dir", str(out),
                                       *MLP, *extra])


def csv_rows(folder):
    with open(folder / "metrics.csv") as f:
        return list(csv.DictReader(f))


def without_time(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_mnist_both_algorithms_learn_and_write_every_output(tiny, tmp_path):
    last = mnist(tiny, tmp_path, "--epochs", "3", "--algo", "both")
    assert set(last) == {"reclra", "bp"}
    rows = json.loads((tmp_path / "metrics.json").read_text())
    assert [(r["algo"], r["epoch"]) for r in rows] == [(a, e) for a in ("reclra", "bp")
                                                       for e in (1, 2, 3)]
    for algo in ("reclra", "bp"):
        losses = [r["train_loss"] for r in rows if r["algo"] == algo]
        assert losses[0] > losses[1] > losses[2], f"{algo} did not learn: {losses}"
        assert last[algo]["accuracy"] > 25.0 and last[algo]["test_loss"] < 2.1  # chance: 10%
    for r in rows:
        assert {"top5", "precision", "recall", "f1", "lr", "test_loss"} <= set(r)
        assert all(0.0 <= r[k] <= 100.0 for k in ("accuracy", "top5", "precision", "f1"))
    table = csv_rows(tmp_path)
    assert [(r["algo"], int(r["epoch"])) for r in table] == [(r["algo"], r["epoch"]) for r in rows]
    assert float(table[-1]["accuracy"]) == rows[-1]["accuracy"]
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name for p in tmp_path.glob("checkpoint-*.pt")} == {"checkpoint-reclra.pt",
                                                                   "checkpoint-bp.pt"}
    if training.diagnostics_report() is not None:
        lines = [json.loads(ln) for ln in (tmp_path / "diagnostics.jsonl").read_text().splitlines()]
        assert [(d["algo"], d["epoch"]) for d in lines] == [("reclra", e) for e in (1, 2, 3)]
        assert all(isinstance(v, float) for d in lines for k, v in d.items()
                   if k not in ("algo", "epoch"))


def test_resume_continues_where_it_stopped(tiny, tmp_path, capsys):
    whole, split = tmp_path / "whole", tmp_path / "split"
    mnist(tiny, whole, "--epochs", "2")
    mnist(tiny, split, "--epochs", "1")
    mnist(tiny, split, "--epochs", "2", "--resume")
    assert "resumed from" in capsys.readouterr().out
    assert without_time(csv_rows(whole)) == without_time(csv_rows(split))
    for algo in ("reclra", "bp"):
        a = torch.load(whole / f"checkpoint-{algo}.pt", weights_only=True)
        b = torch.load(split / f"checkpoint-{algo}.pt", weights_only=True)
        assert a["model"].keys() == b["model"].keys()
        for name, value in a["model"].items():
            same = torch.equal(value, b["model"][name]) if torch.is_tensor(value) \
                else value == b["model"][name]           # the program's step counters
            assert same, f"{algo}: {name} differs"
        assert b["state"]["epoch"] == 2 and len(b["state"]["history"]) == 2


def test_separate_runs_share_one_table_and_a_fresh_run_replaces_its_rows(tiny, tmp_path):
    mnist(tiny, tmp_path, "--epochs", "2", "--algo", "bp", "--diagnostics-batch", "0")
    mnist(tiny, tmp_path, "--epochs", "1", "--algo", "reclra", "--diagnostics-batch", "0")
    rows = metrics.read_rows(tmp_path)
    assert [(r["algo"], r["epoch"]) for r in rows] == [("reclra", 1), ("bp", 1), ("bp", 2)]
    mnist(tiny, tmp_path, "--epochs", "1", "--algo", "bp", "--diagnostics-batch", "0")
    rows = metrics.read_rows(tmp_path)
    assert [(r["algo"], r["epoch"]) for r in rows] == [("reclra", 1), ("bp", 1)]
    assert not (tmp_path / "diagnostics.jsonl").exists()
    assert (tmp_path / "curves.png").is_file()


def test_resume_from_a_path_needs_one_algorithm(tiny, tmp_path):
    with pytest.raises(SystemExit, match="--algo reclra or --algo bp"):
        mnist(tiny, tmp_path, "--epochs", "1", "--resume", str(tmp_path / "x.pt"))


def test_print_freq_logs_the_running_loss(tiny, tmp_path, capsys):
    mnist(tiny, tmp_path, "--epochs", "1", "--algo", "bp", "--print-freq", "3")
    out = capsys.readouterr().out
    assert "bp epoch 1 [3/6] train loss" in out and "bp epoch 1 [6/6] train loss" in out
    assert "backprop test accuracy" in out


def test_both_algorithms_start_from_the_same_weights(tiny):
    args = script("train_mnist").build_parser().parse_args(["--data-path", str(tiny), *MLP])
    args.channels_last = False
    exp = script("train_mnist").experiment(args)
    lra = training.setup("reclra", exp, args, torch.device("cpu"))
    bp = training.setup("bp", exp, args, torch.device("cpu"))
    assert lra.prog is not None and bp.prog is None
    for (name, a), (_, b) in zip(lra.model.state_dict().items(), bp.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert len(list(lra.prog.parameters())) > len(list(bp.model.parameters()))  # + synapses


def test_backprop_step_reprojects_every_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(8, 6) * 50, torch.randint(0, 3, (8,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    clip = 0.5 * min(g.norm().item() for g in grads)
    training.STEPS["bp"](model, None, x, y, clip, contextlib.nullcontext())
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad.norm(), torch.tensor(clip))
        torch.testing.assert_close(p.grad, g * (clip / g.norm()))


def test_scores_macro_precision_recall_f1():
    scores = metrics.Scores(3)
    logits = torch.eye(3)[[0, 1, 1, 1]] * 5.0         # predictions 0, 1, 1, 1
    scores.add(logits, torch.tensor([0, 0, 1, 2]))
    s = scores.summary()
    assert "top5" not in s and s["accuracy"] == 50.0
    # per class (0, 1, 2): precision 1, 1/3, 0; recall 1/2, 1, 0; F1 2/3, 1/2, 0
    assert s["precision"] == pytest.approx(100 * (1 + 1 / 3) / 3)
    assert s["recall"] == pytest.approx(100 * 1.5 / 3)
    assert s["f1"] == pytest.approx(100 * (2 / 3 + 1 / 2) / 3)
    ten = metrics.Scores(10)
    ten.add(torch.arange(10.0).repeat(2, 1), torch.tensor([9, 0]))   # ranks 1 and 10
    assert ten.summary()["accuracy"] == 50.0 and ten.summary()["top5"] == 50.0


@pytest.mark.parametrize("model,algo", [("resnet18", "both"), ("presnet18", "reclra"),
                                        ("lcnet", "both")])
def test_cifar10_script(tiny, tmp_path, model, algo):
    last = script("train_cifar10").main([
        "--data-path", str(tiny / "cifar"), "--output-dir", str(tmp_path), "--model", model,
        "--width", "4", "--epochs", "1", "-b", "8", "--algo", algo])
    assert set(last) == ({"reclra", "bp"} if algo == "both" else {algo})
    for row in last.values():
        assert torch.isfinite(torch.tensor([row["train_loss"], row["test_loss"]])).all()
        assert "top5" in row
    assert len(metrics.read_rows(tmp_path)) == len(last)


@pytest.mark.parametrize("model,algo", [("resnet18", "both"), ("presnet18", "reclra")])
def test_imagenet_script(tiny, tmp_path, model, algo):
    last = script("train_imagenet").main([
        "--data-path", str(tiny / "imagenet"), "--output-dir", str(tmp_path), "--model", model,
        "--width", "4", "--image-size", "32", "--epochs", "1", "-b", "4", "-j", "0",
        "--algo", algo])
    assert set(last) == ({"reclra", "bp"} if algo == "both" else {algo})
    for row in last.values():
        assert "top5" not in row                        # 3 classes
        assert torch.isfinite(torch.tensor(row["train_loss"]))


@pytest.mark.parametrize("name", ["train_cifar10", "train_imagenet"])
def test_the_scripts_default_to_what_trains_and_keep_the_paper_one_flag_away(name):
    module = script(name)
    ours = training.parse(module.build_parser(), ["--wiring", "residual"], module.PAPER_VALUES)
    assert (ours.preset, ours.optimizer, ours.lr, ours.batch_size, ours.error_rule) == \
        ("fxlra", "adam", 1e-3, 32, "bootstrap")
    assert training.compile_options(ours)["preset"] == "fxlra"
    paper = training.parse(module.build_parser(), ["--preset", "paper", "--wiring", "residual"],
                           module.PAPER_VALUES)
    assert (paper.optimizer, paper.lr, paper.batch_size, paper.error_rule, paper.beta,
            paper.gamma, paper.alpha, paper.error_init_std) == \
        ("adamw", 1e-4, 10, "hebbian-d", 0.1205, 0.1524, [0.19, 0.24], 1.0)
    assert training.compile_options(paper)["preset"] == "paper"
    mixed = training.parse(module.build_parser(), ["--preset", "paper", "--lr", "3e-4"],
                           module.PAPER_VALUES)
    assert mixed.lr == 3e-4 and mixed.error_rule == "hebbian-d"     # a given flag wins


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py") as info:
        script("train_cifar10").main(["--data-path", str(tmp_path / "none"), "--epochs", "1"])
    assert str(tmp_path / "none") in str(info.value)
    with pytest.raises(DataError, match="no embedded copy"):
        script("train_mnist").main(["--dataset", "fashion-mnist", "--epochs", "1"])
