"""What the benchmark writes: the printed table, the CSV (its columns and how rows are appended),
and the facts about the machine that every row carries."""
from __future__ import annotations

import csv
import os
import platform
import re
import subprocess

import torch

from cases import bf

CSV_COLUMNS = [
    "date_utc", "machine", "cpu_model", "cpu_cores", "torch_threads", "gpu_name", "torch_version",
    "triton_version", "bregman_fused_version", "git_commit",
    "provider", "optimizer", "reg", "workload", "n_tensors", "numel", "dtype", "state_dtype", "device",
    "bytes_per_elt", "warmup", "reps", "loadavg_1m", "median_ms", "p20_ms", "p80_ms", "gb_s", "copy_gb_s",
    "pct_of_copy", "speedup_vs_research", "time_vs_anchor", "setup_s", "status", "note",
    # CUDA only: the step's GPU time with its host work hidden, and the host time of the call;
    # `timing` says which time gb_s, pct_of_copy and the ratios use ("device" on CUDA, else "wall")
    "timing", "device_ms", "device_p20_ms", "device_p80_ms", "host_ms",
]

TABLE = [("provider", 18), ("optimizer", 16), ("workload", 22), ("dtype", 5), ("B/elt", 5), ("reps", 4),
         ("median ms", 10), ("p20 ms", 10), ("p80 ms", 10), ("device ms", 10), ("host ms", 8), ("GB/s", 7),
         ("% copy", 6), ("speed-up", 8),
         ("vs torch", 8), ("note", 0)]


def format_row(r: dict) -> str:
    vals = [r["provider"], r["optimizer"], r["workload"], r["dtype"], str(r["bytes_per_elt"]), str(r.get("reps", "")),
            r.get("median_ms", ""), r.get("p20_ms", ""), r.get("p80_ms", ""), r.get("device_ms", ""),
            r.get("host_ms", ""), r.get("gb_s", ""),
            r.get("pct_of_copy", ""), (r["speedup_vs_research"] + "x") if r.get("speedup_vs_research") else "",
            (r["time_vs_anchor"] + "x") if r.get("time_vs_anchor") else "",
            (r["status"] + ": " if r["status"] != "ok" else "") + r.get("note", "")]
    out = []
    for (name, width), v in zip(TABLE, vals):
        if width == 0:
            out.append(v[:160])
        elif name in ("provider", "optimizer", "workload", "dtype"):
            out.append(f"{v:<{width}}")
        else:
            out.append(f"{v:>{width}}")
    return "  ".join(out)


def table_header() -> str:
    return "  ".join(f"{n:<{w}}" if n in ("provider", "optimizer", "workload", "dtype") else (f"{n:>{w}}" if w else n)
                     for n, w in TABLE)


def write_csv(path: str, rows: list[dict], columns: list[str] = CSV_COLUMNS) -> None:
    """Append ``rows`` to the CSV at ``path`` (header written once; a file with other columns is refused)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != columns:
            raise SystemExit(f"{path} has other columns than this version writes; pass another --csv path")
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in columns})


def loadavg() -> str:
    """1-minute load average when the case starts: other processes on the machine skew timings."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return ""


def machine_info(device: torch.device) -> dict[str, str]:
    cpu_model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    try:  # the installed distribution's version; importing triton itself takes seconds
        from importlib.metadata import version

        triton_version = version("triton")
    except Exception:  # not installed: the column stays empty
        triton_version = ""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except Exception:
        commit = ""
    cores = os.cpu_count() or 0
    slug = gpu if gpu else f"{cpu_model}-{cores}c"
    return {
        "machine": re.sub(r"[^a-z0-9]+", "-", slug.lower()).strip("-"),
        "cpu_model": cpu_model,
        "cpu_cores": str(cores),
        "torch_threads": str(torch.get_num_threads()),
        "gpu_name": gpu,
        "torch_version": torch.__version__,
        "triton_version": triton_version,
        "bregman_fused_version": bf.__version__,
        "git_commit": commit,
    }
