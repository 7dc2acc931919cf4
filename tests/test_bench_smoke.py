"""Smoke tests of benchmarks/bench_step.py (a --quick run on the tiny workload writes the CSV it
promises) and bench_inference.py, and of the byte counts their GB/s rest on."""
import csv
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # the benchmark's modules import each other by name
import bench_inference  # noqa: E402
import bench_step  # noqa: E402
import torch  # noqa: E402
from cases import bytes_per_elt, workload_shapes  # noqa: E402
from report import CSV_COLUMNS  # noqa: E402
from timing import finish_row  # noqa: E402


def test_bench_step_quick_writes_csv(tmp_path, capsys):
    path = tmp_path / "bench.csv"
    # no compiled providers: compilation (torch.compile, a JIT-built extension) does not fit the time budget
    providers = ["research-loop", "reference", "torch-sgd", "copy"]
    optimizers = ["linbreg", "proxsgd"]
    bench_step.main(["--quick", "--workloads", "tiny", "--reps", "3", "--providers", ",".join(providers),
                     "--optimizers", ",".join(optimizers), "--csv", str(path), "--device", "cpu"])

    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_COLUMNS
        rows = list(reader)
    for col in ("provider", "optimizer", "workload", "dtype", "median_ms", "p20_ms", "p80_ms", "gb_s",
                "pct_of_copy", "speedup_vs_research", "cpu_model", "torch_version"):
        assert col in CSV_COLUMNS

    # one row per (provider, optimizer) of our providers + the copy; the SGD anchor is timed in the
    # LinBreg case, beside its peer
    got = sorted((r["provider"], r["optimizer"]) for r in rows)
    want = sorted([(p, o) for p in ("research-loop", "reference", "copy") for o in optimizers] + [("torch-sgd", "sgd")])
    assert got == want
    for r in rows:
        assert r["status"] == "ok", r
        assert r["workload"] == "tiny" and r["dtype"] == "fp32" and r["reps"] == "3"
        p20, med, p80 = float(r["p20_ms"]), float(r["median_ms"]), float(r["p80_ms"])
        assert 0 < p20 <= med <= p80
        assert float(r["gb_s"]) > 0 and float(r["pct_of_copy"]) > 0
        assert int(r["numel"]) == sum(math.prod(s) for s in workload_shapes("tiny"))
    by_key = {(r["provider"], r["optimizer"]): r for r in rows}
    assert by_key[("research-loop", "linbreg")]["speedup_vs_research"] == "1.00"
    assert by_key[("torch-sgd", "sgd")]["time_vs_anchor"] == "1.000"
    ratio = float(by_key[("reference", "linbreg")]["median_ms"]) / float(by_key[("torch-sgd", "sgd")]["median_ms"])
    assert float(by_key[("reference", "linbreg")]["time_vs_anchor"]) == pytest.approx(ratio, rel=1e-2)
    assert by_key[("reference", "proxsgd")]["time_vs_anchor"] == ""  # no peer anchor for ProxSGD
    assert by_key[("copy", "linbreg")]["pct_of_copy"] == "100.0"
    assert by_key[("copy", "linbreg")]["bytes_per_elt"] == "16" and by_key[("copy", "proxsgd")]["bytes_per_elt"] == "12"
    assert "research-loop" in capsys.readouterr().out  # the table went to stdout


def _row(bytes_per_elt=32):
    return dict(bytes_per_elt=bytes_per_elt, note="")


def test_device_time_is_used_when_the_host_work_was_hidden():
    row = _row()
    finish_row(row, 10**6, walls=[3e-3, 2e-3, 4e-3], device_times=[1e-3, 1e-3, 1e-3],
               host_times=[5e-4] * 3, hidden=3)
    assert row["timing"] == "device" and row["_median"] == 1e-3 and row["_wall"] == 3e-3
    assert float(row["gb_s"]) == 32.0 and float(row["median_ms"]) == 3.0 and float(row["device_ms"]) == 1.0


def test_a_step_that_reads_from_the_gpu_falls_back_to_wall_time():
    # the host waited on the spin kernel (a .item() in the step): device_ms holds host gaps
    row = _row()
    finish_row(row, 10**6, walls=[4e-3] * 5, device_times=[1e-3] * 5, host_times=[9e-3] * 5, hidden=1)
    assert row["timing"] == "wall" and row["_median"] == 4e-3 and float(row["gb_s"]) == 8.0
    assert "not hidden" in row["note"] and float(row["device_ms"]) == 1.0


def test_cpu_rows_have_wall_timing_only():
    row = _row()
    finish_row(row, 10**6, walls=[2e-3, 2e-3], device_times=[], host_times=[], hidden=0)
    assert row["timing"] == "wall" and "device_ms" not in row and float(row["gb_s"]) == 16.0


def test_compiled_reference_provider_steps():
    """The compiled-reference provider (torch.compile of the contract's count + reference.step) builds
    and steps: the quick run above leaves it out (compile time), and it calls the contract directly."""
    import torch
    import torch._dynamo

    from cases import make_reg, make_tensors
    from providers import build_provider

    torch._dynamo.reset()
    params, grads = make_tensors([(7, 5), (13,)], torch.float32, torch.device("cpu"))
    step = build_provider("compiled-reference", "adabreg", params, grads, make_reg("l1"), "l1")
    step()
    step()  # a second call reuses the graph (steps and states live in the closure)


def test_bench_step_quick_without_csv_writes_no_results_file(tmp_path, monkeypatch):
    # its default file is the day's results file (machine and date): smoke rows must not join it
    written = []
    monkeypatch.setattr(bench_step, "write_csv", lambda path, rows: written.append(path))
    bench_step.main(["--quick", "--workloads", "tiny", "--reps", "1", "--providers", "reference,copy",
                     "--optimizers", "linbreg", "--device", "cpu"])
    assert written == []


def test_8bit_byte_counts_follow_the_params_that_keep_fp32_moments():
    # moments.storage: a 1-D or small param keeps fp32 moments with "8bit" (32 B/elt for AdaBreg),
    # a large 2-D one stores codes (20 B/elt); the count is the elements' weighted mean
    big, small = torch.empty(64, 256), torch.empty(4096)
    assert bytes_per_elt("adabreg-8bit", torch.float32, [big]) == 20
    assert bytes_per_elt("adabreg-8bit", torch.float32, [small]) == 32
    assert bytes_per_elt("adabreg-8bit", torch.float32, [big, small]) == pytest.approx(20 * 0.8 + 32 * 0.2)
    assert bytes_per_elt("adabreg", torch.float32, [big, small]) == 32


def test_bench_inference_quick_writes_no_results_file_and_calibration_rows_carry_their_spread(tmp_path,
                                                                                                monkeypatch):
    written = []
    monkeypatch.setattr(bench_inference, "write_csv", lambda path, rows, columns: written.append(path))
    bench_inference.main(["--quick", "--workloads", "mlp4096", "--batches", "1"])
    assert written == []  # its default file is the day's results file
    path = tmp_path / "calibrate.csv"
    monkeypatch.undo()
    rows = bench_inference.main(["--quick", "--calibrate", "--batches", "1", "--csv", str(path)])
    assert path.exists() and rows
    assert all(float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"]) and r["reps"] == 3 for r in rows)


def test_our_providers_refuse_torchs_optimizers_instead_of_running_one_of_ours():
    # build_provider("cpu", "adam") used to fall through to ProxSGD (profile_step.py --optimizer adam)
    from providers import build_provider

    params, grads = [torch.randn(4, 3)], [torch.randn(4, 3)]
    for provider in ("cpu", "reference", "research-loop"):
        with pytest.raises(ValueError, match="is torch's, timed by the provider 'torch-adam-fused'"):
            build_provider(provider, "adam", params, grads, None, "l1")
