"""CUDA-only behaviour: capture in CUDA graphs, streams, 64-bit indexing, and the
weight-gradient kernel's reads. Skipped, and saying so, without a GPU; the
CUDA variants of the parity, gradcheck, opcheck and compile tests live beside
their CPU ones (the `device` parameter)."""

import pytest
import torch
import torch.nn.functional as F

import lenet_ext
from lenet_ext import LeNet
from lenet_ext.model import lenet_args
from lenet_ext.ops import conv_sigmoid_avgpool2d, reference_conv_sigmoid_avgpool2d

from conftest import LENET_TOLERANCES, requires_cuda, twin_pair
import test_conv_sigmoid_avgpool2d as conv_tests

pytestmark = requires_cuda


@pytest.fixture(params=["fused", "reference"])
def cuda_kernel(request):
    """Runs a test on the tile programs and again on the reference kernels."""
    before = lenet_ext._C.cuda_kernel()
    lenet_ext._C.set_cuda_kernel(request.param)
    try:
        yield request.param
    finally:
        lenet_ext._C.set_cuda_kernel(before)


def cuda_kernel_names(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.key for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("case", list(conv_tests.CASES.values()), ids=list(conv_tests.CASES))
def test_reference_kernels_match_the_reference(case, with_bias, cuda_kernel):
    """float32 on both CUDA paths (the default grid runs the tile programs only)."""
    conv_tests.test_forward_and_gradients_match_reference(case, with_bias, torch.float32, "cuda")


@pytest.mark.parametrize("batch", [1, 9, 4099])
def test_conv_operator_runs_one_tile_kernel_each_way(batch, cuda_kernel):
    """Forward is one launch and backward one (plus the sum of the per-tile partials) on the tile programs."""
    x = torch.rand(batch, 6, 14, 14, device="cuda")
    w = (torch.randn(16, 6, 5, 5, device="cuda") / 5).requires_grad_()
    b = torch.randn(16, device="cuda").requires_grad_()
    names = cuda_kernel_names(lambda: torch.autograd.grad(conv_sigmoid_avgpool2d(x, w, b, 0, 2).sum(), (w, b)))
    tiled = [n for n in names if "tile_program_kernel" in n]
    if cuda_kernel == "fused":
        assert any("ConvTileForwardProgram" in n for n in tiled) and any("ConvTileBackwardProgram" in n for n in tiled)
        assert not any("preactivation_grad_kernel" in n for n in names)
    else:
        assert not tiled and any("preactivation_grad_kernel" in n for n in names)


def test_inference_is_captured_and_replayed_in_a_cuda_graph():
    """Capture fails on any host synchronisation, so this proves the forward path has none."""
    net, ref = twin_pair(device="cuda")
    net.eval()
    static_x = torch.rand(64, 1, 28, 28, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):  # warm-up outside the graph, as CUDA graphs require
            net(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_out = net(static_x)
    for _ in range(2):
        x = torch.rand(64, 1, 28, 28, device="cuda")
        static_x.copy_(x)
        graph.replay()
        with torch.no_grad():
            torch.testing.assert_close(static_out, ref(x), **LENET_TOLERANCES[torch.float32])


def test_training_step_is_captured_and_replayed_in_a_cuda_graph():
    """Forward, backward and an SGD step in one graph, replayed on new data."""
    net, ref = twin_pair(device="cuda")
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    static_x = torch.rand(32, 1, 28, 28, device="cuda")
    static_y = torch.randint(0, 10, (32,), device="cuda")

    def step():
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(net(static_x), static_y)
        loss.backward()
        opt.step()
        return loss

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    # Capture records the step without running it: from here on, the graph
    # and the reference take the same steps on the same data.
    ref.load_state_dict(net.state_dict())
    for _ in range(3):
        x, y = torch.rand(32, 1, 28, 28, device="cuda"), torch.randint(0, 10, (32,), device="cuda")
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        ref_opt.zero_grad()
        ref_loss = F.cross_entropy(ref(x), y)
        ref_loss.backward()
        ref_opt.step()
        torch.testing.assert_close(static_loss, ref_loss.detach(), **LENET_TOLERANCES[torch.float32])
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-3)


def test_compile_reduce_overhead_captures_lenet():
    net, ref = twin_pair(device="cuda")
    compiled = torch.compile(net, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        x = torch.rand(16, 1, 28, 28, device="cuda")
        with torch.no_grad():
            torch.testing.assert_close(compiled(x).clone(), ref(x), **LENET_TOLERANCES[torch.float32])


def test_sigmoid_rounds_as_the_division_does(cuda_kernel):
    """The tile programs' sigmoid, whose reciprocal is the approximation and one Newton step, is
    correctly rounded where the division is, and the reference kernels' is the division."""
    from test_tile_programs import SIGMOID_ARGUMENTS, check_tile_sigmoid

    z = SIGMOID_ARGUMENTS.reshape(1, 1, 1, -1).cuda().requires_grad_()
    pooled = conv_sigmoid_avgpool2d(z, torch.ones(1, 1, 1, 1, device="cuda"), None, 0, 1)
    (grad_z,) = torch.autograd.grad(pooled.sum(), z)
    check_tile_sigmoid(pooled.detach().cpu(), grad_z.cpu(), SIGMOID_ARGUMENTS)
    # Against torch.sigmoid on the same GPU, a division after the same expf: equal, or an ulp apart
    # where the two expf builds differ.
    normal = SIGMOID_ARGUMENTS >= -87
    got, want = pooled.detach().cpu().flatten(), torch.sigmoid(z.detach()).cpu().flatten()
    torch.testing.assert_close(got[normal], want[normal], rtol=1.2e-7, atol=0)


def test_operator_runs_on_the_current_stream(cuda_kernel):
    """Work queued on a side stream is ordered by that stream alone: no implicit default-stream use."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, 14, 14, generator=gen).cuda()
    w = (torch.randn(16, 6, 5, 5, generator=gen) / 5).cuda().requires_grad_()
    b = torch.randn(16, generator=gen).cuda().requires_grad_()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # keeps the side stream busy, so a default-stream kernel would race ahead
        out = conv_sigmoid_avgpool2d(x, w, b, 0, 2)
        gw, gb = torch.autograd.grad(out.square().sum(), (w, b))
    torch.cuda.current_stream().wait_stream(side)
    want = reference_conv_sigmoid_avgpool2d(x.double(), w.double(), b.double(), 0, 2)
    want_gw, want_gb = torch.autograd.grad(want.square().sum(), (w, b))
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(gw.double(), want_gw.double(), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(gb.double(), want_gb.double(), atol=1e-3, rtol=1e-3)


def test_forward_past_2_to_the_31_input_elements(cuda_kernel):
    """Indices past int32 in the forward kernel: x of 2^31 + 2^20 elements (8 GiB of float32)."""
    needed = 12 * 2**30
    free, _ = torch.cuda.mem_get_info()
    if free < max(needed, 24 * 2**30):
        pytest.skip(f"needs 24 GB of free GPU memory, {free / 2**30:.0f} GiB free")
    c_in, side = 1, 32
    batch = (2**31 + 2**20) // (c_in * side * side) + 1
    x = torch.empty(batch, c_in, side, side, device="cuda").uniform_()
    w = torch.randn(2, c_in, 5, 5, device="cuda") / 5
    b = torch.randn(2, device="cuda")
    out = conv_sigmoid_avgpool2d(x, w, b, 0, 2)
    assert x.numel() > 2**31
    for rows in (slice(0, 3), slice(batch - 3, batch)):  # the first and the last images
        want = reference_conv_sigmoid_avgpool2d(x[rows].double(), w.double(), b.double(), 0, 2)
        torch.testing.assert_close(out[rows].double(), want, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("batch", [1, 31, 257, 4100])
def test_weight_gradient_over_many_images(batch, cuda_kernel):
    """The weight-gradient reduction over image tiles, against float64, at batches around its tile sizes."""
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 6, 14, 14, generator=gen, dtype=torch.float64)
    w = (torch.randn(16, 6, 5, 5, generator=gen, dtype=torch.float64) / 5).requires_grad_()
    b = torch.randn(16, generator=gen, dtype=torch.float64).requires_grad_()
    grad_out = torch.randn(batch, 16, 5, 5, generator=gen, dtype=torch.float64)
    want = torch.autograd.grad(reference_conv_sigmoid_avgpool2d(x, w, b, 0, 2), (w, b), grad_out)
    wc, bc = (t.detach().float().cuda().requires_grad_() for t in (w, b))
    got = torch.autograd.grad(conv_sigmoid_avgpool2d(x.float().cuda(), wc, bc, 0, 2), (wc, bc), grad_out.float().cuda())
    for g, expected in zip(got, want):
        torch.testing.assert_close(g.double().cpu(), expected, atol=1e-4 * batch**0.5, rtol=1e-3)
    again = torch.autograd.grad(conv_sigmoid_avgpool2d(x.float().cuda(), wc, bc, 0, 2), (wc, bc), grad_out.float().cuda())
    assert all(torch.equal(a, c) for a, c in zip(got, again)), "the reduction order is fixed: bitwise repeatable"


def test_lenet_training_matches_the_cpu():
    net, _ = twin_pair()
    net_cuda, _ = twin_pair(device="cuda")
    x = torch.rand(70, 1, 28, 28)
    y = torch.randint(0, 10, (70,))
    F.cross_entropy(net(x), y).backward()
    F.cross_entropy(net_cuda(x.cuda()), y.cuda()).backward()
    for p, q in zip(net.parameters(), net_cuda.parameters()):
        torch.testing.assert_close(q.grad.cpu(), p.grad, atol=1e-5, rtol=1e-3)


def test_lenet_with_a_hook_runs_the_operator_per_block_on_cuda():
    net, ref = twin_pair(device="cuda")
    net[8].register_forward_hook(lambda m, i, o: None)
    x = torch.rand(8, 1, 28, 28, device="cuda")
    torch.testing.assert_close(net(x), ref(x), **LENET_TOLERANCES[torch.float32])


def test_lenet_state_moves_between_devices():
    net = LeNet().cuda()
    cpu_net = LeNet()
    cpu_net.load_state_dict({k: v.cpu() for k, v in net.state_dict().items()})
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(net(x.cuda()).cpu(), cpu_net(x), **LENET_TOLERANCES[torch.float32])


@pytest.mark.parametrize("batch", [1, 9, 4099])
def test_fused_inference_matches_the_reference_kernels(batch):
    """lenet_forward's one-launch tile program against the layer-by-layer kernels and nn.Sequential."""
    net, ref = twin_pair(device="cuda")
    x = torch.rand(batch, 1, 28, 28, device="cuda")
    before = lenet_ext._C.cuda_kernel()
    with torch.inference_mode():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fused = net(x)
            torch.cuda.synchronize()
        lenet_ext._C.set_cuda_kernel("reference")
        try:
            layers = net(x)
        finally:
            lenet_ext._C.set_cuda_kernel(before)
        want = ref(x)
    kernels = [e.key for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert any("LeNetTileProgram" in k for k in kernels) and not any("preactivation" in k for k in kernels)
    torch.testing.assert_close(fused, want, **LENET_TOLERANCES[torch.float32])
    torch.testing.assert_close(layers, want, **LENET_TOLERANCES[torch.float32])


@pytest.mark.parametrize("batch", [1, 9, 4099])
def test_fused_train_forward_matches_the_reference_kernels(batch):
    """lenet_train_forward is one launch of the tile program and returns what the layers return."""
    net, _ = twin_pair(device="cuda")
    x = torch.rand(batch, 1, 28, 28, device="cuda")
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in lenet_args(x, net))
    before = lenet_ext._C.cuda_kernel()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fused = torch.ops.lenet_ext.lenet_train_forward(*args)
        torch.cuda.synchronize()
    lenet_ext._C.set_cuda_kernel("reference")
    try:
        layers = torch.ops.lenet_ext.lenet_train_forward(*args)
    finally:
        lenet_ext._C.set_cuda_kernel(before)
    kernels = [e.key for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert [k for k in kernels if "LeNetTileProgram" in k] and len(kernels) == 1, kernels
    for got, want in zip(fused, layers):
        assert got.shape == want.shape and got.is_contiguous()
        torch.testing.assert_close(got, want, **LENET_TOLERANCES[torch.float32])


def test_fused_forward_takes_weights_that_are_not_16_byte_aligned():
    """A dense weight at an odd offset into its storage is read a float at a time, not in float4s."""
    net, ref = twin_pair(device="cuda")
    with torch.no_grad():
        storage = torch.empty(net[7].weight.numel() + 1, device="cuda")
        net[7].weight.set_(storage[1:].view_as(net[7].weight).copy_(net[7].weight))
        ref[7].weight.copy_(net[7].weight)
    x = torch.rand(33, 1, 28, 28, device="cuda")
    with torch.inference_mode():
        torch.testing.assert_close(net(x), ref(x), **LENET_TOLERANCES[torch.float32])


@pytest.mark.parametrize("batch", [1, 9, 4099])
def test_fused_backward_matches_the_reference_kernels(batch):
    """lenet_backward: the dense-and-conv2 program, conv1's program, one launch of partial
    sums and the dense weight products; against the layer-by-layer kernels, bitwise repeatable."""
    net, _ = twin_pair(device="cuda")
    x = torch.rand(batch, 1, 28, 28, device="cuda")
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in lenet_args(x, net))
    logits, *saved = torch.ops.lenet_ext.lenet_train_forward(*args)
    grad_logits = torch.randn_like(logits)
    mask = [True] * 11
    before = lenet_ext._C.cuda_kernel()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fused = torch.ops.lenet_ext.lenet_backward(grad_logits, x, *saved, *args[1:], mask)
        torch.cuda.synchronize()
    again = torch.ops.lenet_ext.lenet_backward(grad_logits, x, *saved, *args[1:], mask)
    lenet_ext._C.set_cuda_kernel("reference")
    try:
        layers = torch.ops.lenet_ext.lenet_backward(grad_logits, x, *saved, *args[1:], mask)
    finally:
        lenet_ext._C.set_cuda_kernel(before)
    kernels = [e.key for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    for program in ("LeNetBackwardTileProgram", "ConvTileBackwardProgram", "PartialSumsProgram"):
        assert any(program in k for k in kernels), (program, kernels)
    assert not any("preactivation" in k or "reduce_kernel" in k for k in kernels), kernels
    for got, repeat, want in zip(fused, again, layers):
        assert got.shape == want.shape and got.is_contiguous()
        assert torch.equal(got, repeat), "fixed reduction order: bitwise repeatable"
        torch.testing.assert_close(got, want, atol=1e-5 * batch**0.5, rtol=1e-4)


@pytest.fixture(params=["1", "3", "16", "64"])
def cuda_tile(request):
    """Runs a test with the tile programs asked for this many images per block (64 fits no
    block's shared memory: the largest half of it that fits is taken)."""
    before = lenet_ext._C.cuda_tile()
    lenet_ext._C.set_cuda_tile(request.param)
    try:
        yield int(request.param)
    finally:
        lenet_ext._C.set_cuda_tile(before)


@pytest.mark.parametrize("batch", [1, 5, 70])
def test_every_tile_size_gives_the_reference_results(batch, cuda_tile):
    """LENET_EXT_CUDA_TILE's sizes, batches smaller and larger than a tile: LeNet's training
    step and the conv operator both ways, against the reference kernels."""
    net, _ = twin_pair(device="cuda")
    x = torch.rand(batch, 1, 28, 28, device="cuda")
    target = torch.randint(0, 10, (batch,), device="cuda")
    block1 = torch.rand(batch, 6, 14, 14, device="cuda")

    def step():
        out = net(x)
        conv = conv_sigmoid_avgpool2d(block1, net[3].weight, net[3].bias, 0, 2)
        loss = F.cross_entropy(out, target) + conv.square().mean()
        return (out, conv, *torch.autograd.grad(loss, list(net.parameters())))

    fused = step()
    before = lenet_ext._C.cuda_kernel()
    lenet_ext._C.set_cuda_kernel("reference")
    try:
        layers = step()
    finally:
        lenet_ext._C.set_cuda_kernel(before)
    for got, want in zip(fused, layers):
        torch.testing.assert_close(got, want, atol=1e-5 * batch**0.5, rtol=1e-4)


@pytest.mark.parametrize("batch", [1, 70])
def test_phase_clocks_stamp_every_block_of_every_program(batch, cuda_tile):
    """_C.record_phase_clocks: a training step's tile programs each leave, per block, a stamp at
    its start and after each phase, in order; with recording off, launches leave none."""
    net = LeNet().cuda()
    x = torch.rand(batch, 1, 28, 28, device="cuda")
    target = torch.randint(0, 10, (batch,), device="cuda")
    lenet_ext._C.take_phase_clocks()
    lenet_ext._C.record_phase_clocks(True)
    try:
        torch.autograd.grad(F.cross_entropy(net(x), target), list(net.parameters()))
    finally:
        lenet_ext._C.record_phase_clocks(False)
    launches = lenet_ext._C.take_phase_clocks()
    programs = [program for program, *_ in launches]
    assert programs[0] == "LeNetTileProgram" and "LeNetBackwardTileProgram" in programs
    assert {"ConvTileBackwardProgram", "DenseWeightGradsProgram", "PartialSumsProgram"} <= set(programs)
    tiles_asked_or_halved = [cuda_tile >> k for k in range(cuda_tile.bit_length())]
    assert any(launches[0][2] == -(-batch // tile) for tile in tiles_asked_or_halved)
    for program, phases, tiles, stamps in launches:
        clocks = torch.frombuffer(bytearray(stamps), dtype=torch.int64).view(tiles, len(phases) + 1)
        assert len(set(phases)) == len(phases) > 0 and tiles > 0, program
        assert (clocks[:, 0] != 0).all() and (clocks[:, 1:] >= clocks[:, :-1]).all(), program
    net(x)
    assert lenet_ext._C.take_phase_clocks() == []
