"""LeNet and fuse()'d models through pickle, torch.save, FX's symbolic tracing,
torch.jit.trace and torch.jit.script, as the nn.Sequential they replace goes through them
(TorchScript is deprecated by PyTorch, but still in use)."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import lenet_ext
from lenet_ext import LeNet

from conftest import DEVICES, LENET_TOLERANCES, twin_pair

# Newer torch warns with FutureWarning, torch 2.11 with DeprecationWarning.
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning"),
]

TOL = LENET_TOLERANCES[torch.float32]


def assert_same_model(model, ref, x):
    """Outputs in inference and training, and the gradients of every parameter."""
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), **TOL)
    got = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
    want = torch.autograd.grad(ref(x).square().sum(), list(ref.parameters()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)


def roundtrip(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("device", DEVICES)
def test_whole_model_pickles_after_a_call(device):
    """The layout cache a call leaves behind is not pickled; the loaded model builds its own."""
    net, ref = twin_pair(device=device)
    x = torch.rand(5, 1, 28, 28, device=device)
    net(x)
    for loaded in (roundtrip(net), pickle.loads(pickle.dumps(net)), copy.deepcopy(net)):
        assert type(loaded) is LeNet and "_layout_cache" not in loaded.__dict__
        assert_same_model(loaded, ref, x)
        loaded(x)
        assert "_layout_cache" in loaded.__dict__ and "_layout_cache" in net.__dict__


def test_fused_sequential_pickles_after_a_call():
    _, ref = twin_pair()
    fused = lenet_ext.fuse(ref)
    x = torch.rand(4, 1, 28, 28)
    fused(x)
    assert_same_model(roundtrip(fused), ref, x)


@pytest.mark.parametrize("device", DEVICES)
def test_trace_is_one_graph_for_inference_and_training(device):
    """A trace records the differentiable operator whatever the mode it was traced in, so
    jit.trace's check (which reruns under no_grad) passes and the trace can train."""
    net, ref = twin_pair(device=device)
    x = torch.rand(3, 1, 28, 28, device=device)
    with torch.no_grad():
        traced_without_grad = torch.jit.trace(net, x)
    for traced in (torch.jit.trace(net, x), traced_without_grad):
        assert "lenet_ext::lenet_train_forward" in str(traced.graph)
        assert_same_model(traced, ref, x)
        assert_same_model(torch.jit.load(io.BytesIO(_saved(traced))), ref, x)


def _saved(scripted):
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("device", DEVICES)
def test_script_compiles_one_operator_call(device):
    net, ref = twin_pair(device=device)
    x = torch.rand(3, 1, 28, 28, device=device)
    scripted = torch.jit.script(net)
    assert scripted.fused and list(scripted.state_dict()) == list(ref.state_dict())
    assert_same_model(scripted, ref, x)
    assert_same_model(torch.jit.load(io.BytesIO(_saved(scripted))), ref, x)
    with torch.no_grad():
        graph = scripted.graph_for(x) if hasattr(scripted, "graph_for") else scripted.graph
    assert "lenet_ext::lenet_forward" in str(graph)
    # A ScriptModule shares the LeNet's parameters: training one trains the other.
    with torch.no_grad():
        net[0].weight.add_(1.0)
        ref[0].weight.add_(1.0)
    assert_same_model(scripted, ref, x)


def test_script_keeps_the_mode_and_runs_replaced_layers_as_they_are():
    net, ref = twin_pair()
    net[1] = nn.ReLU()
    ref[1] = nn.ReLU()
    net.eval()
    scripted = torch.jit.script(net)
    assert not scripted.fused and not scripted.training and net[0].training is False
    assert_same_model(scripted, ref, torch.rand(2, 1, 28, 28))


def test_script_of_a_fused_sequential_runs_its_layers():
    _, ref = twin_pair()
    model = nn.Sequential(ref, nn.Softmax(dim=1))
    scripted = torch.jit.script(lenet_ext.fuse(model))
    assert_same_model(scripted, model, torch.rand(2, 1, 28, 28))
    assert list(scripted.state_dict()) == list(model.state_dict())


def test_script_keeps_the_models_own_hooks():
    net, ref = twin_pair()
    net.register_forward_hook(_double_output)
    ref.register_forward_hook(_double_output)
    assert_same_model(torch.jit.script(net), ref, torch.rand(2, 1, 28, 28))


def _double_output(module: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
    return output * 2


@pytest.mark.parametrize("make", [lambda ref: LeNet(), lenet_ext.fuse], ids=["LeNet", "fuse"])
def test_fx_symbolic_trace_records_the_plain_layers(make):
    """A node per layer, as for the reference: what FX-based tools (quantization, feature
    extraction) expect; the GraphModule computes what the reference computes."""
    net, ref = twin_pair()
    model = make(ref)
    if isinstance(model, LeNet):
        model.load_state_dict(ref.state_dict())
    traced = torch.fx.symbolic_trace(model)
    reference_graph = torch.fx.symbolic_trace(ref).graph
    assert [(n.op, n.target) for n in traced.graph.nodes] == [(n.op, n.target) for n in reference_graph.nodes]
    assert_same_model(traced, ref, torch.rand(3, 1, 28, 28))


@pytest.mark.parametrize("make", [lambda ref: LeNet(), lenet_ext.fuse], ids=["LeNet", "fuse"])
def test_input_by_keyword_as_for_nn_sequential(make):
    _, ref = twin_pair()
    model = make(ref)
    model.load_state_dict(ref.state_dict())
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(model(input=x), ref(input=x), **TOL)
