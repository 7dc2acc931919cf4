"""Per-epoch history: JSON + CSV files and matplotlib plots (Agg backend, no display needed).

A history is a list of flat dicts, one per epoch (keys: see ``loop.Trainer.epoch_row``). Files are
written atomically (temp file + rename) so a crash never leaves half a file behind.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any, Iterable, Sequence

__all__ = ["atomic_write", "save_history", "load_history", "plot_history", "plot_compare"]


def atomic_write(path: str, data: bytes | str) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and an atomic rename."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def save_history(history: Sequence[dict[str, Any]], out_dir: str, config: dict[str, Any] | None = None,
                 stem: str = "history") -> tuple[str, str]:
    """Write ``<stem>.json`` ({"config", "history"}) and ``<stem>.csv``; returns both paths."""
    os.makedirs(out_dir, exist_ok=True)
    rows = [{k: _json_safe(v) for k, v in r.items()} for r in history]
    json_path, csv_path = os.path.join(out_dir, f"{stem}.json"), os.path.join(out_dir, f"{stem}.csv")
    atomic_write(json_path, json.dumps({"config": config or {}, "history": rows}, indent=1, default=str))
    keys: list[str] = []
    for r in history:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
    atomic_write(csv_path, buf.getvalue())
    return json_path, csv_path


def load_history(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return json.load(f)["history"]


def _finite(rows: Iterable[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    out = []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            out.append((r["epoch"], float(v)))
    return out


def _plot(runs: dict[str, Sequence[dict[str, Any]]], path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    first = next(iter(runs.values()), [])
    classification = any(_finite(first, "test_acc"))
    fig, (ax_a, ax_d) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, rows) in enumerate(runs.items()):
        color = f"C{i % 10}"  # one colour per run; line style = which metric
        if classification:
            for key, style in (("test_acc", "-"), ("val_acc", ":")):
                pts = _finite(rows, key)
                if pts:
                    ax_a.plot(*zip(*pts), style, color=color, label=f"{label} {key.split('_')[0]}")
        else:
            pts = _finite(rows, "test_loss")
            if pts:
                ax_a.plot(*zip(*pts), color=color, label=f"{label} test")
        for key, style in (("density", "-"), ("node_density", "--")):
            pts = _finite(rows, key)
            if pts:
                ax_d.plot(*zip(*pts), style, color=color, label=f"{label} {key.replace('_', ' ')}")
    ax_a.set(xlabel="epoch", ylabel="accuracy" if classification else "loss (MSE)", title=title)
    if not classification:
        ax_a.set_yscale("log")
    ax_d.set(xlabel="epoch", ylabel="density (fraction of non-zeros)", yscale="log", title="density")
    for ax in (ax_a, ax_d):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_history(history: Sequence[dict[str, Any]], path: str, title: str = "") -> str:
    """PNG of accuracy (or loss, for the autoencoder) and density vs epoch."""
    return _plot({"": history}, path, title)


def plot_compare(runs: dict[str, Sequence[dict[str, Any]]], path: str, title: str = "") -> str:
    """One PNG with several runs (e.g. SGD / LinBreg / ProxSGD / AdaBreg), as the paper's figures."""
    return _plot(runs, path, title)
