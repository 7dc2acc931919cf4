"""Which ISA the CPU extension is built for (bregman_fused/_build.py [note: cpu arch flags]): the
mode's flags, the `cpu_isa` the compiled module reports, and, on a machine with AVX-512, bit-identical
results of the AVX-512 build and an AVX2 build of the same sources (the JIT fallback, built in a
subprocess: about a minute on 2 cores; BREGMAN_FUSED_QUICK=1 skips it)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import bregman_fused as bf
from bregman_fused import _build
from bregman_fused.backends import loader

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("mode, cpu, want", [
    ("auto", _build._AVX512_CPU, _build.AVX512_FLAGS),
    ("", _build._AVX2_CPU | {"avx512f"}, _build.AVX2_FLAGS),  # AVX-512 without bw/vl/dq: AVX2
    ("auto", {"sse4_2"}, []),
    ("avx2", _build._AVX512_CPU, _build.AVX2_FLAGS),
    ("avx512", set(), _build.AVX512_FLAGS),
    ("default", _build._AVX512_CPU, []),
    ("native", _build._AVX512_CPU, ["-march=native", "-DCPU_CAPABILITY_AVX512"]),
    ("Native", _build._AVX2_CPU, ["-march=native", "-DCPU_CAPABILITY_AVX2"]),
    ("native", set(), ["-march=native"]),
])
def test_arch_mode_flags(monkeypatch, mode, cpu, want):
    monkeypatch.setenv("BREGMAN_FUSED_CPU_ARCH", mode)
    monkeypatch.setattr(_build, "_cpu_flags", lambda: set(cpu))
    flags = _build.cpu_arch_flags()
    assert flags == want
    assert _build.cpu_isa(flags) == ("avx512" if "-DCPU_CAPABILITY_AVX512" in want else
                                     "avx2" if "-DCPU_CAPABILITY_AVX2" in want else "default")
    options = _build.cpu_build_options()  # in the build tag: another mode is another tag, hence a rebuild
    monkeypatch.setenv("BREGMAN_FUSED_CPU_ARCH", "default")
    assert (options != _build.cpu_build_options()) == bool(flags)


def test_an_unknown_arch_mode_is_refused(monkeypatch):
    monkeypatch.setenv("BREGMAN_FUSED_CPU_ARCH", "avx10")
    with pytest.raises(ValueError, match="expected auto, avx512, avx2, native or default"):
        _build.cpu_arch_flags()


def _module():
    if not loader.cpu_available():
        pytest.skip(f"C++ CPU extension unavailable: {loader.cpu_error()}")
    return loader._load_cpu().module


def test_the_module_reports_the_isa_of_its_flags():
    module = _module()
    assert module.cpu_isa in ("avx512", "avx2", "default")
    current = _build.build_tag(_build.source_root(), _build.cpu_build_options())
    if not _build.binary_is_current(module.__file__, current):
        pytest.skip("the loaded module was built with other options than this environment's")
    assert module.cpu_isa == _build.cpu_isa(_build.cpu_arch_flags())
    if os.environ.get("BREGMAN_FUSED_CPU_ARCH", "auto") in ("auto", "") and _build._cpu_has_avx512():
        assert module.cpu_isa == "avx512"


# ---- the AVX2 build against the AVX-512 one ------------------------------------------------------
# Shapes whose rows end off the vector steps of both widths (16 and 32 elements), rows longer than
# the row maps' scratch, and 8-bit blocks with a short last one.
SHAPES = [(37, 301), (3, 9001), (20, 30, 5, 7), (129,)]
CASES = [(kind, fmt, reg, dtype) for kind in ("adabreg", "linbreg-momentum") for fmt in ("fp32", "bf16", "8bit")
         for reg in ("l1", "l1pos", "sparse_group") for dtype in ("float32", "bfloat16")]
REGS = {"l1": lambda: bf.L1(0.02), "l1pos": lambda: bf.L1Pos(0.02), "sparse_group": lambda: bf.SparseGroupL1L2(0.01, 0.02)}


def run_cases(steps: int = 3) -> dict[str, list[torch.Tensor]]:
    """Params and states after `steps` steps of every case on backend "cpu", one NaN and inf step included."""
    out = {}
    for kind, fmt, reg, dtype in CASES:
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.5).to(getattr(torch, dtype))) for s in SHAPES]
        r = REGS[reg]()
        opt = (bf.AdaBreg(params, lr=1e-2, reg=r, moments=fmt, backend="cpu") if kind == "adabreg" else
               bf.LinBreg(params, lr=0.1, momentum=0.9, reg=r, moments=fmt, backend="cpu"))
        for k in range(steps):
            for p in params:
                u = torch.rand(p.shape, generator=gen)  # (u·u)·(u·u), not pow: its rounding varies with threads
                g = torch.randn(p.shape, generator=gen) * ((u * u) * (u * u))
                if k == 1:
                    g.view(-1)[7::2999] = float("nan")
                    g.view(-1)[11::4001] = float("inf")
                p.grad = g.to(p.dtype)
            opt.step()
        out["/".join((kind, fmt, reg, dtype))] = [p.detach().clone() for p in params] + [
            v.clone() for p in params for v in opt.state[p].values() if torch.is_tensor(v)]
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The stored bits (NaN payloads included), as integers."""
    return t.view({4: torch.int32, 2: torch.int16, 8: torch.int64, 1: torch.int8}[t.element_size()])


# The subprocess: the JIT fallback, as on a machine without the installed module, with AVX2 flags.
_AVX2_RUN = """
import sys
import torch
from bregman_fused import _build
from bregman_fused.backends import loader
_build.CPU_MODULE = "bregman_fused._not_built_here"
assert loader.cpu_available(), loader.cpu_error()
assert loader._load_cpu().module.cpu_isa == "avx2", loader._load_cpu().module.cpu_isa
torch.set_num_threads(int(sys.argv[2]))
sys.path.insert(0, sys.argv[3])
import test_cpu_isa
torch.save(test_cpu_isa.run_cases(), sys.argv[1])
"""


@pytest.mark.skipif(not _build._cpu_has_avx512(), reason="no AVX-512 on this machine")
@pytest.mark.skipif(os.environ.get("BREGMAN_FUSED_QUICK") == "1", reason="BREGMAN_FUSED_QUICK=1: no extra build")
@pytest.mark.skipif(shutil.which("ninja") is None and not os.path.exists(os.path.join(sys.prefix, "bin", "ninja")),
                    reason="the JIT build needs ninja")
def test_avx2_and_avx512_builds_agree_bit_for_bit(tmp_path):
    module = _module()
    if module.cpu_isa != "avx512":
        pytest.skip(f"the loaded extension is a {module.cpu_isa} build, not the AVX-512 one")
    env = {**os.environ, "BREGMAN_FUSED_CPU_ARCH": "avx2", "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    env.pop("BREGMAN_FUSED_NO_JIT", None)
    saved = tmp_path / "avx2.pt"
    out = subprocess.run([sys.executable, "-c", _AVX2_RUN, str(saved), str(torch.get_num_threads()), HERE], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    theirs, ours = torch.load(saved), run_cases()
    assert theirs.keys() == ours.keys()
    differ = [f"{case}[{i}]" for case in ours for i, (a, b) in enumerate(zip(ours[case], theirs[case]))
              if not torch.equal(_bits(a), _bits(b))]
    assert not differ, f"AVX2 and AVX-512 builds differ in {len(differ)} tensors: {differ[:10]}"
    assert any(t.is_floating_point() and t.isnan().any() for ts in ours.values() for t in ts)  # NaNs compared too
