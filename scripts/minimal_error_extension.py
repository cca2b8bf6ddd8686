"""Builds a minimal torch extension that raises c10::ValueError with an integer in its message, as
lenet_ext's argument checks do, and calls it: once as a function of the module and once as an
operator through torch.ops, as lenet_ext's operators are called. Whether this compiler and this
torch raise such an error at all, apart from lenet_ext's code.

    python scripts/minimal_error_extension.py [BUILD_DIR]

Prints what each call raised and exits 0 when both raised a Python exception; a crash of the
process is the answer too. About 40 s: one translation unit with torch/extension.h.
"""

import os
import sys
import tempfile

import torch
from torch.utils.cpp_extension import load_inline

SOURCE = r"""
#include <torch/extension.h>

void raise_value_error(int64_t pool) { TORCH_CHECK_VALUE(pool >= 1, "expected pool >= 1, got ", pool); }

at::Tensor check_pool(const at::Tensor& x, int64_t pool) {
  TORCH_CHECK_VALUE(pool >= 1, "expected pool >= 1, got ", pool, " for x of shape ", x.sizes());
  return x;
}

TORCH_LIBRARY(minimal_error, m) { m.def("check_pool(Tensor x, int pool) -> Tensor"); }
TORCH_LIBRARY_IMPL(minimal_error, CompositeExplicitAutograd, m) { m.impl("check_pool", &check_pool); }
"""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    build_dir = argv[0] if argv else tempfile.mkdtemp(prefix="minimal_error_")
    os.makedirs(build_dir, exist_ok=True)
    module = load_inline("minimal_error", SOURCE, functions=["raise_value_error"], build_directory=build_dir,
                         extra_cflags=["-O3"])  # fmt: skip
    raised = 0
    for name, call in (("module function", lambda: module.raise_value_error(0)),
                       ("operator", lambda: torch.ops.minimal_error.check_pool(torch.zeros(2, 3), 0))):  # fmt: skip
        try:
            call()
            print(f"{name}: raised nothing")
        except Exception as e:  # noqa: BLE001 - which exception it became is part of the answer
            raised += 1
            print(f"{name}: {type(e).__name__}: {str(e).splitlines()[0]}")
    return 0 if raised == 2 else 1


if __name__ == "__main__":
    sys.exit(main())
