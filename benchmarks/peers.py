"""The runtimes users pick instead for CPU inference, as bench.py providers.

ONNX Runtime and OpenVINO each run the reference nn.Sequential exported to
ONNX (with a dynamic batch), on the same number of threads as every other
provider. Each is used when its package is installed (pip install
".[peers]") and left out with a message when not; bench.py checks each one's
output against the eager reference before timing it.
"""

import os
import tempfile

import torch


class OnnxRuntime:
    def __init__(self, path, threads):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x):
        return torch.from_numpy(self.session.run(None, {self.input: x.numpy()})[0])


class OpenVino:
    def __init__(self, path, threads, hint):
        import openvino as ov

        core = ov.Core()
        # float32 arithmetic, as every other provider: on CPUs with bfloat16
        # instructions OpenVINO would otherwise compute in bfloat16.
        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": hint, "INFERENCE_PRECISION_HINT": "f32"}
        self.request = core.compile_model(core.read_model(path), "CPU", config).create_infer_request()

    def __call__(self, x):
        return torch.from_numpy(self.request.infer([x.numpy()])[0].copy())


def _missing(*names):
    """The names among these whose package is not installed."""
    import importlib.util

    return [name for name in names if importlib.util.find_spec(name) is None]


def peer_providers(reference, threads):
    """(name -> callable on a CPU float32 batch, lines saying which peers are left out and why)."""
    missing = _missing("onnx", "onnxscript")
    if missing:
        return {}, [f"ONNX Runtime and OpenVINO left out: torch.onnx.export needs {', '.join(missing)} (pip install '.[peers]')"]
    path = os.path.join(tempfile.mkdtemp(prefix="lenet_ext_bench_"), "lenet.onnx")
    batch = torch.export.Dim("batch")
    torch.onnx.export(reference.eval(), (torch.rand(2, 1, 28, 28),), path, dynamic_shapes=({0: batch},), verbose=False)
    providers, notes = {}, []
    if _missing("onnxruntime"):
        notes.append("ONNX Runtime left out: onnxruntime is not installed (pip install '.[peers]')")
    else:
        providers["onnxruntime"] = OnnxRuntime(path, threads)
    if _missing("openvino"):
        notes.append("OpenVINO left out: openvino is not installed (pip install '.[peers]')")
    else:
        # Its two performance hints, since either may win depending on the batch.
        providers["openvino(latency)"] = OpenVino(path, threads, "LATENCY")
        providers["openvino(throughput)"] = OpenVino(path, threads, "THROUGHPUT")
    return providers, notes
