"""python -m lenet_ext.train, run end to end on tiny inputs."""

import gzip
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lenet_ext import reference_lenet
from lenet_ext import train as train_mod


def write_idx(path, array):
    dtype_code = {np.uint8: 0x08}[array.dtype.type]
    header = bytes([0, 0, dtype_code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def fake_mnist(directory, gz, n_train=96, n_test=32):
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(os.path.join(directory, f"{split}-images-idx3-ubyte{suffix}"), rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(os.path.join(directory, f"{split}-labels-idx1-ubyte{suffix}"), rng.integers(0, 10, (n,), dtype=np.uint8))


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "raw"])
def test_read_idx_round_trip(tmp_path, gz):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = str(tmp_path / ("a.idx" + (".gz" if gz else "")))
    write_idx(path, array)
    np.testing.assert_array_equal(train_mod.read_idx(path), array)


def test_read_idx_rejects_other_files(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        train_mod.read_idx(str(path))


def test_missing_idx_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        train_mod.load_idx_dataset(str(tmp_path))


def test_digits_dataset_is_fixed_and_28x28():
    (x_train, y_train), (x_test, y_test) = train_mod.load_digits_dataset()
    assert x_train.shape == (1500, 1, 28, 28) and x_test.shape == (297, 1, 28, 28)
    assert 0 <= x_train.min() and x_train.max() <= 1
    (x_again, _), _ = train_mod.load_digits_dataset()
    assert torch.equal(x_train, x_again)
    assert set(y_train.tolist()) == set(range(10))


def test_train_end_to_end_with_compare_save_plot_and_load(tmp_path):
    fake_mnist(str(tmp_path), gz=True)
    saved, plot = tmp_path / "lenet.pt", tmp_path / "curves.png"
    args = train_mod.parse_args([
        "--data-dir", str(tmp_path), "--epochs", "2", "--batch-size", "32", "--lr", "0.5",
        "--compare", "--save", str(saved), "--plot", str(plot), "--quiet", "--device", "cpu",
    ])  # fmt: skip
    history = train_mod.train(args)
    assert set(history) == {"lenet_ext", "torch"}
    for h in history.values():
        assert len(h["loss"]) == len(h["test_acc"]) == len(h["images_per_s"]) == 2
    # Same start, same batches: the fused and the reference model train alike.
    np.testing.assert_allclose(history["lenet_ext"]["loss"], history["torch"]["loss"], rtol=1e-4)
    assert plot.stat().st_size > 0
    state = torch.load(saved, weights_only=True)
    reference_lenet().load_state_dict(state, strict=True)

    args = train_mod.parse_args(["--data-dir", str(tmp_path), "--epochs", "0", "--load", str(saved), "--quiet"])
    assert train_mod.train(args)["lenet_ext"]["loss"] == []


def test_train_seed_makes_runs_repeatable(tmp_path):
    fake_mnist(str(tmp_path), gz=False)
    argv = ["--data-dir", str(tmp_path), "--epochs", "1", "--quiet", "--seed", "7", "--device", "cpu"]
    first = train_mod.train(train_mod.parse_args(argv))["lenet_ext"]["loss"]
    second = train_mod.train(train_mod.parse_args(argv))["lenet_ext"]["loss"]
    assert first == second


def test_train_command_line_help_and_errors():
    out = subprocess.run([sys.executable, "-m", "lenet_ext.train", "--help"], capture_output=True, text=True, check=True)
    for flag in ("--lr", "--batch-size", "--epochs", "--data-dir", "--compare", "--plot", "--save", "--load", "--device", "--seed"):
        assert flag in out.stdout
    bad = subprocess.run([sys.executable, "-m", "lenet_ext.train", "--batch-size", "0"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--batch-size" in bad.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data-dir", "{tmp}/absent"], "--data-dir {tmp}/absent: no such directory"),
        (["--data-dir", "{tmp}"], "error: --data-dir {tmp}: no train-images-idx3-ubyte"),
        (["--load", "{tmp}/absent.pt"], "--load {tmp}/absent.pt: no such file"),
    ],
    ids=["no_directory", "no_idx_files", "no_state_dict"],
)
def test_train_command_line_names_missing_files(tmp_path, capsys, argv, message):
    """An error message, not a traceback."""
    with pytest.raises(SystemExit) as exit_info:
        train_mod.main([a.format(tmp=tmp_path) for a in argv] + ["--epochs", "0", "--quiet"])
    assert exit_info.value.code != 0
    assert message.format(tmp=tmp_path) in capsys.readouterr().err + str(exit_info.value.code)


def test_two_gloo_processes_take_the_same_steps_as_one(tmp_path):
    """torchrun --nproc-per-node 2: DDP on gloo reaches the weights one process reaches on the full batch."""
    fake_mnist(str(tmp_path), gz=False, n_train=128, n_test=32)
    argv = ["--data-dir", str(tmp_path), "--epochs", "2", "--batch-size", "32", "--lr", "0.5", "--quiet", "--device", "cpu"]
    single = tmp_path / "single.pt"
    train_mod.train(train_mod.parse_args(argv + ["--save", str(single)]))
    ddp = tmp_path / "ddp.pt"
    # torchrun, from this interpreter's torch (the one on PATH may belong to another environment)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "lenet_ext.train", *argv, "--save", str(ddp)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    if result.returncode != 0 and "terminate called without an active exception" in result.stderr:
        # Seen now and then on this 2-core machine under a loaded test run: a
        # rank aborting in the gloo group's teardown after its work is done.
        # One more launch, so that a repeat of it fails the test.
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("epoch   2") == 1, "rank 0 alone prints"
    assert "2 process(es)" in result.stdout
    got, want = torch.load(ddp, weights_only=True), torch.load(single, weights_only=True)
    assert list(got) == list(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4)
    torch.manual_seed(0)  # the initial weights train() starts from with --seed 0
    initial = train_mod.LeNet()
    initial.apply(train_mod.init_weights)
    assert not torch.allclose(want["0.weight"], initial.state_dict()["0.weight"])  # the runs did train
