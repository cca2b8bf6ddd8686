"""One call of each lenet_ext tile program at the sizes the speed targets name, for Nsight Compute.

    ncu --kernel-name regex:tile_program_kernel python scripts/kernel_workload.py

scripts/verify_cuda.py runs it under ncu (Nsight Compute) when ncu is there
and time is left, for each kernel's duration, throughput, occupancy and
limiter. The calls, each once, no warm-up (ncu replays every kernel on its
own):
  LeNet inference at batch 65536          LeNetTileProgram
  a training step's forward and backward  LeNetTileProgram (training),
  at batch 256 (one image per block,      LeNetBackwardTileProgram,
  latency-bound) and at batch 8192        ConvTileBackwardProgram,
                                          DenseWeightGradsProgram,
                                          PartialSumsProgram
  the conv operator's forward and         ConvTileForwardProgram,
  backward at batch 8192 (a fuse()'d      ConvTileBackwardProgram,
  model's second block)                   PartialSumsProgram
On the CPU (--device cpu) it checks the script at a small batch.
"""

import argparse

import torch
import torch.nn.functional as F

from lenet_ext import LeNet
from lenet_ext.ops import conv_sigmoid_avgpool2d


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to check the script itself")
    device = torch.device(parser.parse_args(argv).device)
    inference_batch, training_batches = (65536, (256, 8192)) if device.type == "cuda" else (64, (3, 16))
    training_batch = training_batches[-1]
    torch.manual_seed(0)
    net = LeNet().to(device)
    with torch.inference_mode():
        net(torch.rand(inference_batch, 1, 28, 28, device=device))
    for batch in training_batches:
        x = torch.rand(batch, 1, 28, 28, device=device)
        target = torch.randint(0, 10, (batch,), device=device)
        torch.autograd.grad(F.cross_entropy(net(x), target), list(net.parameters()))
    block1 = torch.rand(training_batch, 6, 14, 14, device=device)
    weight, bias = net[3].weight, net[3].bias
    out = conv_sigmoid_avgpool2d(block1, weight, bias, 0, 2)
    torch.autograd.grad(out, (weight, bias), torch.randn_like(out))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    print("kernel workload done")


if __name__ == "__main__":
    main()
