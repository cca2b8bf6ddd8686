"""lenet_ext.get_output_size and lenet_ext.summary: the chapter's shape arithmetic and table."""

import subprocess
import sys

import numpy as np
import pytest

import lenet_ext
from lenet_ext import LeNet

from conftest import REFERENCE_TABLE, d2l_net


def test_get_output_size_reproduces_the_chapter():
    assert lenet_ext.get_output_size((28, 28), (5, 5), (2 * 2, 2 * 2), (1, 1)) == (28, 28)
    assert lenet_ext.get_output_size((28, 28), (2, 2), (0, 0), (2, 2)) == (14, 14)
    assert lenet_ext.get_output_size(14, 5, 0, 1) == (10, 10)
    assert lenet_ext.get_output_size((11, 9), (2, 2), (0, 0), (2, 2)) == (5, 4)
    # Any integer type, as torch's sizes take them.
    assert lenet_ext.get_output_size(np.int64(28), (np.int32(5), 5), 4, 1) == (28, 28)


def test_get_output_size_rejects_bad_sizes():
    with pytest.raises(ValueError, match="slide_size >= 1"):
        lenet_ext.get_output_size((28, 28), (5, 5), (0, 0), (0, 1))
    with pytest.raises(ValueError, match="does not fit"):
        lenet_ext.get_output_size((3, 3), (5, 5), (0, 0), (1, 1))
    with pytest.raises(TypeError, match="kernel_size"):
        lenet_ext.get_output_size((28, 28), "5", (0, 0), (1, 1))
    for bad in (True, (5, 5, 5), (5, 5.0), 5.0):
        with pytest.raises(TypeError, match="kernel_size"):
            lenet_ext.get_output_size((28, 28), bad, (0, 0), (1, 1))


def test_summary_prints_the_table_with_parameter_counts():
    lines = []
    total = lenet_ext.summary(LeNet(), print_fn=lines.append)
    assert total == sum(p.numel() for p in d2l_net().parameters()) == 61706
    table = [line.split("\t params: ")[0] for line in lines[:-1]]
    assert "\n".join(table) + "\n" == REFERENCE_TABLE
    assert lines[0].endswith("params: 156") and lines[7].endswith("params: 48120")
    assert lines[-1] == "Total params: 61706"


def test_summary_command():
    out = subprocess.run(
        [sys.executable, "-m", "lenet_ext", "summary"], capture_output=True, text=True, check=True
    ).stdout
    assert "Conv2d output shape: \t torch.Size([1, 6, 28, 28])" in out
    assert "Total params: 61706" in out
