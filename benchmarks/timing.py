"""How a case is measured: its providers built and warmed up, then timed interleaved (one step
each, round-robin, the order rotated every repetition), and each row filled with its times,
bandwidth and ratios to the copy, the research loop and the peer anchor.

On CUDA each repetition is also timed by ``DeviceTimer`` (the GPU's own time with the host's work
hidden); see benchmarks/README.md for what the two timers mean.
"""
from __future__ import annotations

import datetime as _dt
import math
import statistics
import time
from typing import Callable

import torch

from cases import CHANNELS_LAST_WORKLOADS, DTYPES, bytes_per_elt, make_reg, make_tensors, split_kind, workload_shapes
from providers import ANCHOR_OPTIMIZER, PEER, Skip, build_provider
from report import loadavg


class DeviceTimer:
    """GPU time of one step with its host work hidden: a spin kernel (torch.cuda._sleep) keeps the
    GPU busy while the host issues the step, so the events around the step time only the GPU's
    work, as when a training loop has queued the forward and backward ahead of the optimizer."""

    _instance: "DeviceTimer | None" = None

    def __init__(self) -> None:
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)
        cycles = 1_000_000
        torch.cuda._sleep(cycles)  # warm up
        rates = []
        for _ in range(5):
            torch.cuda.synchronize()
            self.start.record()
            torch.cuda._sleep(cycles)
            self.end.record()
            self.end.synchronize()
            rates.append(cycles / (self.start.elapsed_time(self.end) * 1e-3))
        self.cycles_per_s = statistics.median(rates)

    @classmethod
    def get(cls) -> "DeviceTimer":
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def time(self, fn: Callable[[], object], hide_s: float) -> tuple[float, float]:
        """(device seconds, host seconds) of one call of ``fn``; ``hide_s``: how long the GPU is
        kept busy ahead of it (more than the host needs to issue the step)."""
        torch.cuda.synchronize()
        torch.cuda._sleep(int(self.cycles_per_s * hide_s))
        self.start.record()
        t0 = time.perf_counter()
        fn()
        host = time.perf_counter() - t0
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end) * 1e-3, host


def percentile(sorted_xs: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of a sorted list."""
    if len(sorted_xs) == 1:
        return sorted_xs[0]
    pos = q * (len(sorted_xs) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def finish_row(row: dict, numel: int, walls: list[float], device_times: list[float], host_times: list[float],
               hidden: int) -> None:
    """Fill a row's times and bandwidth from its repetitions (seconds). ``hidden``: how many of the
    device timings had the host's work covered by the spin kernel."""
    walls = sorted(walls)
    row.update(reps=len(walls), median_ms=f"{statistics.median(walls) * 1e3:.4f}",
               p20_ms=f"{percentile(walls, 0.2) * 1e3:.4f}", p80_ms=f"{percentile(walls, 0.8) * 1e3:.4f}")
    # the time the bandwidth and the ratios to the copy and the anchor are quoted for: on CUDA
    # the GPU's own time, since the wall time of a synchronized step adds the host's launch
    # work, which a training loop overlaps with the GPU work queued before the step
    med = row["_wall"] = statistics.median(walls)
    row["timing"] = "wall"
    if device_times:
        dts = sorted(device_times)
        row.update(device_ms=f"{statistics.median(dts) * 1e3:.4f}", device_p20_ms=f"{percentile(dts, 0.2) * 1e3:.4f}",
                   device_p80_ms=f"{percentile(dts, 0.8) * 1e3:.4f}",
                   host_ms=f"{statistics.median(host_times) * 1e3:.4f}")
        if hidden >= 0.8 * len(dts):
            row["timing"] = "device"
            med = statistics.median(dts)
        else:  # the step waited for the GPU (a host read) or outlasted the spin: gaps inside device_ms
            row["note"] = (row["note"] + " host work not hidden (a read from the GPU, or more host work than the "
                           "spin covers): ratios and GB/s from wall time").strip()
    row["gb_s"] = f"{row['bytes_per_elt'] * numel / med / 1e9:.3f}"
    row["_median"] = med


def _state_dtype(optimizer: str) -> str:
    """The states of our providers: fp32 (dual and moments), or fp32 duals with compact moments."""
    fmt = split_kind(optimizer)[1]
    return "fp32" if fmt == "fp32" else f"fp32, {fmt} moments"


def _build_steps(workload, dtype_name, kind, providers, shapes, params, grads, args, device, info, sync,
                 log) -> tuple[dict[str, dict], dict[str, Callable]]:
    """A row per provider, and the step of each one that builds: built, first-stepped and warmed up
    (``setup_s``). A provider that cannot run gets ``skipped`` or ``error`` in its row; the others go on."""
    dtype = DTYPES[dtype_name]
    numel = sum(p.numel() for p in params)
    reg = make_reg(args.reg)
    rows: dict[str, dict] = {}
    steps: dict[str, Callable] = {}
    for provider in providers:
        opt_name = ANCHOR_OPTIMIZER.get(provider, kind)
        row = dict(date_utc=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), **info,
                   provider=provider, optimizer=opt_name, reg=args.reg if provider not in ANCHOR_OPTIMIZER else "",
                   workload=workload, n_tensors=len(shapes), numel=numel, dtype=dtype_name,
                   state_dtype=dtype_name if provider in ANCHOR_OPTIMIZER else _state_dtype(opt_name),
                   device=str(device), bytes_per_elt=bytes_per_elt(opt_name, dtype, params), warmup=args.warmup,
                   loadavg_1m=loadavg(),
                   status="ok", note="")
        rows[provider] = row
        if provider == "compiled-reference" and len(shapes) > args.compile_max_tensors:
            row.update(status="skipped", note=f"{len(shapes)} tensors > --compile-max-tensors {args.compile_max_tensors}: "
                       "torch.compile unrolls the per-tensor loop and compiling takes too long")
            continue
        try:
            t0 = time.perf_counter()
            fn = build_provider(provider, kind, params, grads, reg, args.reg)
            fn()  # first step: lazy state init, compilation
            sync()
            for _ in range(args.warmup):
                fn()
            sync()
            row["setup_s"] = f"{time.perf_counter() - t0:.3f}"
            steps[provider] = fn
        except Skip as e:
            row.update(status="skipped", note=str(e))
        except Exception as e:  # report a failing provider in its row and go on with the others
            msg = f"{type(e).__name__}: {e}".replace("\n", " ")
            row.update(status="error", note=msg[:300])
            log(f"  ! {provider} failed: {msg[:300]}")
    return rows, steps


def _time_interleaved(rows: dict, steps: dict[str, Callable], numel: int, args, device, sync) -> None:
    """Time the built providers round-robin until --reps (or --max-time after --min-reps) and fill their rows."""
    times: dict[str, list[float]] = {p: [] for p in steps}
    device_times: dict[str, list[float]] = {p: [] for p in steps}
    host_times: dict[str, list[float]] = {p: [] for p in steps}
    hidden: dict[str, int] = {p: 0 for p in steps}  # reps whose host work the spin kernel covered
    device_timer = DeviceTimer.get() if device.type == "cuda" else None
    order = list(steps)
    t_start = time.perf_counter()
    reps = 0
    for rep in range(args.reps):
        k = rep % max(len(order), 1)
        for provider in order[k:] + order[:k]:
            fn = steps[provider]
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            wall = time.perf_counter() - t0
            times[provider].append(wall)
            if device_timer is not None:
                hide_s = 2 * wall + 2e-4
                dev, host = device_timer.time(fn, hide_s=hide_s)
                device_times[provider].append(dev)
                host_times[provider].append(host)
                hidden[provider] += host < hide_s
        reps += 1
        if reps >= args.min_reps and time.perf_counter() - t_start > args.max_time:
            break

    for provider, ts in times.items():
        finish_row(rows[provider], numel, ts, device_times[provider], host_times[provider], hidden[provider])
    if reps < args.reps and times:
        for provider in times:
            rows[provider]["note"] = (rows[provider]["note"] + f" stopped after {reps} reps (--max-time {args.max_time:g} s)").strip()


def _fill_ratios(rows: dict, kind: str) -> None:
    """Within one case: % of the copy bandwidth (a rate, so it applies to an anchor's own byte
    count too), speed-up over the research loop, and time relative to the peer anchor."""
    copy = rows.get("copy")
    research = rows.get("research-loop")
    anchor = next((rows[p] for p in rows if p in ANCHOR_OPTIMIZER and "_median" in rows[p]), None)
    for provider, row in rows.items():
        if "_median" not in row:
            continue
        if copy is not None and "_median" in copy:
            copy_gbs = float(copy["gb_s"])
            row["copy_gb_s"] = f"{copy_gbs:.3f}"
            row["pct_of_copy"] = f"{100 * float(row['gb_s']) / copy_gbs:.1f}"
        if research is not None and "_median" in research and provider != "copy":
            # wall time both: whole synchronized steps, the research loop's per-tensor Python work
            # included (the copy is no optimizer: it gets no speed-up)
            row["speedup_vs_research"] = f"{research['_wall'] / row['_wall']:.2f}"
            if provider in ANCHOR_OPTIMIZER:
                row["note"] = (row["note"] + f" speed-up vs research-loop {kind}").strip()
        if anchor is not None and provider != "copy":
            key = "_median" if row["timing"] == anchor["timing"] else "_wall"
            row["time_vs_anchor"] = f"{row[key] / anchor[key]:.3f}"


def run_case(workload, dtype_name, kind, providers, args, device, info, log) -> list[dict]:
    """Measure all ``providers`` of one (workload, dtype, optimizer) case, interleaved."""
    shapes = workload_shapes(workload)
    params, grads = make_tensors(shapes, DTYPES[dtype_name], device, channels_last=workload in CHANNELS_LAST_WORKLOADS)
    numel = sum(p.numel() for p in params)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows, steps = _build_steps(workload, dtype_name, kind, providers, shapes, params, grads, args, device, info,
                               sync, log)
    del params, grads  # each provider holds its own copy
    _time_interleaved(rows, steps, numel, args, device, sync)
    _fill_ratios(rows, kind)
    return list(rows.values())


def run_anchor_case(workload, dtype_name, provider, args, device, info, log, research_median) -> list[dict]:
    """An anchor (torch Adam / SGD) interleaved with a copy of its own byte count."""
    kind = ANCHOR_OPTIMIZER[provider]
    rows = run_case(workload, dtype_name, kind, [provider, "copy"], args, device, info, log)
    anchor = rows[0]
    copy = rows[1]
    copy["optimizer"] = kind
    copy["bytes_per_elt"] = bytes_per_elt(kind, DTYPES[dtype_name])
    if "_median" in anchor and "_median" in copy:
        anchor["copy_gb_s"] = copy["gb_s"]
        anchor["pct_of_copy"] = f"{100 * float(anchor['gb_s']) / float(copy['gb_s']):.1f}"
        copy["copy_gb_s"] = copy["gb_s"]
        copy["pct_of_copy"] = "100.0"
    if "_median" in anchor and research_median:
        anchor["speedup_vs_research"] = f"{research_median / anchor['_wall']:.2f}"
        anchor["note"] = (anchor["note"] + f" speed-up vs research-loop {PEER[kind]}").strip()
    return rows
