"""LeNet from lenet_ext against the reference nn.Sequential and torch.compile, side by side.

Every provider runs on the same inputs with the same weights, and its output
(and, for the training step, its gradients) is checked against the eager
reference before it is timed. Timings come from torch.utils.benchmark
(blocked_autorange) on torch's thread count (--threads) for every provider;
the providers of a row take turns over --rounds rounds, so that a slow spell
of a shared machine hits them alike. Medians and interquartile ranges, warm-up
and compile time excluded (compile time is reported on its own).

  python benchmarks/bench.py                        # default: about 90 s on 2 CPU cores
  python benchmarks/bench.py --full                 # batch 1, 64, 256, 1024, 8192
  python benchmarks/bench.py --batch-sizes 1,256 --modes inference --output-dir results/
  python benchmarks/bench.py --threads 1            # every provider on one thread

CPU inference rows also time ONNX Runtime and OpenVINO on the exported
reference model when they are installed (pip install ".[peers]"; see peers.py).
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils import benchmark

import lenet_ext
from lenet_ext import LeNet, reference_lenet

DEFAULT_BATCHES = (1, 256, 8192)
FULL_BATCHES = (1, 64, 256, 1024, 8192)
MODES = ("inference", "training", "layer")
# The two conv blocks of LeNet: (in_channels, out_channels, image size, padding).
LAYER_SHAPES = {"block1": (1, 6, 28, 2), "block2": (6, 16, 14, 0)}
CHECK_TOLERANCE = dict(atol=1e-4, rtol=1e-3)


def lenet_forward_flops(model) -> int:
    """Multiply-adds x 2 of one image's forward pass (sigmoid and pooling not counted)."""
    conv1, conv2 = model[0], model[3]
    flops = 2 * conv1.out_channels * 28 * 28 * conv1.in_channels * 25
    flops += 2 * conv2.out_channels * 10 * 10 * conv2.in_channels * 25
    flops += sum(2 * m.in_features * m.out_features for m in model if isinstance(m, torch.nn.Linear))
    return flops


def block_flops(c_in, c_out, size, padding) -> int:
    conv = size + 2 * padding - 4
    return 2 * c_out * conv * conv * c_in * 25


def saved_bytes_per_sample(step, batch, params) -> float:
    """Bytes of activations autograd keeps for backward in one forward pass, per image.

    Unique storages only; the parameters, which autograd also holds but which
    do not grow with the batch, are left out.
    """
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in param_storages:
            storages[(s.data_ptr(), t.device)] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(saved_only=True)
    return sum(storages.values()) / batch


def measure_peak_gflops(device, args) -> float:
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    median, _ = time_interleaved({"mm": lambda: (torch.mm(a, b), synchronize(device))}, args)["mm"]
    return 2 * n**3 / median / 1e9


# An elementwise kernel (compiled at run time by torch's jiterator) whose
# every element runs FMA_CHAINS independent chains of FMA_STEPS fused
# multiply-adds: the GPU's FP32 FMA rate, which the speed targets are set
# against, rather than cuBLAS's matmul rate. The chains tend to 1 (no
# overflow, no denormals), and the sum keeps the compiler from dropping any.
FMA_CHAINS, FMA_STEPS = 8, 1024
FMA_CODE = """
template <typename T> T fma_chains(T x) {
  T a[CHAINS];
  #pragma unroll
  for (int k = 0; k < CHAINS; ++k) a[k] = x + T(k);
  const T m = T(0.9999), c = T(0.0001);
  #pragma unroll 16
  for (int i = 0; i < STEPS; ++i) {
    #pragma unroll
    for (int k = 0; k < CHAINS; ++k) a[k] = a[k] * m + c;
  }
  T sum = T(0);
  #pragma unroll
  for (int k = 0; k < CHAINS; ++k) sum += a[k];
  return sum;
}
""".replace("CHAINS", str(FMA_CHAINS)).replace("STEPS", str(FMA_STEPS))


def measure_fma_peak_gflops(device, args):
    """The FP32 FMA rate of a CUDA device in GFLOP/s; None on the CPU, or if the kernel cannot be
    built here (the benchmark then reports against the matmul peak alone)."""
    if device.type != "cuda":
        return None
    try:
        fma_chains = torch.cuda.jiterator._create_jit_fn(FMA_CODE)
        x = torch.rand(1 << 22, device=device)
        fma_chains(x)
        median, _ = time_interleaved({"fma": lambda: (fma_chains(x), synchronize(device))}, args)["fma"]
    except (RuntimeError, AttributeError, AssertionError) as e:  # jiterator's errors, or no jiterator
        print(f"bench: no FMA peak on {device}: {e}", file=sys.stderr)
        return None
    return 2 * FMA_CHAINS * FMA_STEPS * x.numel() / median / 1e9


def time_interleaved(steps, args):
    """name -> (median, IQR) in seconds of each step, timed in turn.

    Each step is timed in args.rounds rounds of blocked_autorange, the steps
    taking turns, and its median and IQR are over the blocks of all rounds:
    on a shared machine, a slow spell then lands on every provider alike
    instead of on whichever ran during it. torch.utils.benchmark runs on one
    thread unless told otherwise; every step here runs on args.threads.
    """
    rounds = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            timer = benchmark.Timer("step()", globals={"step": step}, num_threads=args.threads, description=name)
            rounds[name].append(timer.blocked_autorange(min_run_time=args.min_run_time / args.rounds))
    result = {}
    for name, measurements in rounds.items():
        (merged,) = benchmark.Measurement.merge(measurements)  # one task, its blocks from every round
        result[name] = (merged.median, merged.iqr)
    return result


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_providers(device, reference, mode, args):
    """name -> model. Each provider trains its own copy of the reference's weights.

    For CPU inference the peers of peers.py join, when installed.

    Dynamo's caches are cleared first, so that each mode's compile time is
    its own and the many compiled copies never hit the recompile limit (past
    which torch.compile would silently run eager).
    """
    torch._dynamo.reset()

    def copy(build):
        model = build().to(device)
        model.load_state_dict(reference.state_dict())
        return model

    providers = {
        "torch": copy(reference_lenet),
        "torch.compile": torch.compile(copy(reference_lenet)),
        "lenet_ext": copy(LeNet),
        "lenet_ext+compile": torch.compile(copy(LeNet)),
    }
    if device.type == "cuda":
        providers["torch.compile(reduce-overhead)"] = torch.compile(copy(reference_lenet), mode="reduce-overhead")
        providers["lenet_ext+compile(reduce-overhead)"] = torch.compile(copy(LeNet), mode="reduce-overhead")
    if device.type == "cpu" and mode == "inference" and not args.no_peers:
        from peers import peer_providers

        peers, notes = peer_providers(copy(reference_lenet), args.threads)
        providers.update(peers)
        for note in notes:
            print(note, file=sys.stderr)
    return providers


def params_of(model):
    return list(getattr(model, "_orig_mod", model).parameters())


def inference_step(model, x):
    """A forward, to be run under torch.inference_mode() (run_model_rows enters
    it once around the warm-up and the timing, as a serving loop does: entering
    it costs about a microsecond and a half a call on the CPU)."""
    return lambda: model(x)


# A training step's parts, in order (scripts/count_launches.py times each).
TRAINING_STEP_PARTS = ("forward", "loss", "grad", "update")


def training_step(model, x, target, lr=0.01):
    """Forward, cross-entropy, autograd.grad and an SGD update. saved_only
    stops after the forward; mark, when given, is called with each part's
    name as that part ends."""
    params = params_of(model)

    def step(saved_only=False, mark=None):
        out = model(x)
        if saved_only:
            return out
        if mark:
            mark("forward")
        loss = F.cross_entropy(out, target)
        if mark:
            mark("loss")
        grads = torch.autograd.grad(loss, params)
        if mark:
            mark("grad")
        with torch.no_grad():
            torch._foreach_add_(params, grads, alpha=-lr)
        if mark:
            mark("update")
        return out, grads

    return step


def check(name, got, want, what):
    try:
        torch.testing.assert_close(got, want, **CHECK_TOLERANCE)
    except AssertionError as e:
        raise SystemExit(f"bench: {name} does not match the eager reference ({what}):\n{e}")


def check_training(name, model, reference, x, target):
    outs = []
    for m in (model, reference):
        out = m(x)
        grads = torch.autograd.grad(F.cross_entropy(out, target), params_of(m))
        outs.append((out.detach(), grads))
    check(name, outs[0][0], outs[1][0], "training output")
    for g, r in zip(outs[0][1], outs[1][1]):
        check(name, g, r, "gradients")


def run_model_rows(device, mode, batch, providers, reference, flops_per_image, peak, args, progress):
    rows = []
    gen = torch.Generator().manual_seed(batch)
    x = torch.rand(batch, 1, 28, 28, generator=gen).to(device)
    target = torch.randint(0, 10, (batch,), generator=gen).to(device)
    steps, rows_by_name = {}, {}
    mode_context = torch.inference_mode if mode == "inference" else contextlib.nullcontext
    for name, model in providers.items():
        progress.set_description(f"{device.type} {mode} batch {batch} {name}")
        start = time.perf_counter()
        synchronize(device)
        allocated_before_warmup = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        if mode == "inference":
            with torch.inference_mode():
                check(name, model(x), reference(x), "inference output")
            step = inference_step(model, x)
        else:
            # Weights drift as each provider trains; compare it with a reference at its current weights.
            twin = reference_lenet().to(device)
            twin.load_state_dict(getattr(model, "_orig_mod", model).state_dict())
            check_training(name, model, twin, x, target)
            del twin
            step = training_step(model, x, target)
        with mode_context():
            for _ in range(2):  # warm-up (and, for compiled providers, compilation for this shape)
                step()
        synchronize(device)
        row = dict(
            device=device.type, mode=mode, batch=batch, provider=name, warmup_and_compile_s=time.perf_counter() - start
        )
        if mode == "training":
            row["saved_bytes_per_sample"] = saved_bytes_per_sample(step, batch, params_of(model))
            if device.type == "cuda":
                # Step memory: the rise above what was allocated before the step. Peak memory: what
                # the step peaks at with this provider alone, its inputs and weights, what it keeps
                # from its warm-up (a reduce-overhead provider's CUDA-graph pool) and the step memory;
                # the other providers' state, allocated in the same process, is left out.
                synchronize(device)
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                step()
                synchronize(device)
                row["step_memory_bytes"] = torch.cuda.max_memory_allocated(device) - before
                inputs_and_weights = x.nbytes + target.nbytes + sum(p.nbytes for p in params_of(model))
                kept = max(0, before - allocated_before_warmup)
                row["peak_memory_bytes"] = inputs_and_weights + kept + row["step_memory_bytes"]
        steps[name] = lambda step=step: (step(), synchronize(device))
        rows_by_name[name] = row
    progress.set_description(f"{device.type} {mode} batch {batch} timing")
    with mode_context():
        timings = time_interleaved(steps, args)
    for name, (median, iqr) in timings.items():
        row = rows_by_name[name]
        gflops = flops_per_image * (3 if mode == "training" else 1) * batch / median / 1e9
        row.update(median_s=median, iqr_s=iqr, images_per_s=batch / median, gflops=gflops, peak_fraction=gflops / peak)
        rows.append(row)
        progress.update(1)
    return rows


def run_layer_rows(device, batch, peak, args, progress):
    """The fused block against its three ATen ops, forward and forward+backward."""
    rows = []
    for block, (c_in, c_out, size, padding) in LAYER_SHAPES.items():
        gen = torch.Generator().manual_seed(batch)
        x = torch.rand(batch, c_in, size, size, generator=gen).to(device)
        conv = torch.nn.Conv2d(c_in, c_out, 5, padding=padding).to(device)
        fns = {
            "torch": lambda x: F.avg_pool2d(torch.sigmoid(F.conv2d(x, conv.weight, conv.bias, padding=padding)), 2, 2),
            "lenet_ext": lambda x: lenet_ext.ops.conv_sigmoid_avgpool2d(x, conv.weight, conv.bias, padding, 2),
        }
        with torch.no_grad():
            check(f"{block} lenet_ext", fns["lenet_ext"](x), fns["torch"](x), "block output")
        for direction in ("forward", "forward+backward"):
            steps = {}
            mode_context = torch.inference_mode if direction == "forward" else contextlib.nullcontext
            for name, fn in fns.items():
                if direction == "forward":
                    def step(fn=fn):
                        return fn(x)
                else:
                    xg = x.detach().requires_grad_()

                    def step(fn=fn, xg=xg):
                        out = fn(xg)
                        return torch.autograd.grad(out, (xg, conv.weight, conv.bias), torch.ones_like(out))
                with mode_context():
                    step()
                steps[name] = lambda step=step: (step(), synchronize(device))
            progress.set_description(f"{device.type} {block} {direction} batch {batch}")
            flops = block_flops(c_in, c_out, size, padding) * (1 if direction == "forward" else 3)
            with mode_context():
                timings = time_interleaved(steps, args)
            for name, (median, iqr) in timings.items():
                rows.append(dict(
                    device=device.type, mode=f"layer {block} {direction}", batch=batch, provider=name,
                    median_s=median, iqr_s=iqr, images_per_s=batch / median,
                    gflops=flops * batch / median / 1e9, peak_fraction=flops * batch / median / 1e9 / peak,
                ))  # fmt: skip
                progress.update(1)
    return rows


def add_ratios(rows, fma_peaks):
    """Each row's speed-up over eager and, where the run measured one, its fraction of the FMA peak."""
    eager = {(r["device"], r["mode"], r["batch"]): r["median_s"] for r in rows if r["provider"] == "torch"}
    for r in rows:
        r["speedup_vs_eager"] = eager[(r["device"], r["mode"], r["batch"])] / r["median_s"]
        if fma_peaks.get(r["device"]):
            r["fma_peak_fraction"] = r["gflops"] / fma_peaks[r["device"]]


def write_results(output_dir, env, peaks, fma_peaks, rows):
    """results.json with the rows so far: a run stopped part-way keeps what it measured."""
    if not output_dir:
        return
    add_ratios(rows, fma_peaks)
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(dict(environment=env, peak_gflops=peaks, fma_peak_gflops=fma_peaks, rows=rows), f, indent=1)


def markdown_table(rows, peaks, fma_peaks):
    lines = []
    for device in dict.fromkeys(r["device"] for r in rows):
        fma = f"; FP32 FMA peak: {fma_peaks[device]:.1f} GFLOP/s" if fma_peaks.get(device) else ""
        lines.append(f"\n### {device} (float32 matmul peak measured in this run: {peaks[device]:.1f} GFLOP/s{fma})\n")
        lines.append(
            "| mode | batch | provider | images/s | median | IQR | vs eager | GFLOP/s | % of peak "
            "| saved/sample | peak memory | step memory | first 2 calls |"
        )
        lines.append("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in (r for r in rows if r["device"] == device):
            saved = f"{r['saved_bytes_per_sample']:,.0f} B" if "saved_bytes_per_sample" in r else ""
            peak_memory = f"{r['peak_memory_bytes'] / 2**20:,.1f} MiB" if "peak_memory_bytes" in r else ""
            step_memory = f"{r['step_memory_bytes'] / 2**20:,.1f} MiB" if "step_memory_bytes" in r else ""
            first = f"{r['warmup_and_compile_s']:.2f} s" if "warmup_and_compile_s" in r else ""
            lines.append(
                f"| {r['mode']} | {r['batch']} | {r['provider']} | {r['images_per_s']:,.0f} | "
                f"{r['median_s'] * 1e3:.3f} ms | {r['iqr_s'] * 1e3:.3f} ms | {r['speedup_vs_eager']:.2f}x | "
                f"{r['gflops']:.1f} | {100 * r['peak_fraction']:.1f}% | {saved} | {peak_memory} | {step_memory} | {first} |"
            )
    lines.append(
        "\nstep memory: the rise of torch.cuda.max_memory_allocated over a training step on CUDA above what was"
        " allocated before it, the memory the step itself needs. peak memory: what the step peaks at with the"
        " provider alone: the inputs, the weights, what the provider keeps from its warm-up (CUDA-graph pools)"
        " and the step memory."
        "\nfirst 2 calls: the warm-up, including compilation for the compiled providers, excluded from the timings."
    )
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = list(dict.fromkeys((r["device"], r["mode"]) for r in rows if not r["mode"].startswith("layer")))
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (device, mode) in zip(axes[0], panels):
        panel = [r for r in rows if r["device"] == device and r["mode"] == mode]
        for provider in dict.fromkeys(r["provider"] for r in panel):
            pts = sorted((r["batch"], r["images_per_s"]) for r in panel if r["provider"] == provider)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
        batches = sorted({r["batch"] for r in panel})
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])  # the batch sizes run, not powers of two
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("images/s")
        ax.set_title(f"LeNet {mode}, {device}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", help=f"comma-separated (default {','.join(map(str, DEFAULT_BATCHES))})")
    parser.add_argument("--full", action="store_true", help=f"batch sizes {','.join(map(str, FULL_BATCHES))}")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated from: " + ", ".join(MODES))
    parser.add_argument("--devices", help="comma-separated from cpu, cuda (default: cpu, plus cuda when present)")
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds of timing per row (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds the providers of a row take turns in, sharing --min-run-time (default %(default)s)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU threads for every provider (default: torch's, here %(default)s)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile providers")
    parser.add_argument("--no-peers", action="store_true", help="leave out ONNX Runtime and OpenVINO (CPU inference)")
    parser.add_argument("--output-dir", help="write results.json and throughput.png here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        args.batch_sizes = (
            [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes
            else list(FULL_BATCHES if args.full else DEFAULT_BATCHES)
        )  # fmt: skip
    except ValueError:
        parser.error(f"--batch-sizes: expected comma-separated integers, got {args.batch_sizes!r}")
    if min(args.batch_sizes) < 1:
        parser.error("--batch-sizes: batch sizes must be >= 1")
    if args.rounds < 1:
        parser.error(f"--rounds: expected >= 1, got {args.rounds}")
    if args.threads < 1:
        parser.error(f"--threads: expected >= 1, got {args.threads}")
    args.modes = args.modes.split(",")
    if not set(args.modes) <= set(MODES):
        parser.error(f"--modes: expected some of {', '.join(MODES)}, got {','.join(args.modes)}")
    args.devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" in args.devices and not torch.cuda.is_available():
        parser.error("--devices cuda: no CUDA device is visible")
    return args


def main(argv=None):
    from tqdm import tqdm

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # One specialised graph per batch size and provider: the best case for torch.compile.
    torch._dynamo.config.automatic_dynamic_shapes = False
    torch._dynamo.config.cache_size_limit = 64
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    env = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        torch=torch.__version__,
        python=platform.python_version(),
        lenet_ext=lenet_ext.build_info(),
        cpu=cpu_model(),
        gpu=torch.cuda.get_device_name() if "cuda" in args.devices else None,
        threads=args.threads,
        tf32=dict(matmul=torch.backends.cuda.matmul.allow_tf32, cudnn=torch.backends.cudnn.allow_tf32),
        batch_sizes=args.batch_sizes,
        modes=args.modes,
        min_run_time_s=args.min_run_time,
        rounds=args.rounds,
    )
    print(f"lenet_ext benchmark, {env['date']}: torch {env['torch']}, {env['cpu']}, {env['threads']} threads, "
          f"GPU {env['gpu']}, TF32 off")  # fmt: skip

    model_modes = [m for m in args.modes if m != "layer"]
    n_providers = 4 - 2 * args.no_compile
    total = 0
    for device in args.devices:
        per_batch = len(model_modes) * (n_providers + 2 * (device == "cuda" and not args.no_compile))
        per_batch += 8 * ("layer" in args.modes)
        per_batch += 3 * (device == "cpu" and "inference" in args.modes and not args.no_peers)
        total += per_batch * len(args.batch_sizes)
    progress = tqdm(total=total, disable=args.quiet, unit="row", file=sys.stderr)

    rows, peaks, fma_peaks = [], {}, {}
    torch.manual_seed(0)
    for device_name in args.devices:
        device = torch.device(device_name)
        progress.set_description(f"{device_name} matmul peak")
        peaks[device_name] = measure_peak_gflops(device, args)
        fma_peaks[device_name] = measure_fma_peak_gflops(device, args)
        reference = reference_lenet().to(device)
        flops = lenet_forward_flops(reference)
        for mode in model_modes:
            # Fresh compiled models per mode, so that each compile time is its own.
            providers = make_providers(device, reference, mode, args)
            if args.no_compile:
                providers = {k: v for k, v in providers.items() if "compile" not in k}
            for batch in args.batch_sizes:
                rows += run_model_rows(device, mode, batch, providers, reference, flops, peaks[device_name], args, progress)
                write_results(args.output_dir, env, peaks, fma_peaks, rows)
        if "layer" in args.modes:
            for batch in args.batch_sizes:
                rows += run_layer_rows(device, batch, peaks[device_name], args, progress)
                write_results(args.output_dir, env, peaks, fma_peaks, rows)
    progress.close()
    add_ratios(rows, fma_peaks)
    print(markdown_table(rows, peaks, fma_peaks))
    if args.output_dir:
        if plot(rows, os.path.join(args.output_dir, "throughput.png")):
            print(f"\nwrote {args.output_dir}/results.json and {args.output_dir}/throughput.png")
        else:
            print(f"\nwrote {args.output_dir}/results.json")


if __name__ == "__main__":
    main()
