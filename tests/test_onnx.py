"""torch.onnx.export of LeNet and of fuse()'d models gives the standard ONNX graph.

ONNX runtimes know nothing of lenet_ext's operators, so under export the
models run their plain layers: Conv, Sigmoid, AveragePool, Gemm.
"""

import pytest
import torch
from torch import nn

import lenet_ext
from lenet_ext import LeNet

pytest.importorskip("onnxscript", reason="torch.onnx.export needs onnxscript (in the test extra)")
onnx = pytest.importorskip("onnx", reason="torch.onnx.export needs onnx (in the test extra)")


def export(model, x, path):
    batch = torch.export.Dim("batch")
    torch.onnx.export(model.eval(), (x,), str(path), dynamic_shapes=({0: batch},))
    return onnx.load(str(path))


def op_types(model_proto):
    return {(node.domain or "ai.onnx", node.op_type) for node in model_proto.graph.node}


def run_onnx(path, x):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def test_lenet_exports_the_standard_graph(tmp_path):
    net = LeNet()
    proto = export(net, torch.rand(2, 1, 28, 28), tmp_path / "lenet.onnx")
    ops = op_types(proto)
    assert {("ai.onnx", op) for op in ("Conv", "Sigmoid", "AveragePool", "Gemm")} <= ops
    assert all(domain == "ai.onnx" for domain, _ in ops), ops
    x = torch.rand(7, 1, 28, 28)  # another batch size: the batch dimension is dynamic
    with torch.no_grad():
        torch.testing.assert_close(run_onnx(tmp_path / "lenet.onnx", x), net(x), atol=1e-5, rtol=1e-4)


def test_fused_sequential_exports_the_standard_graph(tmp_path):
    model = lenet_ext.fuse(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Sigmoid(), nn.AvgPool2d(2), nn.Flatten(),
                                         nn.Linear(4 * 8 * 8, 5)))  # fmt: skip
    assert model.fused_runs() == [(0, 3)]
    proto = export(model, torch.rand(2, 3, 16, 16), tmp_path / "fused.onnx")
    assert all(domain == "ai.onnx" for domain, _ in op_types(proto))
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(run_onnx(tmp_path / "fused.onnx", x), model(x), atol=1e-5, rtol=1e-4)


def test_outside_export_the_fused_operator_runs():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    with torch.inference_mode(), Recorder() as recorder:
        LeNet()(torch.rand(2, 1, 28, 28))
    assert "lenet_ext.lenet_forward" in recorder.ops
