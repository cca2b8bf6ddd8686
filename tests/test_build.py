"""What the build reports, and how it fails when torch is missing or mismatched."""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import lenet_ext
from lenet_ext import _extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_build_info_describes_this_build():
    info = lenet_ext.build_info()
    assert info["torch_built_against"] == torch.__version__
    assert info["cpu_threads"] == torch.get_num_threads()
    assert info["cpu_kernel"] in ("generic", "baseline", "avx2", "avx512")
    assert lenet_ext.set_cpu_kernel(info["cpu_kernel"]) == info["cpu_kernel"]
    assert (info["cuda_archs"] is not None) == info["cuda_kernels"]
    # The CUDA kernels are registered exactly when the build says so.
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(
        "lenet_ext::conv_sigmoid_avgpool2d", "CUDA"
    )
    assert has_cuda_kernel == info["cuda_kernels"]


def test_info_command():
    out = subprocess.run(
        [sys.executable, "-m", "lenet_ext", "info"], capture_output=True, text=True, check=True
    ).stdout
    assert "torch_built_against" in out and torch.__version__ in out and "cuda_kernels" in out


@pytest.mark.parametrize("variable, value, expected", [
    ("LENET_EXT_CUDA_TILE", "abc", "LENET_EXT_CUDA_TILE=abc: expected auto or a number of images per block from 1 to 64"),
    ("LENET_EXT_CUDA_KERNEL", "fast", "LENET_EXT_CUDA_KERNEL=fast: expected fused or reference"),
    ("LENET_EXT_CPU_KERNEL", "sse", "LENET_EXT_CPU_KERNEL=sse: expected one of"),
])  # fmt: skip
def test_info_command_names_a_bad_variable_without_a_traceback(variable, value, expected):
    result = subprocess.run([sys.executable, "-m", "lenet_ext", "info"], capture_output=True, text=True,
                            env={**os.environ, variable: value})  # fmt: skip
    assert result.returncode == 2
    assert f"python -m lenet_ext info: {expected}" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("record", ["build_info", "binary"])
def test_mismatched_torch_names_both_versions_and_asks_for_a_rebuild(record, monkeypatch):
    """The plain-Python record is read before the binary loads; the binary's own record backs it up."""
    from lenet_ext import _build_info

    target = _build_info if record == "build_info" else lenet_ext._C
    monkeypatch.setattr(target, "TORCH_VERSION" if record == "build_info" else "torch_version", "0.0.0-other")
    expected = rf"built against torch 0\.0\.0-other but torch {re.escape(torch.__version__)} is installed.*\n.*Rebuild"
    with pytest.raises(ImportError, match=expected):
        _extension.load()


def test_build_info_file_records_the_torch_of_the_binary():
    from lenet_ext import _build_info

    assert _build_info.TORCH_VERSION == lenet_ext._C.torch_version == torch.__version__


def test_setup_without_torch_stops_with_instructions():
    # A None entry in sys.modules makes `import torch` fail as if torch were absent.
    script = (
        "import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version'];"
        "exec(compile(open('setup.py').read(), 'setup.py', 'exec'))"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert "needs torch to build" in result.stderr
    assert "pip install --no-build-isolation" in result.stderr


def run_setup_to_its_wheel_check(setuptools_version, wheel_installed, command):
    """setup.py as pip would run `command` with this setuptools, with or without the wheel
    package, cut off after check_wheel_builder (before any build)."""
    source = open(os.path.join(ROOT, "setup.py")).read()
    call = "\ncheck_wheel_builder()\n"
    script = "\n".join([
        "import sys, setuptools",
        f"setuptools.__version__ = {setuptools_version!r}",
        f"sys.modules['wheel'] = {'setuptools' if wheel_installed else 'None'}",  # None: `import wheel` fails
        f"sys.argv = ['setup.py', {command!r}]",
        f"exec(compile({source[: source.index(call) + len(call)]!r}, 'setup.py', 'exec'), {{'__file__': 'setup.py'}})",
    ])  # fmt: skip
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize(
    "setuptools_version, wheel_installed, command, stops",
    [("65.5.0", False, "dist_info", True), ("70.0.0", False, "editable_wheel", True),
     ("65.5.0", True, "dist_info", False), ("70.1.0", False, "bdist_wheel", False),
     ("65.5.0", False, "build_ext", False)],
)  # fmt: skip
def test_setup_with_a_setuptools_that_cannot_build_wheels_stops_with_the_fix(
    setuptools_version, wheel_installed, command, stops
):
    """pip builds a wheel with the setuptools it finds (--no-build-isolation); one older than 70.1
    without the wheel package would only say "invalid command 'bdist_wheel'". build_ext (an
    in-place build) needs no wheel."""
    result = run_setup_to_its_wheel_check(setuptools_version, wheel_installed, command)
    if stops:
        assert result.returncode != 0
        assert f"the setuptools installed here ({setuptools_version})" in result.stderr
        assert 'pip install -U "setuptools>=70.1"' in result.stderr
    else:
        assert result.returncode == 0, result.stderr


def test_setup_with_clang_stops_with_the_fix(tmp_path):
    """The CPU kernels need GCC; a clang CXX is refused before anything compiles."""
    clang = tmp_path / "clang++"
    clang.write_text("#!/bin/sh\necho 'Debian clang version 19.1.7'\n")
    clang.chmod(0o755)
    env = {**os.environ, "CXX": str(clang), "USE_CUDA": "0"}
    result = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT, env=env,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode != 0
    assert "is clang; lenet_ext's CPU kernels need GCC" in result.stderr
    assert "CXX=g++ CC=gcc pip install --no-build-isolation ." in result.stderr


def test_setup_links_the_shared_libstdcxx_when_the_compiler_has_only_the_static_one(tmp_path):
    """A GCC that ships only libstdc++.a would put a second C++ runtime in the extension (its
    error messages then lose their numbers, or crash): setup.py links torch's shared one instead.
    Only a build asks the compiler; reading the package's metadata does not."""
    static = tmp_path / "libstdc++.a"
    static.write_text("")
    gxx = tmp_path / "g++"
    gxx.write_text("#!/bin/sh\n"
                   f'case "$1" in -print-file-name=libstdc++.a) echo {static};; -print-file-name=*) echo "${{1#*=}}";; '
                   "*) echo 'g++ (GCC) 13.3.0';; esac\n")  # fmt: skip
    gxx.chmod(0o755)
    # A copy of setup.py over one small source builds in seconds, beside the project's own build.
    project = tmp_path / "project"
    (project / "csrc").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "setup.py"), project / "setup.py")
    (project / "csrc" / "probe.cpp").write_text("int lenet_ext_probe() { return 0; }\n")
    linking = re.compile(r"has only a static libstdc\+\+\.a; linking torch's shared (\S+) instead")

    def setup(cxx, *command):
        env = {**os.environ, "CXX": cxx, "USE_CUDA": "0"}
        return subprocess.run([sys.executable, "setup.py", *command], cwd=project, env=env,
                              capture_output=True, text=True)  # fmt: skip

    result = setup(str(gxx), "--version")
    assert result.returncode == 0 and not linking.search(result.stderr), result.stderr[-2000:]
    message = linking.search(setup(str(gxx), "build_ext", "--inplace").stderr)  # the stand-in compiles nothing
    assert message and os.path.exists(message[1]) and "libstdc++.so" in os.path.basename(message[1])
    # The machine's own compiler: the same message exactly when it, too, lacks libstdc++.so.
    cxx = os.environ.get("CXX", "c++")

    def has(name):
        path = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
        return os.path.isabs(path) and os.path.exists(path)

    result = setup(cxx, "build_ext", "--inplace")
    assert result.returncode == 0, result.stderr[-2000:]
    static_only = not has("libstdc++.so") and has("libstdc++.a")
    assert bool(linking.search(result.stderr)) == static_only, result.stderr[-2000:]


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")
def test_extension_carries_no_libstdcxx_of_its_own():
    """The built extension uses the process's shared libstdc++: a static copy would define the
    C++ runtime's own functions, std::locale::classic() among them."""
    symbols = subprocess.run(["nm", "-D", "--defined-only", lenet_ext._C.__file__], capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
    assert "_ZNSt6locale7classicEv" not in symbols


def test_cuda_kernel_switch_is_validated():
    """LENET_EXT_CUDA_KERNEL's names, switchable at run time like the CPU kernels (no GPU needed to check)."""
    before = lenet_ext._C.cuda_kernel()
    assert lenet_ext.build_info()["cuda_kernel"] == before and before in ("fused", "reference")
    try:
        for name in ("reference", "fused"):
            lenet_ext._C.set_cuda_kernel(name)
            assert lenet_ext._C.cuda_kernel() == name
        with pytest.raises(ValueError, match="cuda_kernel=bogus: expected fused or reference"):
            lenet_ext._C.set_cuda_kernel("bogus")
        with pytest.raises(TypeError, match="set_cuda_kernel: expected a str"):
            lenet_ext._C.set_cuda_kernel(3)
        assert lenet_ext._C.cuda_kernel() == "fused"
    finally:
        lenet_ext._C.set_cuda_kernel(before)


def test_cuda_tile_request_is_validated():
    """LENET_EXT_CUDA_TILE's values, switchable at run time (no GPU needed to check)."""
    before = lenet_ext._C.cuda_tile()
    assert lenet_ext.build_info()["cuda_tile"] == before
    try:
        for tile in ("1", "16", "64", "auto"):
            lenet_ext._C.set_cuda_tile(tile)
            assert lenet_ext._C.cuda_tile() == tile
        for bad in ("0", "65", "-2", "4x", "four"):
            with pytest.raises(ValueError, match=f"cuda_tile={bad}: expected auto or a number of images per block from 1 to 64"):
                lenet_ext._C.set_cuda_tile(bad)
        with pytest.raises(TypeError, match="set_cuda_tile: expected a str"):
            lenet_ext._C.set_cuda_tile(4)
        assert lenet_ext._C.cuda_tile() == "auto"
    finally:
        lenet_ext._C.set_cuda_tile(before)


def test_package_metadata_has_the_license_without_deprecation(tmp_path):
    """setup.py gives the license in the form the installed setuptools takes (see license_metadata)."""
    run = subprocess.run(
        [sys.executable, "setup.py", "-q", "egg_info", "-e", str(tmp_path)],
        cwd=ROOT, env={**os.environ, "USE_CUDA": "0"}, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "deprecat" not in run.stderr.lower(), run.stderr[-2000:]
    (pkg_info,) = tmp_path.glob("*.egg-info/PKG-INFO")
    assert re.search(r"^License(-Expression)?: BSD-3-Clause$", pkg_info.read_text(), re.M)
