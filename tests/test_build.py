"""Building and loading the compiled extension: the build tag (sources, torch, options) a binary
carries, a binary built from other sources or for another torch noticed before import, the JIT
fallback's announcement and error, setup.py skipping a build whose binary is current, and the CUDA
build. The sdist/wheel/install path is in test_packaging.py."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import textwrap

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


def test_build_tag_names_the_sources_the_torch_and_the_options(monkeypatch):
    tag = _build.build_tag(ROOT, ["-O3", "CXX=g++"])
    parsed = _build.parse_tag(tag)
    assert parsed == (_build.source_hash(ROOT), torch.__version__, _build.options_digest(["-O3", "CXX=g++"]))
    assert tag.isalnum()  # one bare -D token, one identifier in C
    assert _build.parse_tag(_build.build_tag(ROOT, ["-O2", "CXX=g++"])).options != parsed.options
    monkeypatch.setattr(torch, "__version__", "2.4.0.dev20240101+cpu")
    assert _build.parse_tag(_build.build_tag(ROOT, [])).torch == "2.4.0.dev20240101+cpu"
    assert _build.parse_tag("habc123") == ("habc123", None, None)  # a binary from before the torch check
    for junk in ("", "nonsense", "habc123t4", "abc"):  # odd hex: no version; no leading h: no tag
        assert _build.parse_tag(junk) in (None, ("habc123", None, None))


def _fake_binary(path, tag):
    path.write_bytes(b"\0ELF" + _build.SOURCE_HASH_MARKER + b"\0" + _build.SOURCE_HASH_MARKER + tag.encode() + b"\0")


def test_a_binary_is_current_only_for_the_same_sources_torch_and_options(tmp_path, monkeypatch):
    binary = tmp_path / "x.so"
    tag = _build.build_tag(ROOT, ["-O3"])
    assert not _build.binary_is_current(str(binary), tag)  # no file
    _fake_binary(binary, tag)
    assert _build.binary_is_current(str(binary), tag)
    assert not _build.binary_is_current(str(binary), _build.build_tag(ROOT, ["-O2"]))
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert not _build.binary_is_current(str(binary), _build.build_tag(ROOT, ["-O3"]))
    _fake_binary(binary, _build.source_hash(ROOT))  # no torch recorded: never taken as current
    assert not _build.binary_is_current(str(binary), _build.source_hash(ROOT))


@pytest.mark.skipif(not loader.cpu_available(), reason="the C++ extension is not built here")
def test_loaded_extension_was_built_from_these_sources_for_this_torch():
    module = loader._load_cpu().module
    tag = _build.parse_tag(module.source_hash)
    assert tag.source == _build.source_hash(_build.source_root())
    assert tag.torch == torch.__version__
    assert _build.built_tag(module.__file__) == tag


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


def _installed_cpu_module():
    import importlib.util

    spec = importlib.util.find_spec(_build.CPU_MODULE)
    if spec is None or not spec.origin or _build.built_tag(spec.origin) is None:
        pytest.skip("no installed C++ extension with a build tag")
    return spec.origin


def test_an_extension_built_for_another_torch_is_not_imported(monkeypatch):
    origin = _installed_cpu_module()
    built_for = _build.built_tag(origin).torch
    imported = []
    real_import = loader.importlib.import_module
    monkeypatch.setattr(loader.importlib, "import_module",
                        lambda name, *a, **k: imported.append(name) or real_import(name, *a, **k))
    monkeypatch.setattr(_build, "torch_version", lambda: "2.99.0+cpu")  # the torch "running" now
    monkeypatch.setattr(loader, "_cpu", None)
    monkeypatch.setenv("BREGMAN_FUSED_NO_JIT", "1")
    assert not loader.cpu_available()
    err = loader.cpu_error()
    assert f"built for torch {built_for}, but torch 2.99.0+cpu is running" in err, err
    assert "pip install --no-build-isolation -e ." in err
    assert _build.CPU_MODULE not in imported


def test_an_extension_that_records_no_torch_is_not_imported(monkeypatch):
    origin = _installed_cpu_module()
    monkeypatch.setattr(_build, "built_tag", lambda path: _build.BuildTag(_build.source_hash(_build.source_root()),
                                                                          None, None))
    monkeypatch.setattr(loader, "_cpu", None)
    monkeypatch.setenv("BREGMAN_FUSED_NO_JIT", "1")
    assert not loader.cpu_available()
    assert f"{origin} was built for a torch it does not record" in loader.cpu_error()


def test_a_torch_mismatch_falls_back_to_the_jit_build_with_a_warning(monkeypatch):
    _installed_cpu_module()
    if not loader.cpu_available():  # the ops must be registered for the stand-in JIT module below
        pytest.skip(f"the C++ extension does not load here: {loader.cpu_error()}")
    jit_module = object()
    monkeypatch.setattr(loader, "_jit_build", lambda: jit_module)
    monkeypatch.setattr(_build, "torch_version", lambda: "2.99.0+cpu")
    monkeypatch.setattr(loader, "_cpu", None)
    monkeypatch.delenv("BREGMAN_FUSED_NO_JIT", raising=False)
    with pytest.warns(RuntimeWarning, match=r"using a JIT build .*built for torch .*2\.99\.0\+cpu is running"):
        assert loader.cpu_available()
    assert loader._load_cpu().module is jit_module


# torch's message when ninja fails: every command echoed in full (~1,000 characters each) before the
# compiler's or the shell's own words
_COMMAND = ("c++ -MMD -MF ops.o.d -DTORCH_EXTENSION_NAME=bregman_fused_cpu -DTORCH_API_INCLUDE_EXTENSION_H "
            + " ".join(f"-isystem /site-packages/torch/include/part{i}" for i in range(20))
            + " -fPIC -std=c++20 -O3 -ffp-contract=off -fopenmp -mavx2 -mfma -mf16c -c /src/csrc/ops.cpp -o ops.o")
_NINJA_FAILURE = (f"Error building extension 'bregman_fused_cpu': [1/7] {_COMMAND}\nFAILED: [code=127] ops.o \n"
                  f"{_COMMAND}\n/bin/sh: 1: c++: not found\nninja: build stopped: subcommand failed.\n")


def _jit_path_only(monkeypatch, tmp_path, load):
    """Loader state as on a machine without the compiled module; torch's load replaced by `load`."""
    import torch.utils.cpp_extension

    monkeypatch.setattr(_build, "CPU_MODULE", "bregman_fused._not_built_here")
    monkeypatch.setattr(torch.utils.cpp_extension, "load", load)
    monkeypatch.setattr(loader, "_cpu", None)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.delenv("BREGMAN_FUSED_NO_JIT", raising=False)


def test_a_failed_jit_build_says_so_beforehand_and_names_the_cause_first(monkeypatch, tmp_path, capsys):
    def failing_load(**kwargs):
        raise RuntimeError(_NINJA_FAILURE)

    _jit_path_only(monkeypatch, tmp_path, failing_load)
    assert len(_COMMAND) > 1000
    assert not loader.cpu_available()
    announced = capsys.readouterr().err
    assert "bregman_fused: building the C++ extension, about a minute, once" in announced
    err = loader.cpu_error()
    assert err.startswith("JIT build failed: /bin/sh: 1: c++: not found;"), err[:300]
    assert "import bregman_fused._not_built_here failed" in err and _COMMAND in err  # the rest follows


def test_a_compiler_error_leads_the_jit_error():
    output = (f"Error building extension 'x': [1/2] {_COMMAND}\nFAILED: ops.o\n{_COMMAND}\nIn file included from "
              "/src/csrc/ops.cpp:3:\n/src/csrc/op_checks.h:12:10: fatal error: missing.h: No such file or directory\n"
              "   12 | #include <missing.h>\ncompilation terminated.\nninja: build stopped: subcommand failed.\n")
    cause = "/src/csrc/op_checks.h:12:10: fatal error: missing.h: No such file or directory"
    assert loader._failure_cause(output) == cause
    no_ninja = "Ninja is required to load C++ extensions"
    assert loader._failure_cause(no_ninja) == no_ninja
    assert loader._failure_cause("something odd\nlast words") == "last words"


def test_a_cached_jit_build_is_not_announced(monkeypatch, tmp_path, capsys):
    calls = []
    _jit_path_only(monkeypatch, tmp_path, lambda **kwargs: calls.append(kwargs) or object())
    loader.cpu_available()  # the first time: announced
    assert "building the C++ extension" in capsys.readouterr().err
    build_dir = loader._jit_build_dir()
    assert build_dir == str(tmp_path / "ext" / loader.JIT_NAME)
    (tmp_path / "ext" / loader.JIT_NAME / f"{loader.JIT_NAME}.so").write_bytes(b"")  # what a finished build leaves
    (tmp_path / "ext" / loader.JIT_NAME / "build.ninja").write_text(
        " ".join(calls[0]["sources"] + calls[0]["extra_cflags"]))
    monkeypatch.setattr(loader, "_cpu", None)
    loader.cpu_available()
    assert "building the C++ extension" not in capsys.readouterr().err
    assert len(calls) == 2  # load() still runs: it imports the cached build


def _copy_tree(tree):
    """setup.py's view of this checkout, without built binaries."""
    tree.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        shutil.copy(os.path.join(ROOT, name), tree / name)
    shutil.copytree(os.path.join(ROOT, "csrc"), tree / "csrc")
    shutil.copytree(os.path.join(ROOT, "bregman_fused"), tree / "bregman_fused",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", "_src"))


def test_setup_py_does_not_rebuild_a_current_extension(tmp_path):
    """[note: incremental build]: a binary in the package folder that carries the tag this build would
    compile in is reused (here a stand-in file: were it compiled, the test would take a minute and
    the file would change)."""
    import sysconfig

    tree = tmp_path / "tree"
    _copy_tree(tree)
    binary = tree / "bregman_fused" / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    _fake_binary(binary, _build.build_tag(str(tree), _build.cpu_build_options()))
    before = binary.read_bytes()
    env = {**os.environ, "BREGMAN_FUSED_BUILD_CUDA": "0"}
    out = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "not rebuilt" in out.stdout and "-DBREGMAN_FUSED_SOURCE_HASH" not in out.stdout + out.stderr
    assert binary.read_bytes() == before


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
    _copy_tree(tree)
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


def test_the_gpu_sessions_availability_check_runs():
    # tools/gpu_session.sh's build stage ends with a Python check; run it here (no GPU: it must
    # say why each backend is unavailable, not fail), so a renamed import is noticed before a GPU
    # session spends its minutes on it
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = open(os.path.join(root, "tools", "gpu_session.sh")).read()
    snippet = script.split("\"$PY\" - <<'EOF'", 1)[1].split("\n", 1)[1].split("\nEOF\n", 1)[0]
    out = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, cwd=root, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "cuda on cuda:" in out.stdout and "triton on cuda:" in out.stdout


@pytest.mark.parametrize("switch", ["BREGMAN_FUSED_BUILD_CPU", "BREGMAN_FUSED_BUILD_CUDA"])
def test_a_build_switch_other_than_0_or_1_is_refused(switch):
    # "false" used to build the CPU extension all the same; "true" meant "auto" for CUDA
    env = {**os.environ, "BREGMAN_FUSED_BUILD_CPU": "0", "BREGMAN_FUSED_BUILD_CUDA": "0", switch: "false"}
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0
    assert f"{switch}='false': expected 1 (on) or 0 (off)" in out.stderr
