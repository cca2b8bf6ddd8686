"""Loads the compiled extension and reports how it was built."""

import torch

_REBUILD = (
    "Rebuild lenet_ext against the torch you run, from its source directory:\n"
    "  pip install --no-build-isolation --force-reinstall --no-deps ."
)


def load():
    try:
        from . import _C
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}._C":
            raise
        raise ImportError(
            "lenet_ext's compiled extension (lenet_ext._C) is missing: the package was not built.\n"
            "Install it with: pip install --no-build-isolation ."
        ) from e
    except ImportError as e:
        # Typically "undefined symbol": the binary belongs to another torch.
        raise ImportError(
            f"lenet_ext's compiled extension failed to load with torch {torch.__version__}; "
            f"it was most likely built against a different torch.\n{_REBUILD}\n(loader error: {e})"
        ) from e
    if _C.torch_version != torch.__version__:
        raise ImportError(
            f"lenet_ext was built against torch {_C.torch_version} but torch {torch.__version__} "
            f"is installed.\n{_REBUILD}"
        )
    return _C
