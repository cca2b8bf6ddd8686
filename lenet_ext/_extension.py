"""Loads the compiled extension, after checking that it was built for the torch in use."""

import torch

_REBUILD = (
    "Rebuild lenet_ext against the torch you run, from its source directory:\n"
    "  pip install --no-build-isolation --force-reinstall --no-deps ."
)
_NOT_BUILT = (
    "lenet_ext's compiled extension (lenet_ext._C) is missing: the package was not built.\n"
    "Install it with: pip install --no-build-isolation ."
)


def _mismatch(built_against):
    return ImportError(
        f"lenet_ext was built against torch {built_against} but torch {torch.__version__} is installed.\n{_REBUILD}"
    )


def load():
    # The build's facts come from a plain Python file first, so that a binary
    # built for another torch, which may not even load, is named as such.
    try:
        from ._build_info import TORCH_VERSION
    except ImportError as e:
        raise ImportError(_NOT_BUILT) from e
    if TORCH_VERSION != torch.__version__:
        raise _mismatch(TORCH_VERSION)
    try:
        from . import _C
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}._C":
            raise
        raise ImportError(_NOT_BUILT) from e
    except ImportError as e:
        # Typically "undefined symbol": a binary left from another build.
        raise ImportError(
            f"lenet_ext's compiled extension failed to load with torch {torch.__version__}.\n{_REBUILD}\n"
            f"(loader error: {e})"
        ) from e
    # The binary itself records its torch too: a _build_info.py left over
    # from another build must not hide a mismatch.
    if _C.torch_version != torch.__version__:
        raise _mismatch(_C.torch_version)
    return _C
