"""Where each CUDA tile program's time goes, phase by phase, from clocks its own blocks record.

    python scripts/phase_profile.py [--tiles auto,5] [--output phases.json]

For tile_sweep.py's workloads (LeNet inference at batch 256, 8192 and 65536,
a training step at 256 and 8192, the conv operator at 8192) and each tile
asked for, one step runs with _C.record_phase_clocks on: thread 0 of every
block of every tile program stamps the multiprocessor's clock64() as the
block starts and after each phase's barrier (csrc/ops/cuda/phase_clocks.h).
For each launch the table gives its blocks, a block's median cycles, and
each phase's share of all its blocks' cycles: what to make faster, where
Nsight Compute cannot run (a sandboxed GPU). A block's cycles include the
time it waits for the multiprocessor's other blocks; the shares are what
each phase holds the block's resources for. On the CPU (--device cpu) the
tile programs do not run: it checks the script, which then finds no launch.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tile_sweep import workloads  # noqa: E402

import lenet_ext  # noqa: E402


def launch_summary(program, phases, tiles, stamps):
    """One launch's blocks, median block cycles, and each phase's share (%) of all its blocks' cycles."""
    clocks = torch.frombuffer(bytearray(stamps), dtype=torch.int64).view(tiles, len(phases) + 1)
    per_phase = (clocks[:, 1:] - clocks[:, :-1]).double()
    total = per_phase.sum()
    block = per_phase.sum(dim=1)
    shares = (100 * per_phase.sum(dim=0) / total).tolist() if total > 0 else [0.0] * len(phases)
    return {
        "program": program,
        "blocks": tiles,
        "median_block_cycles": float(block.median()) if tiles else 0.0,
        "max_block_cycles": float(block.max()) if tiles else 0.0,
        "phases": dict(zip(phases, shares)),
    }


def profile_step(step, device):
    """The tile-program launches of one step (after a warm-up one), summarised."""
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    lenet_ext._C.take_phase_clocks()
    lenet_ext._C.record_phase_clocks(True)
    try:
        step()
    finally:
        lenet_ext._C.record_phase_clocks(False)
    return [launch_summary(*launch) for launch in lenet_ext._C.take_phase_clocks()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiles", default="auto,5", help="comma-separated tiles to ask for (default auto,5)")
    parser.add_argument("--output", help="write the summaries to this JSON file")
    args = parser.parse_args(argv)
    if not hasattr(lenet_ext._C, "record_phase_clocks"):
        sys.exit("phase_profile: this lenet_ext was built without CUDA (python -m lenet_ext info)")
    device = torch.device(args.device)
    tiles = args.tiles.split(",")
    before = lenet_ext._C.cuda_tile()
    results = {}  # workload -> tile -> [launch summaries]
    try:
        for name, step in workloads(device):
            for tile in tiles:
                lenet_ext._C.set_cuda_tile(tile)
                results.setdefault(name, {})[tile] = profile_step(step, device)
    finally:
        lenet_ext._C.set_cuda_tile(before)
    launches = sum(len(by_launch) for by_tile in results.values() for by_launch in by_tile.values())
    print(f"{launches} tile-program launches stamped on {device}")
    print("| workload | tile | program | blocks | median block cycles | max | phases: share of the blocks' cycles |")
    print("|---|---|---|---:|---:|---:|---|")
    for name, by_tile in results.items():
        for tile, summaries in by_tile.items():
            for s in summaries:
                phases = ", ".join(f"{phase} {share:.0f}%" for phase, share in s["phases"].items())
                print(f"| {name} | {tile} | {s['program']} | {s['blocks']} | {s['median_block_cycles']:.0f} | "
                      f"{s['max_block_cycles']:.0f} | {phases} |")  # fmt: skip
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"device": str(device), "tiles": tiles, "launches": results}, f, indent=1)


if __name__ == "__main__":
    main()
