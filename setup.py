"""Builds lenet_ext._C with torch.utils.cpp_extension.

Build switches (environment variables):
  USE_CUDA=0             build the CPU kernels only
  FORCE_CUDA=1           build the CUDA kernels, or fail if no toolkit is found
  CUDA_HOME              the CUDA toolkit to use (found automatically otherwise)
  TORCH_CUDA_ARCH_LIST   GPU architectures; with no GPU visible and none given,
                         DEFAULT_CUDA_ARCHS below
  MAX_JOBS               parallel compile jobs
  LENET_EXT_DEBUG=1      -O0 -g, for debugging the kernels
  LENET_EXT_SANITIZE=1   instrument the C++ sources with AddressSanitizer and
                         UndefinedBehaviorSanitizer (run with the sanitizer
                         runtimes preloaded: see .ci/run)
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import setuptools
from setuptools import setup

try:
    import torch
except ImportError:
    sys.exit(
        "lenet_ext is a PyTorch extension and needs torch to build.\n"
        "Install torch first (pip install torch), then build lenet_ext with\n"
        "  pip install --no-build-isolation ."
    )

HERE = os.path.dirname(os.path.abspath(__file__))

# The first setuptools that builds wheels without the wheel package.
WHEEL_BUILDING_SETUPTOOLS = (70, 1)


def check_wheel_builder():
    """pip builds a wheel (dist_info for its metadata, then bdist_wheel or editable_wheel)
    with the setuptools it finds when it runs without build isolation. Before 70.1 that
    needs the wheel package, which a new virtual environment of Python 3.11 or older does
    not have beside its setuptools 65; without it setuptools says only "invalid command
    'bdist_wheel'"."""
    if not {"dist_info", "bdist_wheel", "editable_wheel"} & set(sys.argv[1:]):
        return
    version = tuple(int(part) for part in re.findall(r"\d+", setuptools.__version__)[:2])
    if version >= WHEEL_BUILDING_SETUPTOOLS:
        return
    try:
        import wheel  # noqa: F401
    except ImportError:
        sys.exit(
            f"lenet_ext: pip builds the wheel with the setuptools installed here ({setuptools.__version__}), "
            "which needs the wheel package for it, and that is not installed. Upgrade setuptools first:\n"
            '  pip install -U "setuptools>=70.1"\n'
            "then build again (pip install --no-build-isolation ...)."
        )


check_wheel_builder()

# Used when no GPU is visible and TORCH_CUDA_ARCH_LIST is unset: Ampere (8.0)
# and Hopper (9.0) as machine code, plus PTX of 9.0 that newer GPUs can JIT.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"

def env_flag(name):
    value = os.environ.get(name)
    if value is None:
        return None
    return value.strip().lower() not in ("0", "false", "no", "off", "")


def find_cuda_home():
    """A CUDA toolkit directory holding bin/nvcc and lib64/libcudart, or None.

    A wrapper script on PATH (such as /usr/local/bin/nvcc) fools the guess that
    cpp_extension makes from `which nvcc`, so each candidate is checked for the
    runtime library the link needs.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if not home:
            continue
        has_nvcc = os.path.exists(os.path.join(home, "bin", "nvcc"))
        has_cudart = glob.glob(os.path.join(home, "lib*", "libcudart.so*")) or glob.glob(
            os.path.join(home, "targets", "*", "lib", "libcudart.so*")
        )
        if has_nvcc and has_cudart:
            return home
    return None


def want_cuda():
    use_cuda, force_cuda = env_flag("USE_CUDA"), env_flag("FORCE_CUDA")
    if use_cuda is False:
        return None
    cuda_home = find_cuda_home()
    if force_cuda or use_cuda:
        if cuda_home is None:
            sys.exit("FORCE_CUDA/USE_CUDA is set but no CUDA toolkit (bin/nvcc, libcudart) was found; set CUDA_HOME.")
        if torch.version.cuda is None:
            sys.exit(f"FORCE_CUDA/USE_CUDA is set but torch {torch.__version__} is a CPU-only build.")
        return cuda_home
    if cuda_home is None or torch.version.cuda is None:
        return None
    return cuda_home


CUDA_HOME = want_cuda()
if CUDA_HOME is not None:
    # cpp_extension reads CUDA_HOME when it is first imported.
    os.environ["CUDA_HOME"] = CUDA_HOME
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS

from torch.utils import cpp_extension  # noqa: E402

if CUDA_HOME is not None:
    cpp_extension.CUDA_HOME = CUDA_HOME


def shared_libstdcxx_link_args():
    """The shared libstdc++ that torch runs with, as a link input, when the C++ compiler
    would link its static libstdc++.a instead (a relocated GCC that ships no libstdc++.so).

    A static copy gives the extension a second C++ runtime beside torch's: a std::ostream
    built by torch then looks up its number formatter in the other copy's table of locale
    facets, so formatting an integer into an error message prints nothing or crashes. Named
    before the compiler's own -lstdc++, the shared library resolves every std:: symbol.
    """
    cxx = os.environ.get("CXX", "c++")

    def print_file_name(name):
        try:
            found = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None  # cpp_extension reports a compiler it cannot run
        path = found.stdout.strip()
        return path if os.path.isabs(path) and os.path.exists(path) else None

    if print_file_name("libstdc++.so") or not print_file_name("libstdc++.a"):
        return []
    loaded = set()
    if os.path.exists("/proc/self/maps"):  # importing torch loaded the shared libstdc++
        with open("/proc/self/maps") as maps:
            loaded = {line.split()[-1] for line in maps if "/libstdc++.so" in line}
    if not loaded:
        sys.exit(f"lenet_ext: the C++ compiler ({cxx}) has only a static libstdc++.a, which would give the "
                 "extension a C++ runtime of its own beside torch's, and no shared libstdc++ is loaded to link "
                 "instead. Build with a compiler that has libstdc++.so, e.g. CXX=g++ CC=gcc.")
    libstdcxx = sorted(loaded)[0]
    print(f"lenet_ext: {cxx} has only a static libstdc++.a; linking torch's shared {libstdcxx} instead",
          file=sys.stderr, flush=True)  # fmt: skip
    return [libstdcxx]


def extension():
    debug = env_flag("LENET_EXT_DEBUG")
    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    define_macros = [("LENET_EXT_TORCH_VERSION", f'"{torch.__version__}"')]
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -fopenmp: at::parallel_for is inlined here and runs serially without it.
    extra_compile_args = {"cxx": opt + ["-fopenmp"]}
    extra_link_args = ["-fopenmp"]  # BuildExtension.run adds torch's libstdc++ where the compiler has only a static one
    if env_flag("LENET_EXT_SANITIZE"):
        # Every UB report is an error (no recovery). vptr is left out: it
        # checks the dynamic types of torch's classes, whose type info lives
        # in uninstrumented libraries, and reports false positives there.
        sanitize = ["-fsanitize=address,undefined", "-fno-sanitize=vptr", "-fno-sanitize-recover=all"]
        extra_compile_args["cxx"] += sanitize + ["-fno-omit-frame-pointer", "-g"]
        extra_link_args += sanitize
    builder = cpp_extension.CppExtension
    if CUDA_HOME is not None:
        sources += sorted(glob.glob("csrc/**/*.cu", recursive=True))
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "detected from the visible GPUs")
        define_macros += [("LENET_EXT_WITH_CUDA", None), ("LENET_EXT_CUDA_ARCHS", f'"{archs}"')]
        extra_compile_args["nvcc"] = opt + ["--expt-relaxed-constexpr"] + (["-lineinfo"] if not debug else ["-G"])
        builder = cpp_extension.CUDAExtension
    return builder(
        name="lenet_ext._C",
        sources=sources,
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=extra_link_args,
    )


def check_compiler():
    """Stops with the fix when the C++ compiler is clang: the CPU kernels are written with GCC's
    vector extensions (__builtin_shuffle) and target pragmas, which clang does not take, and its
    errors would not say so."""
    cxx = os.environ.get("CXX", "c++")
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return  # cpp_extension reports a compiler it cannot run
    if "clang" in version.lower():
        sys.exit(f"lenet_ext: the C++ compiler ({cxx}: {version.splitlines()[0]}) is clang; lenet_ext's CPU kernels "
                 "need GCC. Build with it, e.g. CXX=g++ CC=gcc pip install --no-build-isolation .")


class BuildExtension(cpp_extension.BuildExtension):
    """Also writes lenet_ext/_build_info.py: the torch this binary is built
    against, readable without loading the binary, so that a mismatch is
    reported with both versions even when the binary cannot load."""

    def finalize_options(self):
        super().finalize_options()
        # pip builds in a new temporary directory every time; the objects and
        # ninja's log go to one kept beside the sources instead, so that a
        # second install with the same flags (the README's second command)
        # only links. ninja still recompiles whatever source, header or
        # compile command changed.
        self.build_temp = os.path.join(
            HERE, "build", f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
        )

    def run(self):
        check_compiler()
        # Probed here, not when setup.py is read: only a build runs the compiler.
        libstdcxx = shared_libstdcxx_link_args()
        for ext in self.extensions:
            ext.extra_link_args = ext.extra_link_args + libstdcxx
        print("lenet_ext: compiling the C++/CUDA kernels (a few minutes the first time; pip -v shows the compiler)",
              file=sys.stderr, flush=True)  # fmt: skip
        text = (
            "# Written by setup.py when lenet_ext._C is built; read before _C is loaded.\n"
            f"TORCH_VERSION = {torch.__version__!r}\n"
        )
        # The source tree serves in-place and editable builds, build_lib a wheel.
        for root in {HERE, self.build_lib}:
            os.makedirs(os.path.join(root, "lenet_ext"), exist_ok=True)
            with open(os.path.join(root, "lenet_ext", "_build_info.py"), "w") as f:
                f.write(text)
        super().run()


def license_metadata():
    """BSD-3-Clause as an SPDX license expression where setuptools takes one
    (77 and later: the older TOML-table form is deprecated there), and as the
    License field for an older setuptools, which a --no-build-isolation build
    uses as it finds it."""
    major = int(setuptools.__version__.split(".")[0])
    return {"license_expression": "BSD-3-Clause"} if major >= 77 else {"license": "BSD-3-Clause"}


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    **license_metadata(),
)
