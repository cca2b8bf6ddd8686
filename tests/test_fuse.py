"""lenet_ext.fuse: Conv2d -> Sigmoid -> AvgPool2d runs of any nn.Sequential, fused, parameters shared."""

import numpy as np
import pytest
import torch
from torch import nn

import lenet_ext

from conftest import LENET_TOLERANCES as TOLERANCES
from conftest import d2l_net
from test_lenet import AtenOpRecorder


def test_fuse_shares_parameters_and_fuses_the_conv_blocks():
    model = d2l_net()
    fused = lenet_ext.fuse(model)
    assert fused.fused_runs() == [(0, 3), (3, 6)]
    assert "fused_runs=[(0, 3), (3, 6)]" in repr(fused)
    for a, b in zip(fused.parameters(), model.parameters()):
        assert a is b
    x = torch.rand(8, 1, 28, 28)
    target = torch.randint(0, 10, (8,))
    before = model(x).detach()
    torch.testing.assert_close(fused(x), before, **TOLERANCES[torch.float32])
    # Training the fused model trains the original.
    opt = torch.optim.SGD(fused.parameters(), lr=0.5)
    nn.functional.cross_entropy(fused(x), target).backward()
    opt.step()
    assert not torch.allclose(model(x), before)
    torch.testing.assert_close(fused(x), model(x), **TOLERANCES[torch.float32])


def test_fuse_leaves_other_layers_alone():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.Sigmoid(), nn.AvgPool2d(2),          # fused
        nn.Conv2d(4, 4, 3, stride=2), nn.Sigmoid(), nn.AvgPool2d(2),           # stride 2: not fused
        nn.Conv2d(4, 5, 1, bias=False), nn.Sigmoid(), nn.AvgPool2d(3, 3),      # fused, no bias, pool 3
        nn.Sequential(nn.Conv2d(5, 5, 1), nn.Sigmoid(), nn.AvgPool2d(1)),      # nested: fused
        nn.Conv2d(5, 5, 1), nn.ReLU(), nn.AvgPool2d(1),                        # ReLU: not fused
        nn.Conv2d(5, 5, 1), nn.Sigmoid(), nn.AvgPool2d(1, ceil_mode=True),     # ceil_mode: not fused
        nn.Flatten(), nn.Linear(5, 3),
    ).double()  # fmt: skip
    fused = lenet_ext.fuse(model)
    assert fused.fused_runs() == [(0, 3), (6, 9)]
    assert fused[9].fused_runs() == [(0, 3)]
    x = torch.rand(2, 3, 40, 40, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(fused(x), model(x))
    (g_fused,) = torch.autograd.grad(fused(x).sum(), x)
    (g_model,) = torch.autograd.grad(model(x).sum(), x)
    torch.testing.assert_close(g_fused, g_model)


def test_fuse_takes_sizes_of_any_integer_type():
    """Layers configured with numpy's integers, as torch's layers accept them, are fused too."""
    size = np.int64
    model = nn.Sequential(nn.Conv2d(1, 6, size(5), padding=size(2)), nn.Sigmoid(), nn.AvgPool2d(size(2))).double()
    fused = lenet_ext.fuse(model)
    assert fused.fused_runs() == [(0, 3)]
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    torch.testing.assert_close(fused(x), model(x), **TOLERANCES[torch.float64])


def test_fuse_keeps_the_state_dict_and_mode():
    model = d2l_net().eval()
    fused = lenet_ext.fuse(model)
    assert not fused.training
    assert list(fused.state_dict()) == list(model.state_dict())


def test_fuse_returns_non_sequential_modules_unchanged():
    conv = nn.Conv2d(1, 1, 3)
    assert lenet_ext.fuse(conv) is conv


class _ShiftedSigmoid(nn.Sigmoid):
    def forward(self, x):
        return torch.sigmoid(x) - 0.5


class _ConvPlusOne(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, weight, bias) + 1


class _SumPool(nn.AvgPool2d):
    def forward(self, x):
        return super().forward(x) * 4


@pytest.mark.parametrize("position", [0, 1, 2], ids=["conv", "sigmoid", "pool"])
def test_fuse_runs_subclassed_layers_as_they_are(position):
    """A subclass may compute anything: its run is not fused, in a fused Sequential or in LeNet."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 6, 5, padding=2), nn.Sigmoid(), nn.AvgPool2d(2)]
    subclass = [_ConvPlusOne(1, 6, 5, padding=2), _ShiftedSigmoid(), _SumPool(2)][position]
    layers[position] = subclass
    x = torch.rand(2, 1, 28, 28)
    lenet = lenet_ext.LeNet()
    lenet[position] = subclass
    for model, fused_runs in ((lenet_ext.fuse(nn.Sequential(*layers)), []), (lenet, [(3, 6)])):
        assert model.fused_runs() == fused_runs
        with AtenOpRecorder() as recorder:
            out = model(x)
        assert [op for op in recorder.ops if op.startswith("lenet_ext")] == ["lenet_ext.conv_sigmoid_avgpool2d"] * len(fused_runs)
        expected = x
        for layer in model:
            expected = layer(expected)
        torch.testing.assert_close(out, expected, **TOLERANCES[torch.float32])


def test_fuse_fuses_a_lazy_conv_once_it_is_initialized():
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.Sigmoid(), nn.AvgPool2d(2))
    fused = lenet_ext.fuse(model)
    x = torch.rand(2, 3, 12, 12)
    first = fused(x)  # initializes the conv, which becomes an nn.Conv2d
    assert type(model[0]) is nn.Conv2d and fused.fused_runs() == [(0, 3)]
    with AtenOpRecorder() as recorder:
        out = fused(x)
    assert recorder.ops.count("lenet_ext.conv_sigmoid_avgpool2d") == 1
    torch.testing.assert_close(out, model(x), **TOLERANCES[torch.float32])
    torch.testing.assert_close(first, out)


@pytest.mark.parametrize("position", [0, 1, 2, 5, 6], ids=["conv", "sigmoid", "pool", "linear", "linear_sigmoid"])
def test_fuse_runs_a_layer_whose_forward_was_replaced(position):
    """A forward set on the instance (patched, or wrapped by a tool) is what the layer computes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Sigmoid(), nn.AvgPool2d(2), nn.Flatten(), nn.Identity(),
                          nn.Linear(4 * 13 * 13, 5), nn.Sigmoid())  # fmt: skip
    fused = lenet_ext.fuse(model)
    x = torch.rand(2, 1, 28, 28)
    fused(x)
    layer = model[position]
    layer.forward = lambda t: type(layer).forward(layer, t) * 3
    assert fused.fused_runs() == ([] if position < 3 else [(0, 3)])
    expected = x
    for m in model:
        expected = m(expected)
    torch.testing.assert_close(fused(x), expected, **TOLERANCES[torch.float32])
    del layer.forward
    assert fused.fused_runs() == [(0, 3)]
    torch.testing.assert_close(fused(x), model(x), **TOLERANCES[torch.float32])
