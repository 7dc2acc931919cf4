"""Packaging and loading of the compiled extension: the sources ship with the package, a binary
built from other sources than the csrc/ beside it is noticed before import, and the JIT fallback
builds from the packaged sources of a regular (non-editable) install."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

from bregman_fused import _build
from bregman_fused.backends import loader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_source_hash_follows_the_sources(tmp_path):
    shutil.copytree(os.path.join(ROOT, "csrc"), tmp_path / "csrc")
    before = _build.source_hash(str(tmp_path))
    assert before == _build.source_hash(ROOT)
    with open(tmp_path / "csrc" / "bregman_math.h", "a") as f:
        f.write("\n// an edit\n")
    assert _build.source_hash(str(tmp_path)) != before
    assert _build.source_hash(str(tmp_path / "nothing here")) is None


def test_binary_without_a_digest_reads_as_none(tmp_path):
    blob = tmp_path / "x.so"
    blob.write_bytes(b"\0ELF no marker here\0")
    assert _build.built_source_hash(str(blob)) is None
    blob.write_bytes(b"\0junk" + _build.SOURCE_HASH_MARKER + b"\0" + _build.SOURCE_HASH_MARKER + b"habc123\0more")
    assert _build.built_source_hash(str(blob)) == "habc123"  # a bare marker before the marked digest


@pytest.mark.skipif(not loader.cpu_available(), reason="the C++ extension is not built here")
def test_loaded_extension_was_built_from_these_sources():
    module = loader._load_cpu().module
    assert module.source_hash == _build.source_hash(_build.source_root())
    assert _build.built_source_hash(module.__file__) == module.source_hash


def test_a_stale_extension_is_not_imported(monkeypatch):
    import importlib.util

    spec = importlib.util.find_spec(_build.CPU_MODULE)
    if spec is None or not spec.origin:
        pytest.skip("no installed C++ extension to be stale")
    imported = []
    real_import = loader.importlib.import_module
    monkeypatch.setattr(loader.importlib, "import_module",
                        lambda name, *a, **k: imported.append(name) or real_import(name, *a, **k))
    monkeypatch.setattr(_build, "source_hash", lambda root: "hedited")
    monkeypatch.setattr(loader, "_cpu", None)
    monkeypatch.setenv("BREGMAN_FUSED_NO_JIT", "1")
    assert not loader.cpu_available()
    assert "changed since the install" in loader.cpu_error() and "pip install" in loader.cpu_error()
    assert _build.CPU_MODULE not in imported


# One subprocess: build a wheel without the compiled module, install it into a folder, and use it
# from there with the editable install's finder removed, so the package and its sources come from
# the wheel only. First use JIT-builds the extension from bregman_fused/_src/csrc (~20 s on 2 cores).
_JIT_SCRIPT = textwrap.dedent("""
    import sys
    sys.meta_path = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
    import torch
    import bregman_fused as bf
    from bregman_fused import _build
    from bregman_fused.backends import loader
    assert bf.__file__.startswith(sys.argv[1]), bf.__file__
    assert _build.source_root().endswith("_src"), _build.source_root()
    assert loader.cpu_available(), loader.cpu_error()
    assert loader._load_cpu().module.__name__ == "bregman_fused_cpu"
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(37, 5)) for _ in range(2)]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    fused = bf.AdaBreg(ps, lr=1e-2, reg=bf.GroupL1L2(lamda=0.05), backend="cpu")
    ref = bf.AdaBreg(qs, lr=1e-2, reg=bf.GroupL1L2(lamda=0.05), backend="reference")
    for _ in range(4):
        for p, q in zip(ps, qs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        fused.step()
        ref.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    print("JIT OK")
""")


@pytest.mark.skipif(shutil.which("ninja") is None and not glob.glob(os.path.join(sys.prefix, "bin", "ninja")),
                    reason="the JIT build needs ninja")
def test_wheel_ships_the_sources_and_jit_builds_from_them(tmp_path):
    env = {**os.environ, "BREGMAN_FUSED_BUILD_CPU": "0", "BREGMAN_FUSED_BUILD_CUDA": "0"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w",
                    str(tmp_path / "wheel"), ROOT], check=True, env=env, capture_output=True)
    (wheel,) = glob.glob(str(tmp_path / "wheel" / "*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(n.split("_src/", 1)[1] for n in names if n.startswith("bregman_fused/_src/"))
    assert shipped == sorted(os.path.relpath(f, ROOT) for f in _build.source_files(ROOT))
    assert not any(n.endswith(".so") for n in names)  # BREGMAN_FUSED_BUILD_CPU=0: nothing compiled
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target",
                    str(target), wheel], check=True, capture_output=True)
    run_env = {**os.environ, "PYTHONPATH": str(target), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    run_env.pop("BREGMAN_FUSED_NO_JIT", None)
    out = subprocess.run([sys.executable, "-c", _JIT_SCRIPT, str(target)], env=run_env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0 and "JIT OK" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]


# setup.py's build with the CUDA extension on a machine with nvcc (CI has one, and no GPU): the
# sources compile and link for sm_90 and the module registers the CUDA kernels for the schemas of the
# CPU module built beside it. CUDA_HOME is left unset on purpose: the build must find the toolkit
# from nvcc ([note: toolkit from nvcc]) and pip's CUDA headers ([note: pip CUDA headers]) itself.
# About 1.5 minutes on 2 cores.
_CUDA_LOAD_SCRIPT = textwrap.dedent("""
    import sys
    sys.meta_path = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
    import torch
    import bregman_fused
    from bregman_fused.backends import loader
    assert bregman_fused.__file__.startswith(sys.argv[1]), bregman_fused.__file__
    assert loader.cuda_available(), loader.cuda_error()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("bregman_fused::fused_step", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("bregman_fused::fused_step_capturable", "CUDA")
    print("CUDA MODULE OK")
""")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc on PATH (a CUDA toolkit)")
def test_setup_py_builds_the_cuda_extension(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(os.path.join(ROOT, name), tree / name)
    shutil.copytree(os.path.join(ROOT, "csrc"), tree / "csrc")
    shutil.copytree(os.path.join(ROOT, "bregman_fused"), tree / "bregman_fused",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", "_src"))
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    env.update(BREGMAN_FUSED_BUILD_CUDA="1", TORCH_CUDA_ARCH_LIST="9.0",
               MAX_JOBS=str(os.cpu_count() or 2))
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, env=env,
                           capture_output=True, text=True, timeout=1200)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert glob.glob(str(tree / "bregman_fused" / "_C_cuda*.so"))
    run_env = {**os.environ, "PYTHONPATH": str(tree), "BREGMAN_FUSED_NO_JIT": "1"}
    out = subprocess.run([sys.executable, "-c", _CUDA_LOAD_SCRIPT, str(tree)], env=run_env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "CUDA MODULE OK" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
