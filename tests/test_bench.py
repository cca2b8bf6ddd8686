"""benchmarks/bench.py, run end to end on tiny inputs."""

import argparse
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import requires_cuda

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(tmp_path, *extra):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench.py"), "--batch-sizes", "2",
         "--min-run-time", "0.01", "--threads", "1", "--rounds", "2", "--output-dir", str(tmp_path), "--quiet",
         *extra],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, json.loads((tmp_path / "results.json").read_text())


def test_bench_smoke(tmp_path):
    """Every mode and provider on the CPU (the CUDA run below leaves out torch.compile, whose CUDA
    compiles take minutes; scripts/verify_cuda.py's bench stage runs them)."""
    stdout, data = run_bench(tmp_path, "--devices", "cpu")
    assert "| inference | 2 | lenet_ext |" in stdout
    env = data["environment"]
    for key in ("date", "torch", "lenet_ext", "cpu", "gpu", "threads", "tf32"):
        assert key in env
    assert env["tf32"] == {"matmul": False, "cudnn": False}
    assert env["threads"] == 1 and env["rounds"] == 2
    assert data["peak_gflops"]["cpu"] > 0
    assert data["fma_peak_gflops"] == {"cpu": None}  # a CUDA measurement only
    providers = {r["provider"] for r in data["rows"]}
    assert {"torch", "torch.compile", "lenet_ext", "lenet_ext+compile"} <= providers
    # The peers join the CPU inference rows when installed, checked against the reference like the rest.
    peers = {"onnxruntime": "onnxruntime", "openvino": "openvino(latency)"}
    for package, provider in peers.items():
        installed = importlib.util.find_spec(package) is not None and importlib.util.find_spec("onnxscript") is not None
        assert (provider in providers) == installed, (provider, installed)
        if installed:
            assert {r["mode"] for r in data["rows"] if r["provider"] == provider} == {"inference"}
    modes = {r["mode"] for r in data["rows"]}
    assert {"inference", "training", "layer block1 forward", "layer block2 forward+backward"} <= modes
    for row in data["rows"]:
        for key in ("images_per_s", "median_s", "iqr_s", "speedup_vs_eager", "gflops", "peak_fraction"):
            assert row[key] >= 0
        if row["mode"] == "training":
            assert row["saved_bytes_per_sample"] > 0
    assert (tmp_path / "throughput.png").stat().st_size > 0


@requires_cuda
def test_bench_on_cuda_without_compile(tmp_path):
    stdout, data = run_bench(tmp_path, "--devices", "cuda", "--modes", "inference,training", "--no-compile")
    assert "| training | 2 | lenet_ext |" in stdout
    assert data["peak_gflops"]["cuda"] > 0 and data["fma_peak_gflops"]["cuda"] > 0
    assert {r["provider"] for r in data["rows"]} == {"torch", "lenet_ext"}
    for row in data["rows"]:
        assert row["fma_peak_fraction"] > 0
        if row["mode"] == "training":
            # The peak alone: at least the step's rise, the inputs (2 images) and the weights (61,706 floats).
            assert row["step_memory_bytes"] > 0
            assert row["peak_memory_bytes"] >= row["step_memory_bytes"] + 61_706 * 4 + 2 * 784 * 4


def _import_bench():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench
    finally:
        sys.path.pop(0)
    return bench


@pytest.mark.parametrize("threads", [1, 2])
def test_bench_times_every_step_on_the_requested_threads(threads):
    """torch.utils.benchmark.Timer alone would run every step on one thread."""
    bench = _import_bench()
    seen = {"a": set(), "b": set()}
    steps = {name: (lambda name=name: seen[name].add(torch.get_num_threads())) for name in seen}
    args = argparse.Namespace(rounds=2, min_run_time=0.02, threads=threads)
    result = bench.time_interleaved(steps, args)
    assert seen == {"a": {threads}, "b": {threads}}
    assert set(result) == {"a", "b"} and all(median > 0 and iqr >= 0 for median, iqr in result.values())


def test_bench_stops_on_a_mismatch():
    bench = _import_bench()
    with pytest.raises(SystemExit, match="does not match the eager reference"):
        bench.check("broken", torch.zeros(3), torch.ones(3), "inference output")


@requires_cuda
def test_fma_peak_kernel_computes_its_chains_and_is_timed():
    """The FMA-rate kernel builds on this GPU, its chains reach the value the recurrence gives
    (a_n = 1 + (a_0 - 1) m^n, m = 0.9999), and bench measures a rate from it."""
    bench = _import_bench()
    x = torch.rand(1000, device="cuda")
    got = torch.cuda.jiterator._create_jit_fn(bench.FMA_CODE)(x).double()
    start = x.double()[:, None] + torch.arange(bench.FMA_CHAINS, device="cuda", dtype=torch.float64)
    want = (1 + (start - 1) * 0.9999**bench.FMA_STEPS).sum(dim=1)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    args = argparse.Namespace(rounds=2, min_run_time=0.05, threads=1)
    assert bench.measure_fma_peak_gflops(torch.device("cuda"), args) > 0
    assert bench.measure_fma_peak_gflops(torch.device("cpu"), args) is None
