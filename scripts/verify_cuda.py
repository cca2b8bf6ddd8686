"""Verifies lenet_ext's CUDA path on the GPU at hand, in one command.

    python scripts/verify_cuda.py OUT_DIR

Builds the extension in place for the visible GPU's architecture, runs
tests/test_bad_input.py alone (seconds; after a crash there, once more
under a debugger), then the whole test suite, runs compute-sanitizer (memcheck, racecheck, synccheck,
initcheck) over scripts/cuda_sanitizer_workload.py, counts and times the
kernels of an inference call and a training step (scripts/count_launches.py),
stamps each tile program's phases (scripts/phase_profile.py, into
phases.log: where each one's time goes, ncu or not), and runs
benchmarks/bench.py on CUDA; with the time left, each tile program at each
tile size (scripts/tile_sweep.py, into tiles.log), Nsight Compute (ncu) over
scripts/kernel_workload.py at the GPU's own clocks, each tile program's
duration, throughput, occupancy, issue rate and what its warps wait on into
ncu-summary.md (every metric in ncu-raw.csv), and the benchmark once more on the
reference kernels (LENET_EXT_CUDA_KERNEL=reference), to show what the tile
programs gain. Every stage writes its log into OUT_DIR, the
benchmark its results.json and throughput.png; a summary table comes last,
and the exit status is 0 only when every stage passed.

Nothing is installed: the build uses the torch, setuptools and ninja already
there (pip's build isolation would need the network). Sized for a one-GPU
H100/H200 machine with 16 cores, about 8 minutes in all; --budget sets the
seconds the stages may take together, and the benchmark gets what the
others leave. extension-linkage.txt records what the built extension binds
to (ldd, and the C++ library symbols it imports without a version). When
the tests fail, the sanitizers still run (they locate a bad access) and the
timing stages are skipped, unless --keep-going; a test that crashed its
process runs once more under gdb or cuda-gdb, for the C++ backtrace
(crash-backtrace.log).
--only runs the named stages after the build (an in-place build that is up
to date takes seconds), for example a second run of the benchmark alone.
Without a GPU (--no-gpu-ok) the script runs what it can on the CPU, for
checking the script itself, in a budget sized for a few cores.
"""

import argparse
import csv
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
STAGES = ("build", "bad-input", "tests", *SANITIZER_TOOLS, "launches", "phases", "bench-no-compile", "bench", "tiles",
          "ncu", "bench-reference")  # fmt: skip
TIMING_STAGES = ("launches", "phases", "bench-no-compile", "bench", "tiles", "ncu", "bench-reference")
PYTEST = (sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider")  # the suite's, and a crashed test's rerun
# Seconds for all stages: sized for a one-GPU machine with 16 cores, and without a GPU (--no-gpu-ok,
# a check of the script) for a machine of a few cores, which builds and tests several times slower.
GPU_BUDGET = 450
NO_GPU_BUDGET = 1800


class Stage:
    def __init__(self, name):
        self.name, self.status, self.detail, self.seconds = name, "not run", "", 0.0


def run(cmd, log_path, timeout, env=None):
    """Runs cmd in the repository with its output in log_path; returns (exit
    code, or None on timeout, and seconds). The source tree comes first on
    the import path: the build is in place, nothing is installed."""
    start = time.monotonic()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        try:
            code = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=max(1, timeout),
                                  env={**os.environ, "PYTHONPATH": ROOT, **(env or {})}).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            code = None
            log.write(f"\n[verify_cuda] stopped after {timeout:.0f} s\n")
    return code, time.monotonic() - start


def outcome(code):
    """A stage's status from its command's exit code (None: stopped at its time limit)."""
    return "passed" if code == 0 else ("TIMED OUT" if code is None else "FAILED")


def tail(path, lines=15):
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def pytest_command(junit, workers=4, restarts=8):
    """The suite's command and environment. With pytest-xdist, in `workers`
    processes of a quarter of the cores each: a test that crashes its process
    is reported as failed and a fresh process runs the rest (up to `restarts`
    times), where one process would end the suite at the crash."""
    command = [*PYTEST, f"--junitxml={junit}"]
    if importlib.util.find_spec("xdist") is None:
        return command, {}
    threads = max(1, (os.cpu_count() or workers) // workers)
    return command + ["-n", str(workers), "--max-worker-restart", str(restarts)], {"OMP_NUM_THREADS": str(threads)}


def gpu_facts():
    """(name, 'major.minor', torch facts) of GPU 0, or None without one."""
    code = "import json, torch, importlib.metadata as m; print(json.dumps(dict(torch=torch.__version__, " \
           "cuda=torch.version.cuda, setuptools=m.version('setuptools'), " \
           "gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, " \
           "capability=list(torch.cuda.get_device_capability(0)) if torch.cuda.is_available() else None)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def crashed_tests(log_path):
    """The tests whose process crashed, as pytest-xdist names them in the suite's log."""
    with open(log_path, errors="replace") as f:
        return re.findall(r"worker '\w+' crashed while running '([^']+)'", f.read())


# After a crash: the symbols of every library loaded (cuda-gdb had read none of them, and named no
# frame of the extension), the backtrace, then the faulting instruction, where it is (symbol,
# source line), the stack pointer (a misaligned one faults on aligned vector moves) and the
# faulting address.
CRASH_FACTS = ("sharedlibrary", "bt 40", "x/6i $pc", "info symbol $pc", "info line *$pc", "info registers rip rsp rbp",
               "p $_siginfo._sifields._sigfault.si_addr")  # fmt: skip


def debugger_backtrace(command, log_path, timeout):
    """Runs command under gdb (else the CUDA toolkit's cuda-gdb), which prints the C++ backtrace
    of a crash and CRASH_FACTS into log_path; False when neither debugger is there."""
    debugger = shutil.which("gdb") or find_cuda_tool("cuda-gdb")
    if debugger is None:
        return False
    facts = [arg for fact in CRASH_FACTS for arg in ("-ex", fact)]
    run([debugger, "-q", "-batch", "-ex", "set pagination off", "-ex", "run", *facts, "--args", *command], log_path,
        timeout)  # fmt: skip
    return True


def built_extension():
    """The in-place build's lenet_ext/_C*.so, or None."""
    return next(iter(sorted(glob.glob(os.path.join(ROOT, "lenet_ext", "_C*.so")))), None)


def std_bindings(extension):
    """Where the loader binds the extension's C++ library (std::) symbols when it is imported, from
    LD_DEBUG=bindings: "symbol -> library" for each bound elsewhere than libstdc++ or the extension
    itself (torch's libraries export copies of some)."""
    prefix = os.path.join(ROOT, "build", "ld-debug")
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    subprocess.run([sys.executable, "-c", "import lenet_ext"], cwd=ROOT, capture_output=True,
                   env={**os.environ, "PYTHONPATH": ROOT, "LD_DEBUG": "bindings", "LD_DEBUG_OUTPUT": prefix})  # fmt: skip
    found = []
    for path in glob.glob(prefix + ".*"):
        with open(path, errors="replace") as f:
            for line in f:
                m = re.search(r"binding file (\S+) \[\d+\] to (\S+) \[\d+\]: \w+ symbol `(_Z(?:T[VIS])?N?K?S[tiao]\w*)'", line)
                if m and m.group(1) == extension and m.group(2) != extension and "libstdc++" not in m.group(2):
                    found.append((m.group(3), m.group(2)))
        os.remove(path)
    demangle = shutil.which("c++filt")
    names = [name for name, _ in found]
    if demangle and names:
        names = subprocess.run([demangle], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return [f"{name} -> {library}" for name, (_, library) in zip(names, found)]


def write_linkage(path):
    """What the built extension binds to, for a crash on one machine only: the libraries it loads
    (ldd), the C++ library symbols it imports without a version (objdump -T), which the loader
    binds to whichever loaded library defines them first, and where it bound those of them that
    did not go to libstdc++."""
    extension = built_extension()
    with open(path, "w") as f:
        if extension is None:
            f.write("no lenet_ext/_C*.so\n")
            return
        for tool, args, keep in (("ldd", [], lambda line: True),
                                 ("objdump", ["-T", "-C"], lambda line: "*UND*" in line
                                  and line.partition(" Base ")[2].strip().startswith("std::"))):  # fmt: skip
            found = shutil.which(tool)
            result = subprocess.run([found, *args, extension], capture_output=True, text=True) if found else None
            lines = [line for line in result.stdout.splitlines() if keep(line)] if result else [f"{tool} not found"]
            f.write("$ " + " ".join([tool, *args, extension]) + "\n" + "\n".join(lines) + "\n\n")
        f.write("std:: symbols bound at import to a library other than libstdc++ (LD_DEBUG=bindings):\n")
        f.write("\n".join(std_bindings(extension) or ["none"]) + "\n")


def cxx_compiler():
    """The C++ compiler torch.utils.cpp_extension builds with ($CXX, else c++): its path and
    version line. Where the extension misbehaves on one machine only, this is the first suspect."""
    name = os.environ.get("CXX", "c++")
    path = shutil.which(name)
    if path is None:
        return f"{name} (not found)"
    version = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.splitlines()
    return f"{os.path.realpath(path)}: {version[0] if version else '?'}"


def find_cuda_tool(name):
    """A CUDA toolkit program (compute-sanitizer, ncu) on PATH or in the toolkit, or None."""
    found = shutil.which(name)
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        candidate = os.path.join(home, "bin", name) if home else None
        if not found and candidate and os.path.exists(candidate):
            found = candidate
    return found


def sanitizer_errors(log_tail):
    """The error count of compute-sanitizer's last summary line, or None without one. racecheck
    ends with "RACECHECK SUMMARY: N hazards displayed (E errors, W warnings)", the other tools
    with "ERROR SUMMARY: E errors"."""
    summary = re.findall(r"ERROR SUMMARY: (\d+) error|RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) error", log_tail)
    return int(next(n for n in summary[-1] if n)) if summary else None


# The ncu sections the ncu stage collects, those this ncu lists: throughput,
# occupancy and launch sizes; how often a scheduler issues and why its warps
# wait; shared-memory wavefronts and bank conflicts.
NCU_SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats", "SchedulerStats",
                "MemoryWorkloadAnalysis_Tables")  # fmt: skip

# The ncu metrics ncu-summary.md keeps, by the names ncu's CSV gives them.
NCU_METRICS = {
    "Duration": "duration",
    "Compute (SM) Throughput": "SM %",
    "Memory Throughput": "memory %",
    "Achieved Occupancy": "occupancy %",
    "Issued Warp Per Scheduler": "issued per cycle",
    "Warp Cycles Per Issued Instruction": "cycles per issue",
    "Registers Per Thread": "registers",
    "Dynamic Shared Memory Per Block": "shared memory",
    "Grid Size": "blocks",
}


def program_label(kernel_name):
    """A kernel's name in ncu's tables: its tile program's, or the name's first 60 characters."""
    program = re.search(r"(\w+Program)", kernel_name)
    return program.group(1) if program else kernel_name[:60]


def summarize_ncu(log_path):
    """ncu's --csv --page details rows, one table row per kernel launch, as markdown lines."""
    with open(log_path, errors="replace") as f:
        rows = list(csv.reader(line for line in f if line.startswith('"')))
    if not rows or "Metric Name" not in rows[0]:
        return []
    header, kernels = rows[0], {}
    column = {name: header.index(name) for name in ("ID", "Kernel Name", "Metric Name", "Metric Unit", "Metric Value")}
    for row in rows[1:]:
        # Newer ncu adds rule columns, which metric rows leave out.
        if len(row) <= max(column.values()) or row[column["Metric Name"]] not in NCU_METRICS:
            continue
        kernel = kernels.setdefault(row[column["ID"]], {"name": row[column["Kernel Name"]]})
        unit = row[column["Metric Unit"]]
        value = row[column["Metric Value"]] + (f" {unit}" if unit and unit != "%" else "")
        kernel[NCU_METRICS[row[column["Metric Name"]]]] = value
    names = list(NCU_METRICS.values())
    lines = ["| launch | kernel | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for launch, kernel in kernels.items():
        values = " | ".join(kernel.get(n, "") for n in names)
        lines.append(f"| {launch} | {program_label(kernel['name'])} | {values} |")
    return lines


def listed_ncu_sections(listing):
    """The NCU_SECTIONS that `ncu --list-sections` printed (its identifiers, one per line)."""
    words = set(re.findall(r"[\w.]+", listing))
    return [section for section in NCU_SECTIONS if section in words]


def summarize_ncu_stalls(raw_path, top=5):
    """From ncu's --page raw CSV (a row of metric names, a row of units, a row per launch): each
    launch's `top` stall reasons, in warps stalled per issued instruction, as markdown lines:
    what a warp of the kernel waits on between two of its instructions."""
    with open(raw_path, errors="replace") as f:
        rows = list(csv.reader(line for line in f if line.startswith('"')))
    if len(rows) < 2 or not {"ID", "Kernel Name"} <= set(rows[0]):
        return []
    header = rows[0]
    stall = re.compile(r"smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio$")
    reasons = {i: m[1] for i, name in enumerate(header) if (m := stall.match(name))}
    if not reasons:
        return []
    lines = ["| launch | kernel | the most stalled warps per issued instruction |", "|---|---|---|"]
    launch, kernel = header.index("ID"), header.index("Kernel Name")
    for row in rows[1:]:
        if len(row) <= kernel or not row[launch].isdigit():  # the units row
            continue
        values = []
        for i, reason in reasons.items():
            try:
                values.append((float(row[i].replace(",", "")), reason))
            except (IndexError, ValueError):
                continue
        most = ", ".join(f"{reason} {value:.2f}" for value, reason in sorted(values, reverse=True)[:top])
        lines.append(f"| {row[launch]} | {program_label(row[kernel])} | {most} |")
    return lines


BAD_INPUT_TESTS = (*PYTEST, "-x", "tests/test_bad_input.py")


def bad_input_stage(stage, out, left):
    """Runs tests/test_bad_input.py; if it crashes, runs it again under a debugger
    (crash-backtrace.log). Returns whether it crashed."""
    log = os.path.join(out, "bad-input.log")
    code, stage.seconds = run(list(BAD_INPUT_TESTS), log, min(120, left()))
    stage.status = outcome(code)
    stage.detail = "tests/test_bad_input.py" if code == 0 else f"exit {code}; see bad-input.log"
    crashed = code is not None and code < 0
    if crashed:
        stage.detail = f"crashed (signal {-code}) built with {cxx_compiler()}"
        if debugger_backtrace(list(BAD_INPUT_TESTS), os.path.join(out, "crash-backtrace.log"), min(90, left())):
            stage.detail += "; backtrace in crash-backtrace.log"
    return crashed


def budgets(requested, has_gpu):
    """Seconds for all stages (`requested`, or the machine's default), and the limit of the
    longest two, the build and the test suite: 240 of the GPU machine's 450, a share that a
    larger budget keeps."""
    budget = requested or (GPU_BUDGET if has_gpu else NO_GPU_BUDGET)
    return budget, 240 * budget / GPU_BUDGET


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--budget", type=float, help=f"seconds for all stages together (default {GPU_BUDGET} with a "
                        f"GPU, {NO_GPU_BUDGET} without); the build's and the suite's own limits grow with it")  # fmt: skip
    parser.add_argument("--no-gpu-ok", action="store_true", help="without a GPU, run what the CPU can")
    parser.add_argument("--only", help="comma-separated stages to run after the build, from: " + ", ".join(STAGES[1:]))
    parser.add_argument("--keep-going", action="store_true", help="time the kernels even when the tests failed")
    args = parser.parse_args(argv)
    only = set(args.only.split(",")) if args.only else set(STAGES)
    if not only <= set(STAGES):
        parser.error(f"--only: unknown stages {sorted(only - set(STAGES))}; the stages are {', '.join(STAGES[1:])}")
    out = os.path.abspath(args.out_dir)
    os.makedirs(out, exist_ok=True)
    start = time.monotonic()
    stages = {name: Stage(name) for name in STAGES}
    for name in set(STAGES) - only - {"build"}:
        stages[name].status, stages[name].detail = "skipped", "not in --only"
    wanted = lambda name: stages[name].status == "not run"  # noqa: E731

    facts = {**gpu_facts(), "cxx": cxx_compiler()}
    with open(os.path.join(out, "environment.json"), "w") as f:
        json.dump(facts, f, indent=1)
    has_gpu = facts["gpu"] is not None
    print(f"torch {facts['torch']} (CUDA {facts['cuda']}), setuptools {facts['setuptools']}, GPU: {facts['gpu'] or 'none'}",
          f"\nC++ compiler: {facts['cxx']}", flush=True)  # fmt: skip
    if not has_gpu and not args.no_gpu_ok:
        sys.exit("verify_cuda: no CUDA device is visible (torch.cuda.is_available() is False); "
                 "--no-gpu-ok runs the CPU part only")  # fmt: skip
    budget, long_stage = budgets(args.budget, has_gpu)
    deadline = start + budget
    left = lambda: deadline - time.monotonic()  # noqa: E731

    # Build: machine code for this GPU only, all cores.
    build_env = {"FORCE_CUDA": "1" if facts["cuda"] else "0", "MAX_JOBS": str(os.cpu_count() or 4)}
    if has_gpu:
        build_env["TORCH_CUDA_ARCH_LIST"] = "{}.{}".format(*facts["capability"])
    stage = stages["build"]
    code, stage.seconds = run([sys.executable, "setup.py", "build_ext", "--inplace"], os.path.join(out, "build.log"),
                              min(long_stage, left()), env=build_env)  # fmt: skip
    stage.status = "passed" if code == 0 else "FAILED"
    stage.detail = "arch " + build_env["TORCH_CUDA_ARCH_LIST"] if has_gpu else "setup.py's default archs (no GPU)"
    with open(os.path.join(out, "build.log"), errors="replace") as f:  # setup.py's shared_libstdcxx_link_args
        linked = re.search(r"has only a static libstdc\+\+\.a; linking torch's shared (\S+) instead", f.read())
    if linked:
        stage.detail += f"; the compiler has only a static libstdc++: linked {linked[1]}"
    if code != 0:
        return finish(stages, out, tail(os.path.join(out, "build.log")))
    write_linkage(os.path.join(out, "extension-linkage.txt"))

    # The bad-input tests alone first (seconds): a C++ runtime of the extension's own beside
    # torch's crashes every error message that formats a number (setup.py links torch's).
    stage = stages["bad-input"]
    bad_input_crashed = False
    if wanted("bad-input"):
        bad_input_crashed = bad_input_stage(stage, out, left)
    tests_ignored = ["--ignore=tests/test_bad_input.py"] if bad_input_crashed else []

    # The whole suite, CUDA variants included.
    stage = stages["tests"]
    junit = os.path.join(out, "tests.xml")
    if wanted("tests"):
        command, env = pytest_command(junit, restarts=64 if bad_input_crashed else 8)
        command += tests_ignored
        code, stage.seconds = run(command, os.path.join(out, "tests.log"), min(long_stage, left() - 120), env=env)
        stage.status = outcome(code)
    if stage.status != "skipped" and os.path.exists(junit):
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        stage.detail = "{} run, {} failed, {} errors, {} skipped".format(*counts.values())
    crashed = crashed_tests(os.path.join(out, "tests.log")) if stage.status == "FAILED" else []
    if crashed:
        stage.detail += f"; {len(crashed)} crashed their process"
        backtrace = os.path.join(out, "crash-backtrace.log")
        if not os.path.exists(backtrace) and left() > 240 and debugger_backtrace([*PYTEST, crashed[0]], backtrace, 120):
            stage.detail += " (crash-backtrace.log: the first, under a debugger)"

    # compute-sanitizer over a small workload that reaches every CUDA kernel.
    sanitizer = find_cuda_tool("compute-sanitizer")
    workload = [sys.executable, os.path.join("scripts", "cuda_sanitizer_workload.py")]
    # Without a GPU, the workload on the CPU, so that a GPU run does not meet its bugs first.
    if not has_gpu and any(map(wanted, SANITIZER_TOOLS)):
        code, _ = run(workload + ["--device", "cpu"], os.path.join(out, "workload-cpu.log"), min(120, left()))
        for tool in SANITIZER_TOOLS:
            stages[tool].status = "unavailable"
            stages[tool].detail = "no GPU; the workload on the CPU " + ("passed" if code == 0 else "FAILED")
    for tool in filter(wanted, SANITIZER_TOOLS if has_gpu else ()):
        stage = stages[tool]
        if sanitizer is None:
            stage.status, stage.detail = "unavailable", "compute-sanitizer not found"
            continue
        log = os.path.join(out, f"sanitizer-{tool}.log")
        cmd = [sanitizer, "--tool", tool, "--error-exitcode", "99", "--print-limit", "50"]
        if tool == "racecheck":
            cmd += ["--racecheck-report", "all"]
        # Without the caching allocator every tensor is its own allocation, so memcheck sees
        # an access past a tensor's end and initcheck a read of memory no one wrote.
        no_cache = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
        code, stage.seconds = run(cmd + workload, log, min(90, left() - 60), env=no_cache)
        errors = sanitizer_errors(tail(log, 40))
        stage.status = "passed" if code == 0 and errors == 0 else ("TIMED OUT" if code is None else "FAILED")
        stage.detail = f"{errors} errors" if errors is not None else tail(log, 3).strip().replace("\n", " | ")[:120]

    # Timing wrong kernels tells nothing, and GPU time is scarce.
    if stages["tests"].status in ("FAILED", "TIMED OUT") and not args.keep_going:
        for name in filter(wanted, TIMING_STAGES):
            stages[name].status, stages[name].detail = "skipped", "the tests failed (--keep-going times them anyway)"

    # Kernels per inference call and per training step, lenet_ext's and eager's.
    stage = stages["launches"]
    launches = os.path.join(out, "launches.json")
    sizes = "256,8192" if has_gpu else "256"
    if wanted("launches"):
        code, stage.seconds = run([sys.executable, os.path.join("scripts", "count_launches.py"), "--batch-sizes",
                                   sizes, "--output", launches], os.path.join(out, "launches.log"), min(90, left() - 60))  # fmt: skip
        stage.status = outcome(code)
        stage.detail = f"launches.log: per step, at batch {sizes}" + ("" if has_gpu else " (operator calls on the CPU)")

    # Each tile program's phases, from clocks its blocks record: where its time goes, with or without ncu.
    stage = stages["phases"]
    if wanted("phases"):
        if not facts["cuda"]:
            stage.status, stage.detail = "unavailable", "torch without CUDA: built without CUDA"
        elif left() < 90:
            stage.status, stage.detail = "skipped", "no time left"
        else:
            code, stage.seconds = run([sys.executable, os.path.join("scripts", "phase_profile.py"), "--output",
                                       os.path.join(out, "phases.json")], os.path.join(out, "phases.log"),
                                      min(60, left() - 60))  # fmt: skip
            stage.status = outcome(code)
            stage.detail = "phases.log: each program's phases, share of its cycles" if has_gpu else "the script on the CPU"

    # The benchmark, with what time is left: first without the torch.compile
    # providers (quick, so that lenet_ext against eager always comes back),
    # then the whole table, whose compiles take most of its time. Each writes
    # its results.json as it goes, so a stopped run keeps its rows.
    bench = [sys.executable, os.path.join("benchmarks", "bench.py"), "--quiet", "--modes", "inference,training"]
    if has_gpu:
        bench += ["--devices", "cuda", "--batch-sizes", "1,256,8192,65536"]
    else:
        bench += ["--devices", "cpu", "--batch-sizes", "1,256"]
    for name, extra in (("bench-no-compile", ["--no-compile"]), ("bench", [])):
        stage = stages[name]
        if not wanted(name):
            continue
        if left() < 30:
            stage.status, stage.detail = "skipped", "no time left"
            continue
        # perf_hints: inductor's reasons for running a reduce-overhead graph without CUDA graphs, into the log.
        code, stage.seconds = run(bench + extra + ["--output-dir", os.path.join(out, name)],
                                  os.path.join(out, f"{name}.log"), left(), env={"TORCH_LOGS": "perf_hints"})  # fmt: skip
        stage.status = outcome(code)
        stage.detail = f"{name}/: results.json" + (", throughput.png" if code == 0 else f"; see {name}.log")

    # Each tile program at each tile size: what choose_tile should pick.
    stage = stages["tiles"]
    if wanted("tiles"):
        if left() < 45:
            stage.status, stage.detail = "skipped", "no time left"
        else:
            code, stage.seconds = run([sys.executable, os.path.join("scripts", "tile_sweep.py"), "--output",
                                       os.path.join(out, "tiles.json")], os.path.join(out, "tiles.log"),
                                      min(120, left() - 30))  # fmt: skip
            stage.status = outcome(code)
            stage.detail = "tiles.log: GPU time per program and tile" if has_gpu else "the script on the CPU"

    # Nsight Compute over one call of each tile program: where each one's time goes.
    stage = stages["ncu"]
    ncu = find_cuda_tool("ncu")
    if not wanted("ncu"):
        pass
    elif not has_gpu:  # the workload itself, on the CPU
        code, _ = run([sys.executable, os.path.join("scripts", "kernel_workload.py"), "--device", "cpu"],
                      os.path.join(out, "kernel-workload-cpu.log"), min(120, left()))  # fmt: skip
        stage.status = "unavailable"
        stage.detail = "no GPU; the workload on the CPU " + ("passed" if code == 0 else "FAILED")
    elif ncu is None or left() < 45:
        stage.status = "unavailable" if ncu is None else "skipped"
        stage.detail = "ncu not found" if ncu is None else "no time left"
    else:
        log, raw, report = (os.path.join(out, name) for name in ("ncu.log", "ncu-raw.csv", "ncu-profile.log"))
        try:
            listing = subprocess.run([ncu, "--list-sections"], capture_output=True, text=True, timeout=60).stdout
        except subprocess.SubprocessError:
            listing = ""
        sections = listed_ncu_sections(listing) or list(NCU_SECTIONS[:3])
        # The GPU's own clocks (METHOD.md: leave them alone), so that durations compare with the benchmark's.
        cmd = [ncu, "--clock-control", "none", "--kernel-name", "regex:tile_program_kernel", "--force-overwrite",
               "--export", os.path.join(out, "ncu"), *(a for s in sections for a in ("--section", s)),
               sys.executable, os.path.join("scripts", "kernel_workload.py")]  # fmt: skip
        code, stage.seconds = run(cmd, report, min(150, left() - 25))
        lines, stalls = [], []
        profile = os.path.join(out, "ncu.ncu-rep")
        if os.path.exists(profile):  # read out as text, then removed: the raw page has every metric
            for page, path in (("details", log), ("raw", raw)):
                run([ncu, "--import", profile, "--csv", "--page", page], path, 60)
            os.remove(profile)
            lines, stalls = summarize_ncu(log), summarize_ncu_stalls(raw)
        if lines:
            with open(os.path.join(out, "ncu-summary.md"), "w") as f:
                f.write(f"Sections: {', '.join(sections)}; the GPU's own clocks, caches flushed before each kernel.\n\n")
                f.write("\n".join(lines) + "\n")
                if stalls:
                    f.write("\nWhy warps wait (WarpStateStats; ncu-raw.csv has every metric):\n\n" + "\n".join(stalls) + "\n")
        # The profiler may be refused the GPU's counters (a sandbox, a driver setting): not the kernels' failure.
        stage.status = "passed" if code == 0 and lines else "unavailable" if code is not None else "TIMED OUT"
        stage.detail = (f"ncu-summary.md: {len(lines) - 2} launches" if lines
                        else tail(report, 3).strip().replace("\n", " | ")[:120])  # fmt: skip

    # The same quick table on the reference kernels: what the tile programs gain.
    stage = stages["bench-reference"]
    if not wanted("bench-reference"):
        pass
    elif has_gpu and left() > 60:
        code, stage.seconds = run(bench + ["--no-compile", "--output-dir", os.path.join(out, "bench-reference")],
                                  os.path.join(out, "bench-reference.log"), left(),
                                  env={"LENET_EXT_CUDA_KERNEL": "reference"})  # fmt: skip
        stage.status = outcome(code)
        stage.detail = "bench-reference/: the simple kernels"
    else:
        stage.status, stage.detail = "skipped", "no GPU" if not has_gpu else "no time left"
    return finish(stages, out, None)


def finish(stages, out, failure_tail):
    if failure_tail:
        print(failure_tail)
    lines = ["| stage | status | seconds | detail |", "|---|---|---|---|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.0f} | {s.detail} |" for s in stages.values()]
    table = "\n".join(lines)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(table + "\n")
    if os.path.exists(os.path.join(out, "launches.log")):
        print(tail(os.path.join(out, "launches.log"), 45))
    if os.path.exists(os.path.join(out, "phases.log")):
        print(tail(os.path.join(out, "phases.log"), 40))
    if os.path.exists(os.path.join(out, "tiles.log")):
        print(tail(os.path.join(out, "tiles.log"), 30))
    if os.path.exists(os.path.join(out, "ncu-summary.md")):
        print(tail(os.path.join(out, "ncu-summary.md"), 30))
    if os.path.exists(os.path.join(out, "crash-backtrace.log")):
        with open(os.path.join(out, "crash-backtrace.log"), errors="replace") as f:
            log = f.read()
        print(log[log.find("received signal"):][:2500])
        if "=> 0x" in log:  # CRASH_FACTS: the faulting instruction onwards
            print(log[log.find("=> 0x"):][:1500])
    for log in ("bench.log", "bench-no-compile.log"):
        if os.path.exists(os.path.join(out, log)):
            print(tail(os.path.join(out, log), 60))
            break
    print(f"\nlogs in {out}\n\n{table}")
    ok = all(s.status in ("passed", "unavailable", "skipped") for s in stages.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
