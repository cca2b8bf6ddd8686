"""A small workload that reaches every lenet_ext CUDA kernel, for compute-sanitizer.

scripts/verify_cuda.py runs it under memcheck, racecheck, synccheck and
initcheck. Small shapes keep the sanitizers fast; the odd ones (a flooring
pool, one channel, a batch of 0, no bias) reach the kernels' edge cases.
Every result is checked against the float64 reference, so the workload also
fails on a wrong answer. On CUDA, float32 runs twice: on the tile programs
and on the reference kernels (LENET_EXT_CUDA_KERNEL's two choices).
"""

import argparse

import torch
import torch.nn.functional as F

import lenet_ext
from lenet_ext import LeNet
from lenet_ext.model import lenet_args
from lenet_ext.ops import conv_sigmoid_avgpool2d, reference_conv_sigmoid_avgpool2d

# (batch, in_channels, out_channels, height, width, kernel, padding, pool, bias)
CASES = [
    (3, 1, 6, 28, 28, 5, 2, 2, True),  # LeNet's first block
    (3, 6, 16, 14, 14, 5, 0, 2, True),  # LeNet's second block
    (2, 3, 5, 13, 11, 3, 0, 2, False),  # flooring pool, no bias
    (3, 1, 5, 12, 10, 3, 1, 3, True),  # pool 3
    (0, 1, 6, 28, 28, 5, 2, 2, True),  # empty batch
]


def check_operator(case, dtype, device):
    n, c_in, c_out, h, w, k, padding, pool, with_bias = case
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c_in, h, w, generator=gen, dtype=torch.float64)
    weight = torch.randn(c_out, c_in, k, k, generator=gen, dtype=torch.float64) / k
    bias = torch.randn(c_out, generator=gen, dtype=torch.float64) if with_bias else None
    tensors = [t for t in (x, weight, bias) if t is not None]
    ref_leaves = [t.clone().requires_grad_() for t in tensors]
    ref = reference_conv_sigmoid_avgpool2d(*ref_leaves[:2], ref_leaves[2] if with_bias else None, padding, pool)
    grad_out = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out)
    leaves = [t.to(device, dtype).requires_grad_() for t in tensors]
    out = conv_sigmoid_avgpool2d(*leaves[:2], leaves[2] if with_bias else None, padding, pool)
    grads = torch.autograd.grad(out, leaves, grad_out.to(device, dtype))
    tol = dict(atol=1e-4, rtol=1e-3) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(out.double().cpu(), ref.detach(), **tol)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double().cpu(), want, **tol)
    # One gradient at a time: each mask takes its own path through the kernels.
    for i in range(len(leaves)):
        torch.autograd.grad(conv_sigmoid_avgpool2d(*leaves[:2], leaves[2] if with_bias else None, padding, pool),
                            leaves[i], grad_out.to(device, dtype))  # fmt: skip


def check_lenet(device):
    torch.manual_seed(0)
    net = LeNet().to(device)
    ref = torch.nn.Sequential(*LeNet()).to(device)
    ref.load_state_dict(net.state_dict())
    x = torch.rand(5, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (5,), device=device)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), atol=1e-5, rtol=1e-4)
    F.cross_entropy(net(x), y).backward()
    F.cross_entropy(ref(x), y).backward()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-3)
    # lenet_backward's paths: down to x, down to conv2 only, the dense layers only.
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in lenet_args(x, net)]
    logits, *saved = torch.ops.lenet_ext.lenet_train_forward(*args)
    grad_logits = torch.randn_like(logits)
    double = [a.double().cpu() if isinstance(a, torch.Tensor) else a for a in (grad_logits, x, *saved, *args[1:])]
    for mask in ([True] * 11, [False] * 3 + [True] * 8, [False] * 5 + [True] * 6):
        got = torch.ops.lenet_ext.lenet_backward(grad_logits, x, *saved, *args[1:], mask)
        want = torch.ops.lenet_ext.lenet_backward(*double, mask)
        for g, w in zip(got, want):
            assert (g is None) == (w is None)
            if w is not None:
                torch.testing.assert_close(g.double().cpu(), w, atol=1e-5, rtol=1e-4)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to check the workload itself")
    device = parser.parse_args().device
    for case in CASES:
        check_operator(case, torch.float64, device)
    for kernel in ("fused", "reference") if device == "cuda" else ("cpu",):
        if device == "cuda":
            lenet_ext._C.set_cuda_kernel(kernel)
        for case in CASES:
            check_operator(case, torch.float32, device)
        check_lenet(device)
    if device == "cuda":
        torch.cuda.synchronize()
    print("workload passed")


if __name__ == "__main__":
    main()
