"""Times each CUDA tile program at each tile size (images per thread block), for choose_tile's rule.

    python scripts/tile_sweep.py [--tiles auto,1,2,4,5,8,10,16] [--output tiles.json]

For each workload the speed targets name (LeNet inference at batch 256, 8192
and 65536, a training step at 256 and 8192) and the conv operator's forward
and backward at 8192 (a fuse()'d model's second block), and for each tile
asked for (LENET_EXT_CUDA_TILE's values, switched with _C.set_cuda_tile), the
profiler's GPU time per step of each tile program and of the whole step, as
count_launches.py measures it. The programs of a step run one after another,
so each program's row shows its own best tile, whatever the others take;
"auto" is the tile choose_tile picks now. A tile too large for shared memory
falls back to the largest half of it that fits, so two columns can agree.
5 and 10 are there for the work's balance: LeNet's forward has 50 conv2
items (a group of eight channels at a pooled position; a conv pass of one or
two images takes groups of two, four times as many) per image, and a
conv pass of 5 images (a tile of 5, or of 10 in two passes) makes 250, one
nearly whole round of a block's 256 threads; a tile of 10 also reads the
dense layers' weights once for ten images. Both leave room for three blocks
of the forward program per multiprocessor (228 KB of shared memory).
On the CPU (--device cpu) it checks the script at small batches (the tile
programs are CUDA's; the CPU runs its own kernels whatever the tile).
"""

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from count_launches import count, short_name  # noqa: E402

import lenet_ext  # noqa: E402
from lenet_ext import LeNet  # noqa: E402
from lenet_ext.ops import conv_sigmoid_avgpool2d  # noqa: E402


def workloads(device):
    """(name, step) pairs: each step one call of what the name says."""
    big = device.type == "cuda"
    torch.manual_seed(0)
    net = LeNet().to(device)
    params = list(net.parameters())
    steps = []
    for batch in (256, 8192, 65536) if big else (3, 16):
        x = torch.rand(batch, 1, 28, 28, device=device)

        def infer(x=x):
            with torch.inference_mode():
                return net(x)

        steps.append((f"inference {batch}", infer))
    for batch in (256, 8192) if big else (3, 16):
        x = torch.rand(batch, 1, 28, 28, device=device)
        target = torch.randint(0, 10, (batch,), device=device)
        steps.append((f"training {batch}", lambda x=x, target=target: torch.autograd.grad(
            F.cross_entropy(net(x), target), params)))  # fmt: skip
    batch = 8192 if big else 16
    block1 = torch.rand(batch, 6, 14, 14, device=device)
    weight = net[3].weight.detach().clone().requires_grad_()
    bias = net[3].bias.detach().clone().requires_grad_()

    def conv_block(block1=block1):
        out = conv_sigmoid_avgpool2d(block1, weight, bias, 0, 2)
        return torch.autograd.grad(out, (weight, bias), torch.ones_like(out))

    steps.append((f"conv operator {batch}", conv_block))
    return steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiles", default="auto,1,2,4,5,8,10,16", help="comma-separated (default auto,1,2,4,5,8,10,16)")
    parser.add_argument("--output", help="write the times to this JSON file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    tiles = args.tiles.split(",")
    before = lenet_ext._C.cuda_tile()
    times = {}  # workload -> tile -> {kernel: us}
    try:
        for name, step in workloads(device):
            for tile in tiles:
                lenet_ext._C.set_cuda_tile(tile)
                per_kernel = count(step, device)
                times.setdefault(name, {})[tile] = {short_name(k): c["us"] for k, c in per_kernel.items()}
    finally:
        lenet_ext._C.set_cuda_tile(before)
    what = "GPU microseconds per step" if device.type == "cuda" else "CPU microseconds per step (operator calls)"
    print(f"{what}, by tile asked for; the fastest in bold\n")
    print("| workload | kernel | " + " | ".join(tiles) + " |\n|---|---|" + "---:|" * len(tiles))
    for name, by_tile in times.items():
        kernels = [k for k in by_tile[tiles[0]] if k.startswith("tile program")] + ["whole step"]
        for kernel in kernels:
            row = [sum(t.values()) if kernel == "whole step" else t.get(kernel) for t in by_tile.values()]
            best = min((v for v in row if v is not None), default=None)
            cells = ["" if v is None else (f"**{v:.1f}**" if v == best else f"{v:.1f}") for v in row]
            print(f"| {name} | {kernel} | " + " | ".join(cells) + " |")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"device": str(device), "tiles": tiles, "us_per_step": times}, f, indent=1)


if __name__ == "__main__":
    main()
