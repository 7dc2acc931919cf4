"""The release path: an sdist of this checkout builds a wheel on its own, without CUDA and without
a compiler (BREGMAN_FUSED_BUILD_CPU=0: the C++ extension is then JIT-built on first use); the
wheel installs into a plain folder and works from there in a fresh process, and its metadata says
what requirements.txt installs.

The sdist and the wheel are built once for the module (about 15 s on 2 cores); the JIT test then
compiles the extension from the sources the wheel ships (about a minute)."""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path

import pytest

import bregman_fused
from bregman_fused import _build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_ENV = {"BREGMAN_FUSED_BUILD_CPU": "0", "BREGMAN_FUSED_BUILD_CUDA": "0"}


def _project_files(dest: Path) -> Path:
    """A copy of the files a release is made from: git's tracked files in a checkout (an untracked
    header is not released: the sdist test then names it), else the tree without build outputs."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
            "*.so", "__pycache__", "*.egg-info", "build", "dist", ".git", ".pytest_cache", ".benchmarks", "_src"))
        return dest
    for name in listed.decode().split("\0"):
        if name and os.path.isfile(os.path.join(ROOT, name)):  # skip files deleted but not yet committed
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), dest / name)
    return dest


def _run(args, **kwargs):
    out = subprocess.run(args, capture_output=True, text=True, timeout=600, **kwargs)
    assert out.returncode == 0, f"{args}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@dataclass
class Release:
    sdist: Path
    wheel: Path
    site: Path  # the wheel installed here with pip install --target


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Release:
    base = tmp_path_factory.mktemp("release")
    tree = _project_files(base / "checkout")
    # the PEP 517 hook that `python -m build --sdist --no-isolation` calls, without needing `build`
    _run([sys.executable, "-c", "import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])",
          str(base / "sdist")], cwd=tree)
    (sdist,) = glob.glob(str(base / "sdist" / "*.tar.gz"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w", str(base / "wheel"),
          sdist], cwd=base, env={**os.environ, **BUILD_ENV})
    (wheel,) = glob.glob(str(base / "wheel" / "*.whl"))
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(base / "site"),
          wheel], cwd=base)
    return Release(Path(sdist), Path(wheel), base / "site")


def _csrc(root: str) -> list[str]:
    return sorted(os.path.relpath(f, root).replace(os.sep, "/") for f in _build.source_files(root))


def test_the_sdist_holds_what_the_build_and_the_readme_need(release):
    with tarfile.open(release.sdist) as tar:
        top = f"bregman_fused-{bregman_fused.__version__}/"
        names = [n[len(top):] for n in tar.getnames() if n.startswith(top)]
    shipped = sorted(n for n in names if n.startswith("csrc/") and n.endswith(_build.SOURCE_SUFFIXES))
    missing = sorted(set(_csrc(ROOT)) - set(shipped))
    assert not missing, f"csrc files missing from the sdist (untracked files are not released: git add them): {missing}"
    assert shipped == _csrc(ROOT)
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "LICENSE", "README.md", "DEVELOPERS.md",
                 "requirements.txt", "docs/design.md", "bregman_fused/py.typed", "bregman_fused/_build.py",
                 "tests/conftest.py", "tests/configs.py"):
        assert name in names, name
    assert not [n for n in names if n.endswith((".so", ".pyc")) or "__pycache__" in n or "/_src/" in n]


def _metadata(wheel: Path) -> tuple[list[str], object]:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        return names, Parser().parsestr(z.read(meta).decode())


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_the_wheel_ships_sources_license_and_py_typed_and_says_what_it_needs(release):
    names, meta = _metadata(release.wheel)
    assert meta["Version"] == bregman_fused.__version__  # one version string, read from __init__.py
    assert meta["License-Expression"] == "BSD-3-Clause"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "bregman_fused/py.typed" in names
    shipped = sorted(n.split("_src/", 1)[1] for n in names if n.startswith("bregman_fused/_src/"))
    assert shipped == _csrc(ROOT)
    assert not any(n.endswith(".so") for n in names)  # BREGMAN_FUSED_BUILD_CPU=0: nothing compiled
    requires = meta.get_all("Requires-Dist")
    core = sorted(_requirement_name(r) for r in requires if "extra ==" not in r)
    assert core == ["ninja", "torch"]  # the optimizers need torch; the JIT fallback needs ninja
    experiments = {_requirement_name(r) for r in requires if 'extra == "experiments"' in r}
    assert {"numpy", "scikit-learn", "tqdm", "matplotlib", "torchvision"} <= experiments
    assert {"pytest", "pytest-benchmark"} <= {_requirement_name(r) for r in requires if 'extra == "test"' in r}


def test_requirements_txt_installs_every_requirement_of_the_package(release):
    _, meta = _metadata(release.wheel)
    declared = {_requirement_name(r) for r in meta.get_all("Requires-Dist")} - {"bregman-fused"}
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        listed = {_requirement_name(line) for line in f if line.strip() and not line.startswith("#")}
    assert declared <= listed, f"in pyproject.toml but not in requirements.txt: {sorted(declared - listed)}"


# The fresh process drops the editable install's finder, so that bregman_fused and its sources can
# come from the installed wheel only (PYTHONPATH = the folder it was installed into).
_USE_INSTALLED = textwrap.dedent("""
    import sys
    sys.meta_path = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
    import torch
    import bregman_fused as bf
    from bregman_fused import _build
    from bregman_fused.backends import loader
    assert bf.__file__.startswith(sys.argv[1]), bf.__file__
    assert _build.source_root().endswith("_src"), _build.source_root()
""")

_IMPORT_SCRIPT = _USE_INSTALLED + textwrap.dedent("""
    assert not loader.cpu_available()  # BREGMAN_FUSED_NO_JIT=1 and nothing compiled
    assert "bregman_fused._C" in loader.cpu_error(), loader.cpu_error()
    p = torch.nn.Parameter(torch.randn(8, 3))
    p.grad = torch.ones_like(p)
    bf.LinBreg([p], lr=0.1, reg=bf.L1(lamda=0.1), backend="reference").step()
    print("IMPORT OK", bf.__version__)
""")


def _run_installed(script: str, release: Release, cwd: Path, **env):
    run_env = {k: v for k, v in os.environ.items() if k != "BREGMAN_FUSED_NO_JIT"}
    run_env.update(PYTHONPATH=str(release.site), **env)
    return subprocess.run([sys.executable, "-c", script, str(release.site)], env=run_env, cwd=cwd,
                          capture_output=True, text=True, timeout=900)


def test_the_installed_wheel_imports_in_a_fresh_process(release, tmp_path):
    out = _run_installed(_IMPORT_SCRIPT, release, tmp_path, BREGMAN_FUSED_NO_JIT="1")
    assert out.returncode == 0 and f"IMPORT OK {bregman_fused.__version__}" in out.stdout, \
        out.stdout[-3000:] + out.stderr[-3000:]


_JIT_SCRIPT = _USE_INSTALLED + textwrap.dedent("""
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
def test_the_installed_wheel_jit_builds_from_the_sources_it_ships(release, tmp_path):
    out = _run_installed(_JIT_SCRIPT, release, tmp_path, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    assert out.returncode == 0 and "JIT OK" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
    assert "bregman_fused: building the C++ extension, about a minute, once" in out.stderr
