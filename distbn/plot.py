"""`distbn plot RUN_DIR`: loss and accuracy curves of a run, as a PNG (needs matplotlib)."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["PlotError", "read_metrics", "plot_run"]


class PlotError(RuntimeError):
    """The run cannot be plotted: no metrics, or matplotlib missing; the message says which."""


def read_metrics(run_dir) -> list[dict]:
    """The records of `RUN_DIR/metrics.jsonl`, in order.

    Raises:
        PlotError: the file is missing or a line is not JSON (quoting its number).
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path} does not exist: is {str(run_dir)!r} a distbn run directory?")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as err:
            raise PlotError(f"{path}:{number}: not JSON ({err})") from err
    return records


def _series(records, split, key):
    pts = [(r["step"], r[key]) for r in records
           if r.get("split") == split and r.get(key) is not None and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(run_dir, out=None) -> Path:
    """Draw loss and accuracy against the step for the train and test splits.

    Args:
        run_dir: a run directory holding metrics.jsonl.
        out: the PNG to write (default `RUN_DIR/metrics.png`).

    Returns:
        The PNG's path.

    Raises:
        PlotError: matplotlib is not installed, or there is nothing to plot.
    """
    records = read_metrics(run_dir)
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on cluster nodes
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise PlotError(
            "distbn plot needs matplotlib, which is not installed: "
            "pip install 'distbn[plot]'"
        ) from err
    if not any(r.get("loss") is not None for r in records):
        raise PlotError(f"{Path(run_dir) / 'metrics.jsonl'} has no loss values to plot")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
        for split, style in (("train", "-"), ("test", "o-")):
            steps, values = _series(records, split, key)
            if steps:
                ax.plot(steps, values, style, label=split)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(str(Path(run_dir).resolve().name))
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "metrics.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
