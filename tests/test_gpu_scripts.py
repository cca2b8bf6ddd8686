"""The scripts of a GPU run (scripts/verify_cuda.py and the workloads it runs), checked on the CPU
so that a GPU run does not meet their bugs first."""

import json
import os
import shutil
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import count_launches  # noqa: E402
import kernel_workload  # noqa: E402
import phase_profile  # noqa: E402
import tile_sweep  # noqa: E402
import verify_cuda  # noqa: E402

import lenet_ext  # noqa: E402

NCU_HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
              '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"')  # fmt: skip


def ncu_row(launch, program, metric, unit, value):
    kernel = f"void lenet_ext::tile_program_kernel<lenet_ext::{program}>(T1::Params)"
    fields = [launch, "1", "python3", "host", kernel, "1", "7", "(256, 1, 1)", "(88, 1, 1)", "0", "9.0", "section",
              metric, unit, value]  # fmt: skip
    return ",".join(f'"{f}"' for f in fields)


# Nsight Compute 2025 adds rule columns, which the metric rows leave empty
# (a trailing comma) and the rule rows fill.
NCU_RULE_COLUMNS = ',"Rule Name","Rule Type","Rule Description","Estimated Speedup Type","Estimated Speedup"'


@pytest.mark.parametrize("with_rules", [False, True], ids=["plain", "rule_columns"])
def test_ncu_summary_keeps_each_launch_and_its_metrics(tmp_path, with_rules):
    end = "," if with_rules else ""
    rule_row = ncu_row("0", "LeNetTileProgram", "", "", "")[:-2] + '"SOLBottleneck","OPT","low throughput","",""'
    log = tmp_path / "ncu.log"
    log.write_text("\n".join([
        "==PROF== Connected to process 1", "kernel workload done", NCU_HEADER + (NCU_RULE_COLUMNS if with_rules else ""),
        ncu_row("0", "LeNetTileProgram", "Duration", "usecond", "1,234.5") + end,
        ncu_row("0", "LeNetTileProgram", "Compute (SM) Throughput", "%", "55.1") + end,
        *([rule_row] if with_rules else []),
        ncu_row("0", "LeNetTileProgram", "L2 Hit Rate", "%", "90") + end,
        ncu_row("1", "PartialSumsProgram", "Achieved Occupancy", "%", "12.2") + end,
    ]))  # fmt: skip
    lines = verify_cuda.summarize_ncu(str(log))
    assert len(lines) == 4
    assert lines[2].startswith("| 0 | LeNetTileProgram | 1,234.5 usecond | 55.1 |")
    assert lines[3].startswith("| 1 | PartialSumsProgram |") and "| 12.2 |" in lines[3]


def test_ncu_summary_of_a_refused_run_is_empty(tmp_path):
    log = tmp_path / "ncu.log"
    log.write_text("==ERROR== ERR_NVGPUCTRPERM - The user does not have permission to access NVIDIA GPU Performance Counters\n")
    assert verify_cuda.summarize_ncu(str(log)) == []


def test_ncu_sections_are_those_the_profiler_lists():
    listing = "---------- Identifier ----------\n  LaunchStats   Launch Statistics\n  Occupancy   Occupancy\n" \
              "  SpeedOfLight   GPU Speed Of Light Throughput\n  WarpStateStats   Warp State Statistics\n"
    assert verify_cuda.listed_ncu_sections(listing) == ["SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats"]
    assert verify_cuda.listed_ncu_sections("") == []


def test_ncu_stalls_name_each_launchs_largest_reasons(tmp_path):
    stalled = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
    reasons = ("barrier", "long_scoreboard", "math_pipe_throttle", "short_scoreboard")
    header = ["ID", "Kernel Name", "gpu__time_duration.sum", *(stalled.format(r) for r in reasons)]
    units = ["", "", "usecond", *("ratio" for _ in reasons)]
    kernel = "void lenet_ext::tile_program_kernel<lenet_ext::{}>(T1::Params)"
    rows = [header, units, ["0", kernel.format("LeNetTileProgram"), "2,500", "1.25", "0.5", "3", "0.75"],
            ["1", kernel.format("PartialSumsProgram"), "3", "0.1", "4.5", "0", "n/a"]]
    raw = tmp_path / "ncu-raw.csv"
    raw.write_text("$ ncu --import ncu.ncu-rep --csv --page raw\n" + "\n".join(
        ",".join(f'"{field}"' for field in row) for row in rows))  # fmt: skip
    lines = verify_cuda.summarize_ncu_stalls(str(raw), top=2)
    assert lines[2] == "| 0 | LeNetTileProgram | math_pipe_throttle 3.00, barrier 1.25 |"
    assert lines[3] == "| 1 | PartialSumsProgram | long_scoreboard 4.50, barrier 0.10 |"
    assert len(lines) == 4


def test_ncu_stalls_of_a_profile_without_them_are_empty(tmp_path):
    raw = tmp_path / "ncu-raw.csv"
    raw.write_text('"ID","Kernel Name","gpu__time_duration.sum"\n"","","usecond"\n"0","k","5"\n')
    assert verify_cuda.summarize_ncu_stalls(str(raw)) == []


def test_kernel_workload_runs_on_the_cpu(capsys):
    kernel_workload.main(["--device", "cpu"])
    assert "kernel workload done" in capsys.readouterr().out


def test_tile_sweep_times_every_workload_at_every_tile(tmp_path, capsys):
    output = tmp_path / "tiles.json"
    before = lenet_ext._C.cuda_tile()
    tile_sweep.main(["--device", "cpu", "--tiles", "auto,2", "--output", str(output)])
    assert lenet_ext._C.cuda_tile() == before
    times = json.loads(output.read_text())["us_per_step"]
    assert set(times) == {"inference 3", "inference 16", "training 3", "training 16", "conv operator 16"}
    assert all(set(by_tile) == {"auto", "2"} and all(by_tile.values()) for by_tile in times.values())
    assert "| training 16 | whole step |" in capsys.readouterr().out


def test_phase_profile_summarises_a_launch_phase_by_phase():
    # Two blocks, three phases: block 0 takes 10, 30, 60 cycles, block 1 30, 30, 0.
    stamps = torch.tensor([[100, 110, 140, 200], [5, 35, 65, 65]], dtype=torch.int64)
    summary = phase_profile.launch_summary("P", ("a", "b", "c"), 2, stamps.numpy().tobytes())
    assert summary["blocks"] == 2 and summary["max_block_cycles"] == 100
    assert summary["median_block_cycles"] == 60  # torch.median of two values: the lower
    assert summary["phases"] == pytest.approx({"a": 25.0, "b": 37.5, "c": 37.5})


@pytest.mark.skipif(not lenet_ext._C.with_cuda, reason="the phase clocks are a CUDA build's")
def test_phase_profile_runs_every_workload_on_the_cpu(tmp_path, capsys):
    """On the CPU no tile program runs: the script's workloads and tables, with no launch stamped."""
    output = tmp_path / "phases.json"
    before = lenet_ext._C.cuda_tile()
    phase_profile.main(["--device", "cpu", "--tiles", "auto,2", "--output", str(output)])
    assert lenet_ext._C.cuda_tile() == before
    launches = json.loads(output.read_text())["launches"]
    assert set(launches) == {"inference 3", "inference 16", "training 3", "training 16", "conv operator 16"}
    assert all(by_tile == {"auto": [], "2": []} for by_tile in launches.values())
    assert "0 tile-program launches stamped on cpu" in capsys.readouterr().out


def test_count_launches_counts_and_times_each_step(tmp_path, capsys):
    output = tmp_path / "launches.json"
    count_launches.main(["--device", "cpu", "--batch-sizes", "2,3", "--output", str(output)])
    per_step = json.loads(output.read_text())["per_step"]
    assert set(per_step) == {"2", "3"}
    inference = per_step["2"]["inference"]["lenet_ext"]
    assert list(inference) == ["lenet_ext::lenet_forward"] and inference["lenet_ext::lenet_forward"]["count"] == 1
    assert all(entry["us"] > 0 for entry in per_step["3"]["training"]["torch"].values())
    written = json.loads(output.read_text())
    assert written["step_us"]["3"]["training"]["lenet_ext"] > 0
    assert "lenet_ext::lenet_forward" in written["host_us"]["2 inference lenet_ext"]
    parts = written["training_parts_us"]
    assert set(parts) == {f"{b} {n}" for b in (2, 3) for n in ("torch", "lenet_ext", "floor")}
    assert all(list(us) == ["forward", "loss", "grad", "update", "GPU wait"] for us in parts.values())
    assert all(us["forward"] > 0 and us["grad"] > 0 for us in parts.values())
    out = capsys.readouterr().out
    assert "| 3 | training | lenet_ext |" in out and "Host time per step" in out
    assert "| 3 | floor |" in out


@pytest.mark.parametrize("name", ["compute-sanitizer", "ncu", "surely-not-a-cuda-tool"])
def test_find_cuda_tool_returns_an_existing_path_or_none(name):
    found = verify_cuda.find_cuda_tool(name)
    assert found is None or os.path.exists(found)


def test_verify_cuda_budget_defaults_by_machine_and_its_long_stages_keep_their_share():
    assert verify_cuda.budgets(None, has_gpu=True) == (450, 240)
    assert verify_cuda.budgets(None, has_gpu=False) == (1800, 960)
    assert verify_cuda.budgets(540, has_gpu=True) == (540, 288)


def test_verify_cuda_names_the_stages_when_only_names_an_unknown_one(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        verify_cuda.main([str(tmp_path), "--only", "bench,benchmark"])
    assert exit_info.value.code == 2
    assert "benchmark" in capsys.readouterr().err and not os.listdir(tmp_path)


@pytest.mark.parametrize("log, errors", [
    ("========= COMPUTE-SANITIZER\nworkload passed\n========= ERROR SUMMARY: 0 errors\n", 0),
    ("========= Invalid __global__ read of size 4 bytes\n========= ERROR SUMMARY: 3 errors\n", 3),
    ("workload passed\n========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n", 0),
    ("========= RACECHECK SUMMARY: 5 hazards displayed (2 errors, 3 warnings)\n", 2),
    ("Traceback (most recent call last):\nRuntimeError: CUDA error\n", None),
])  # fmt: skip
def test_sanitizer_errors_read_from_each_tools_summary(log, errors):
    assert verify_cuda.sanitizer_errors(log) == errors


def test_cxx_compiler_names_the_compiler_and_its_version(monkeypatch):
    monkeypatch.setenv("CXX", "g++")
    assert "g++" in verify_cuda.cxx_compiler() and ":" in verify_cuda.cxx_compiler()
    monkeypatch.setenv("CXX", "surely-not-a-compiler")
    assert verify_cuda.cxx_compiler() == "surely-not-a-compiler (not found)"


def test_count_launches_names_a_tile_program_by_its_program():
    kernel = "void lenet_ext::tile_program_kernel<lenet_ext::LeNetBackwardTileProgram>(lenet_ext::LeNetBackwardTileProgram::Params)"
    assert count_launches.short_name(kernel) == "tile program LeNetBackwardTileProgram"
    assert count_launches.short_name("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>") == (
        "void at::native::vectorized_elementwise_kernel<4, ")


def test_crashed_tests_are_read_from_xdists_report(tmp_path):
    log = tmp_path / "tests.log"
    log.write_text("..F.\n[gw2] linux -- Python 3.12.3\n"
                   "worker 'gw2' crashed while running 'tests/test_bad_input.py::test_one[x_not_4d-operator-cpu]'\n"
                   "worker 'gw11' crashed while running 'tests/test_lenet_ops.py::test_tiles[1-65-no_grad]'\n"
                   "FAILED tests/test_bad_input.py::test_one[x_not_4d-operator-cpu]\n")  # fmt: skip
    assert verify_cuda.crashed_tests(str(log)) == [
        "tests/test_bad_input.py::test_one[x_not_4d-operator-cpu]", "tests/test_lenet_ops.py::test_tiles[1-65-no_grad]"]


@pytest.mark.skipif(shutil.which("gdb") is None and verify_cuda.find_cuda_tool("cuda-gdb") is None,
                    reason="no gdb or cuda-gdb")  # fmt: skip
def test_debugger_backtrace_of_a_crashing_process(tmp_path):
    log = tmp_path / "crash.log"
    crash = [sys.executable, "-c", "import ctypes; ctypes.string_at(0)"]
    assert verify_cuda.debugger_backtrace(crash, str(log), 120)
    text = log.read_text()
    assert "SIGSEGV" in text and "#0" in text
    # The faulting instruction, the stack pointer and the faulting address (null here).
    assert "=> 0x" in text and "rsp" in text and "$1 = (void *) 0x0" in text


def test_linkage_names_the_libraries_and_the_unversioned_std_imports(tmp_path):
    path = tmp_path / "linkage.txt"
    verify_cuda.write_linkage(str(path))
    text = path.read_text()
    if "no lenet_ext/_C" in text:
        pytest.skip("the extension is not built in place")
    assert "$ ldd " in text and "$ objdump -T -C " in text
    assert "std:: symbols bound at import to a library other than libstdc++" in text
    if shutil.which("ldd"):
        assert "libc10.so" in text


def test_a_crash_of_the_bad_input_tests_is_reported_with_a_backtrace(tmp_path, monkeypatch):
    """A stand-in for the bad-input tests that crashes: the stage reports the signal and the
    compiler, and says the crash is there."""
    monkeypatch.setattr(verify_cuda, "BAD_INPUT_TESTS", (sys.executable, "-c", "import ctypes; ctypes.string_at(0)"))
    stage = verify_cuda.Stage("bad-input")
    assert verify_cuda.bad_input_stage(stage, str(tmp_path), lambda: 250) is True
    assert stage.status == "FAILED"
    assert "crashed (signal 11) built with " in stage.detail
    if shutil.which("gdb") or verify_cuda.find_cuda_tool("cuda-gdb"):
        assert "SIGSEGV" in (tmp_path / "crash-backtrace.log").read_text()


def test_bad_input_tests_that_pass_end_the_stage(tmp_path, monkeypatch):
    monkeypatch.setattr(verify_cuda, "BAD_INPUT_TESTS", (sys.executable, "-c", "pass"))
    stage = verify_cuda.Stage("bad-input")
    assert verify_cuda.bad_input_stage(stage, str(tmp_path), lambda: 600) is False
    assert stage.status == "passed" and not (tmp_path / "crash-backtrace.log").exists()
