"""Per-epoch history: JSON + CSV files and matplotlib plots (Agg backend, no display needed).

A history is a list of flat dicts, one per epoch (keys: see the ``loop`` module doc; NaN where a
value does not exist, e.g. conv-kernel density without convs: written as ``nan`` in the CSV, ``null``
in the JSON, and not plotted). Files are
written atomically (temp file + rename) so a crash never leaves half a file behind.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any, Iterable, Sequence

__all__ = ["atomic_write", "save_history", "load_history", "figure", "plot_history", "plot_compare"]


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


# (history key, label, line style) of each panel's curves; one colour per run
_ACCURACY = (("test_acc", "test", "-"), ("val_acc", "val", ":"))
_LOSS = (("train_loss", "train", "--"), ("val_loss", "val", ":"), ("test_loss", "test", "-"))
_DENSITY = (("density", "all weights", "-"), ("linear_density", "linear", "-."),
            ("conv_kernel_density", "conv kernels", ":"), ("node_density", "nodes", "--"))


def _curves(ax, rows, label: str, color: str, curves) -> None:
    for key, name, style in curves:
        pts = _finite(rows, key)
        if pts:  # NaN everywhere (no accuracy for the autoencoder, no conv kernels in an MLP): no curve
            ax.plot(*zip(*pts), style, color=color, label=f"{label} {name}".strip())


def figure(runs: dict[str, Sequence[dict[str, Any]]], title: str = ""):
    """The matplotlib Figure of one or several runs: accuracy (classification only), loss and density
    vs epoch, one colour per run and one line style per metric."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    first = next(iter(runs.values()), [])
    classification = any(_finite(first, "test_acc"))
    panels = (["accuracy"] if classification else []) + ["loss", "density"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    ax = dict(zip(panels, axes[0]))
    for i, (label, rows) in enumerate(runs.items()):
        color = f"C{i % 10}"
        if classification:
            _curves(ax["accuracy"], rows, label, color, _ACCURACY)
        _curves(ax["loss"], rows, label, color, _LOSS)
        # the linear/conv split only where there are conv kernels: without, "linear" is "all weights"
        split = any(_finite(rows, "conv_kernel_density"))
        _curves(ax["density"], rows, label, color, _DENSITY if split else _DENSITY[:1] + _DENSITY[3:])
    if classification:
        ax["accuracy"].set(ylabel="accuracy", title="accuracy")
    ax["loss"].set(ylabel="loss" if classification else "loss (MSE)", yscale="log", title="loss")
    ax["density"].set(ylabel="density (fraction of non-zeros)", yscale="log", title="density")
    for a in axes[0]:
        a.set_xlabel("epoch")
        a.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _plot(runs: dict[str, Sequence[dict[str, Any]]], path: str, title: str) -> str:
    import matplotlib.pyplot as plt

    fig = figure(runs, title)
    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_history(history: Sequence[dict[str, Any]], path: str, title: str = "") -> str:
    """PNG of accuracy (not for the autoencoder), loss (train/val/test) and density (all weights,
    linear, conv kernels, nodes) vs epoch."""
    return _plot({"": history}, path, title)


def plot_compare(runs: dict[str, Sequence[dict[str, Any]]], path: str, title: str = "") -> str:
    """One PNG with several runs (e.g. SGD / LinBreg / ProxSGD / AdaBreg), as the paper's figures."""
    return _plot(runs, path, title)
