#!/usr/bin/env bash
# Compile-only check of the CUDA backend: every csrc/cuda/*.cu and *.cpp (plus csrc/ops.cpp when it
# exists) is compiled to an object file in a temporary folder, for sm_90 only, with torch's include
# paths and flags. No GPU and no linking: it proves the sources build, nothing more. Runs on a CPU CI
# machine (2 cores: a few minutes). Exits non-zero on any compile error; prints the time it took.
#
# Environment:
#   PYTHON      python with torch installed (default: python3, else python)
#   CUDA_HOME   CUDA toolkit folder (default: the toolkit the `nvcc` on PATH belongs to)
#   JOBS        parallel compiles (default: number of CPUs)
#   WERROR=1    also fail on compiler warnings that point at this repository's files
#   CUDA_ARCH   compute capability to compile for (default: 90)
#   NVCC_EXTRA  extra nvcc flags, e.g. "-Xptxas -v" to see registers and spills
#
# `tools/check_cuda_compile.sh --list` prints the files it would compile (one per line, relative to
# the repository root) and exits; needs neither torch nor nvcc.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
START=$(date +%s)

if [[ "${1:-}" == "--list" ]]; then
  # the same selection as below: _build.cuda_sources (csrc/cuda/*.cpp + *.cu), then csrc/ops.cpp
  "$PYTHON" - "$ROOT" <<'PYEOF'
import importlib.util, os, sys
root = sys.argv[1]
spec = importlib.util.spec_from_file_location("_bregman_build", os.path.join(root, "bregman_fused", "_build.py"))
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)
files = build.cuda_sources(root)
ops_cpp = os.path.join(root, "csrc", "ops.cpp")
if os.path.exists(ops_cpp):
    files.append(ops_cpp)
for f in files:
    print(os.path.relpath(f, root))
PYEOF
  exit 0
fi

# The toolkit nvcc really belongs to (/usr/local/bin/nvcc may be a wrapper script): the same
# detection as setup.py's build, _build.nvcc_toolkit ([note: toolkit from nvcc]).
if [[ -z "${CUDA_HOME:-}" || ! -x "${CUDA_HOME}/bin/nvcc" ]]; then
  CUDA_HOME="$("$PYTHON" - "$ROOT" <<'PYEOF'
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("_bregman_build", os.path.join(sys.argv[1], "bregman_fused", "_build.py"))
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)
print(build.nvcc_toolkit() or "")
PYEOF
)"
  if [[ -z "$CUDA_HOME" ]]; then
    echo "check_cuda_compile: nvcc not found on PATH and CUDA_HOME not set" >&2
    exit 2
  fi
fi
export CUDA_HOME
echo "check_cuda_compile: CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | tail -n1))"

set +e
"$PYTHON" - "$ROOT" <<'PYEOF'
import concurrent.futures as cf
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

root = sys.argv[1]
cuda_home = os.environ["CUDA_HOME"]
arch = os.environ.get("CUDA_ARCH", "90")
werror = os.environ.get("WERROR", "0") == "1"
jobs = int(os.environ.get("JOBS", "0") or 0) or os.cpu_count() or 2

import torch  # noqa: E402
import torch.utils.cpp_extension as cpp_ext  # noqa: E402

spec = importlib.util.spec_from_file_location("_bregman_build", os.path.join(root, "bregman_fused", "_build.py"))
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)


torch_inc = cpp_ext.include_paths()  # cpu variant: no CUDA_HOME guessing
nvidia_inc = build.pip_cuda_include_dirs()  # as setup.py's build does ([note: pip CUDA headers])
cuda_inc = [os.path.join(cuda_home, "include")]
python_inc = [sysconfig.get_paths()["include"]]  # the CUDA module defines its own PyInit
system_inc = [d for d in torch_inc + nvidia_inc + cuda_inc + python_inc if os.path.isdir(d)]
abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
local_inc = [f"-I{d}" for d in build.include_dirs(root)]
sys_flags = [x for d in system_inc for x in ("-isystem", d)]

cuda_module = build.CUDA_MODULE.split(".")[-1]
cpu_module = build.CPU_MODULE.split(".")[-1]
cxx_flags = list(build.CXX_FLAGS)
nvcc_flags = list(build.NVCC_FLAGS)
warn = ["-Wall", "-Wextra", "-Wno-unused-parameter"]

sources = build.cuda_sources(root)
ops_cpp = os.path.join(root, "csrc", "ops.cpp")
jobs_list = []
tmp = tempfile.mkdtemp(prefix="bf_cuda_check_")
for src in sources + ([ops_cpp] if os.path.exists(ops_cpp) else []):
    obj = os.path.join(tmp, os.path.relpath(src, root).replace(os.sep, "_") + ".o")
    module = cpu_module if src == ops_cpp else cuda_module
    defines = ["-DTORCH_API_INCLUDE_EXTENSION_H", f"-DTORCH_EXTENSION_NAME={module}", abi]
    if src.endswith(".cu"):
        cmd = [os.path.join(cuda_home, "bin", "nvcc"), "-c", src, "-o", obj, *nvcc_flags,
               f"-gencode=arch=compute_{arch},code=sm_{arch}", *cpp_ext.COMMON_NVCC_FLAGS,
               "--compiler-options", "-fPIC," + ",".join(warn), *defines, *local_inc, *sys_flags,
               *os.environ.get("NVCC_EXTRA", "").split()]
    else:
        # csrc/ops.cpp belongs to the CPU module: its own flags (ISA flags included) when _build.py has them
        flags = build.cpu_cxx_flags() if src == ops_cpp else cxx_flags
        cmd = [os.environ.get("CXX", "c++"), "-c", src, "-o", obj, *flags, "-fPIC", *warn,
               *defines, *local_inc, *sys_flags]
    jobs_list.append((src, cmd))

if not any(s.endswith(".cu") for s, _ in jobs_list):
    print("check_cuda_compile: no .cu files under csrc/cuda", file=sys.stderr)
    sys.exit(1)


def run(item):
    src, cmd = item
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return src, cmd, proc.returncode, proc.stdout + proc.stderr


failed = 0
warned = 0
with cf.ThreadPoolExecutor(max_workers=jobs) as pool:
    for src, cmd, rc, out in pool.map(run, jobs_list):
        rel = os.path.relpath(src, root)
        ours = [ln for ln in out.splitlines() if re.search(r"warning", ln, re.I) and root in ln]
        status = "FAILED" if rc else ("ok, %d warning(s) in our files" % len(ours) if ours else "ok")
        print(f"  {rel}: {status}")
        if rc or ours or os.environ.get("NVCC_EXTRA"):
            print(out.rstrip())
        if rc:
            print("  command: " + " ".join(cmd))
        failed += rc != 0
        warned += len(ours)
print(f"check_cuda_compile: {len(jobs_list)} file(s), {failed} failed, {warned} warning(s) in repository files")
shutil.rmtree(tmp, ignore_errors=True)  # object files are not kept: this is a compile check only
sys.exit(1 if failed or (werror and warned) else 0)
PYEOF
RC=$?
set -e
echo "check_cuda_compile: took $(( $(date +%s) - START )) s (exit $RC)"
exit $RC
