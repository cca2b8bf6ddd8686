"""Counts and times the GPU work of one LeNet inference call and one training step, lenet_ext's and eager's.

    python scripts/count_launches.py [--device cuda] [--batch-sizes 256,8192] [--output FILE.json]

The steps are bench.py's (inference: a forward under inference_mode;
training: forward, cross-entropy, autograd.grad, an SGD update). On CUDA each
is profiled a few times after a warm-up, and the kernels, memsets and copies
the profiler records are counted per step, by name, with their GPU time per
step: the evidence for "inference is one launch", for how many a training
step takes, and for where its GPU time goes, kernel by kernel. On the CPU (a
check of the script) the calling thread's top-level operator calls are
counted and timed instead. Then each step's wall time, and where its host
time goes: the operators and CUDA runtime calls with the most self time,
which is what a step that the GPU waits on is made of.

Last, a training step's parts (bench.py's TRAINING_STEP_PARTS: forward,
loss, grad, update), each timed on the host as it runs, and the wait for
the GPU at the step's end. Nothing in a step waits for the GPU before that
(CUDA-graph capture of a step proves it), so on CUDA a part's time is the
host's cost of issuing it, and the wait is the GPU work still queued when
the host is done: a step with little wait is host-bound, and its parts
say where. The same parts for a model of one Linear layer (the "floor"
row) are the step's cost without LeNet: what no LeNet can go below in this
step on this machine.
"""

import argparse
import collections
import contextlib
import json
import os
import re
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from bench import TRAINING_STEP_PARTS, inference_step, training_step  # noqa: E402

from lenet_ext import LeNet, reference_lenet  # noqa: E402

STEPS = 5
PART_STEPS = 50  # steps whose parts are timed; medians


def short_name(kernel):
    """A kernel's name for the table: a tile program by its program's name, others by their first 50 characters."""
    program = re.search(r"tile_program_kernel<(?:lenet_ext::)?(\w+)>", kernel)
    return f"tile program {program.group(1)}" if program else kernel[:50]


def count(step, device):
    """Per step, by name: {"count": launches, "us": microseconds} of the GPU events (CUDA), or of
    the top-level operator calls (CPU); the most time first."""
    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(STEPS):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    # The calling thread's: intra-op worker threads record their own calls as top level.
    caller = next(e.thread for e in events if e.device_type == torch.autograd.DeviceType.CPU)
    counts, times = collections.Counter(), collections.Counter()
    for event in events:
        on_gpu = event.device_type == torch.autograd.DeviceType.CUDA
        top_level_op = event.cpu_parent is None and event.thread == caller and "::" in event.name
        if (on_gpu if device.type == "cuda" else top_level_op):
            counts[event.name] += 1
            times[event.name] += event.time_range.elapsed_us()
    return {name: {"count": counts[name] / STEPS, "us": us / STEPS} for name, us in times.most_common()}


def host_time(step, device, top=8):
    """A step's wall time in microseconds (synchronised after each step), and, by name, the host
    time per step that each operator and CUDA runtime call spends itself (self CPU time, all
    threads), the `top` most: where a step that the GPU waits on spends its host time."""
    for _ in range(2):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda device: None)
    sync(device)
    start = time.perf_counter()
    for _ in range(STEPS):
        step()
        sync(device)
    wall_us = (time.perf_counter() - start) / STEPS * 1e6
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(STEPS):
            step()
        sync(device)
    averages = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    return wall_us, {e.key: e.self_cpu_time_total / STEPS for e in averages}


def step_parts(step, device):
    """Median microseconds of each of a training step's parts on the host, and of the
    wait for the GPU at its end ("GPU wait"), over PART_STEPS steps."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda device: None)
    times = collections.defaultdict(list)
    last = 0.0

    def mark(part):
        nonlocal last
        now = time.perf_counter()
        times[part].append((now - last) * 1e6)
        last = now

    for _ in range(2):
        step()
    sync(device)
    for _ in range(PART_STEPS):
        last = time.perf_counter()
        step(mark=mark)
        sync(device)
        mark("GPU wait")
    return {part: statistics.median(us) for part, us in times.items()}


def floor_model(x):
    """The least model a LeNet step could be: one Linear layer from the image to 10 classes."""
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(x[0].numel(), 10)).to(x.device)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", default="256", help="comma-separated (default 256)")
    parser.add_argument("--output", help="write the counts and times, by name, to this JSON file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    what = "GPU kernels, memsets and copies" if device.type == "cuda" else "operator calls"
    results, walls, host, parts = {}, {}, {}, {}
    print(f"{what} per step, {device}; time: their sum, in microseconds; step: the wall time of a step\n")
    print("| batch | mode | provider | per step | time | step | the most time |\n|---:|---|---|---:|---:|---:|---|")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        torch.manual_seed(0)
        x = torch.rand(batch, 1, 28, 28, device=device)
        target = torch.randint(0, 10, (batch,), device=device)
        reference = reference_lenet().to(device)
        providers = {"torch": reference, "lenet_ext": LeNet().to(device)}
        providers["lenet_ext"].load_state_dict(reference.state_dict())
        for mode, make in (("inference", inference_step), ("training", training_step)):
            for name, model in providers.items():
                step = make(model, x) if mode == "inference" else make(model, x, target)
                with torch.inference_mode() if mode == "inference" else contextlib.nullcontext():
                    counts = count(step, device)
                    wall_us, host[(batch, mode, name)] = host_time(step, device)
                results.setdefault(str(batch), {}).setdefault(mode, {})[name] = counts
                walls.setdefault(str(batch), {}).setdefault(mode, {})[name] = wall_us
                launches = sum(c["count"] for c in counts.values())
                us = sum(c["us"] for c in counts.values())
                top = ", ".join(f"{c['us']:.1f} us {c['count']:g}x {short_name(k)}" for k, c in list(counts.items())[:3])
                print(f"| {batch} | {mode} | {name} | {launches:g} | {us:.1f} | {wall_us:.1f} | {top} |")
        for name, model in {**providers, "floor": floor_model(x)}.items():
            parts[(batch, name)] = step_parts(training_step(model, x, target), device)
    print("\nHost time per step, by operator or runtime call, self time in microseconds, the most first\n")
    print("| batch | mode | provider | the most host time |\n|---:|---|---|---|")
    for (batch, mode, name), by_call in host.items():
        print(f"| {batch} | {mode} | {name} | " + ", ".join(f"{us:.1f} {k[:40]}" for k, us in by_call.items()) + " |")
    columns = (*TRAINING_STEP_PARTS, "GPU wait")
    print("\nA training step's parts: host microseconds each (medians), then the wait for the GPU at its end;"
          " floor: the step with one Linear layer for a model\n")
    print("| batch | provider | " + " | ".join(columns) + " | sum |\n|---:|---|" + "---:|" * (len(columns) + 1))
    for (batch, name), us in parts.items():
        print(f"| {batch} | {name} | " + " | ".join(f"{us[c]:.1f}" for c in columns) + f" | {sum(us.values()):.1f} |")
    if args.output:
        with open(args.output, "w") as f:
            host_us = {f"{b} {m} {n}": by_call for (b, m, n), by_call in host.items()}
            parts_us = {f"{b} {n}": us for (b, n), us in parts.items()}
            json.dump({"device": str(device), "per_step": results, "step_us": walls, "host_us": host_us,
                       "training_parts_us": parts_us}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
