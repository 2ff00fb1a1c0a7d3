"""fxlra.analysis.placement: independent error subtrees on different devices. With two "devices" that are
both the CPU the generated program's copies are real statements but move nothing, so its updates
must equal the one-device program's exactly; with two GPUs the same test runs across them."""
import copy

import pytest
import torch

import fxlra
from fxlra.analysis import placement
from fxlra.models import resnet18_cifar
from conftest import make_mlp
from helpers import assert_updates_match

pytestmark = pytest.mark.usefixtures("one_thread")


def twins(devices, model_device="cpu", **options):
    torch.manual_seed(0)
    model = resnet18_cifar(width=4).to(model_device)
    one = fxlra.compile(copy.deepcopy(model), **options)
    many = fxlra.compile(copy.deepcopy(model), devices=devices, **options)
    many.load_state_dict(one.state_dict())
    return one, many


def batch(device="cpu"):
    return torch.randn(2, 3, 8, 8, device=device), torch.arange(2, device=device) % 10


def test_block_scope_subtrees_on_other_devices_give_the_same_updates():
    one, many = twins(["cpu", "cpu"])
    assert set(many.options["placement"].values()) == {1}
    x, y = batch()
    assert_updates_match(many.updates(x, y), one.updates(x, y), "exact")


@pytest.mark.parametrize("error_rule", ["hebbian-z", "hebbian-d", "derived", "bootstrap"])
def test_subtrees_on_other_devices_give_the_same_updates(error_rule):
    one, many = twins(["cpu", "cpu"], error_rule=error_rule, scope="layer")
    where = many.options["placement"]
    assert set(where.values()) == {1} and len(where) > 4          # about half the sites moved
    assert "err_fc__on1 = err_fc.to(DEVICES[1], non_blocking=True)" in many.code
    x, y = batch()
    assert_updates_match(many.updates(x, y), one.updates(x, y), "exact")
    out = many.step(x, y)
    assert set(out.discrepancies) == set(many.sites)


def test_subtrees_partition_the_sites_below_the_output():
    prog = fxlra.compile(resnet18_cifar(width=4))
    trees = placement.subtrees(prog.plan)
    depth = prog.plan.depth
    assert all(depth[root] == 1 for root in trees)
    members = [s for sites in trees.values() for s in sites]
    assert sorted(members) == sorted(set(prog.sites) - set(prog.plan.outputs))
    chain = fxlra.compile(make_mlp(widths=(6, 6, 6)), wiring="pairwise")
    assert len(placement.subtrees(chain.plan)) == 1          # a chain cannot be split
    assert placement.place(chain.plan, {s: 1 for s in chain.sites}, 2) == {
        s: 1 for s in chain.sites if s not in chain.plan.outputs}


@pytest.mark.parametrize("devices, message", [
    ("cpu", "non-empty list"), ([], "non-empty list"), (["cpu", "nodevice"], "does not know"),
    (["meta", "cpu"], "devices\\[0\\] is meta but the model is on cpu")])
def test_bad_devices_are_option_errors(devices, message):
    with pytest.raises(fxlra.OptionError, match=message):
        fxlra.compile(make_mlp(), devices=devices)


def test_moving_the_program_puts_everything_on_one_device():
    _, many = twins(["cpu", "cpu"])
    many.double()                                           # same device: placement kept
    assert many.options.get("placement")
    many.to("meta")
    assert "placement" not in many.options and "__on1" not in many.code


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_subtrees_on_a_second_gpu_give_the_same_updates():
    one, many = twins(["cuda:0", "cuda:1"], model_device="cuda:0")
    assert any(p.device.index == 1 for p in many.synapses.parameters())
    x, y = batch("cuda:0")
    a, b = one.updates(x, y), many.updates(x, y)
    assert_updates_match({k: v.to("cuda:0") for k, v in b.items()}, a, "cuda_streams")
