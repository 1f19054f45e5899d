"""Every figure distbn draws, with matplotlib (the `plot` extra), in one place.

* `distbn plot RUN_DIR`: loss and accuracy curves of a run (`plot_run`).
* `distbn bench`: allreduce latency, training throughput, kernel bandwidth
  (`bench_figures`).
* `distbn compare`: the study's curves (`study_figure`) and test error against the
  normalization batch size (`batch_figure`).

One behaviour without matplotlib: the commands still write their tables (report.md) and
say once, with `NO_MATPLOTLIB`, how to get the figures; `distbn plot`, which has nothing
else to give, exits 2 with the same line. Figures are drawn with the Agg backend (files
only: no display on cluster nodes).
"""

from __future__ import annotations

from pathlib import Path

from distbn.jsonl import read_jsonl

__all__ = ["NO_MATPLOTLIB", "PlotError", "pyplot", "have_matplotlib", "read_metrics",
           "plot_run", "bench_figures", "kernel_figure", "study_figure", "batch_figure"]

#: What every command says when matplotlib is missing.
NO_MATPLOTLIB = ('plots need matplotlib, which is not installed: pip install matplotlib '
                 '(or pip install -e ".[plot]" in the distbn clone)')
# One colour per series name, in order of appearance (matplotlib's default cycle).
_CYCLE = tuple(f"C{i}" for i in range(10))


class PlotError(RuntimeError):
    """The run cannot be plotted: no metrics, or matplotlib missing; the message says which."""


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib does not import."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def have_matplotlib() -> bool:
    """Whether figures can be drawn here."""
    return pyplot() is not None


def _save(fig, plt, path, dpi=100) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


# --- distbn plot -------------------------------------------------------------------------


def read_metrics(run_dir, notes=None) -> list[dict]:
    """The records of `RUN_DIR/metrics.jsonl`, in order.

    A run still writing may have a last line half written: it is skipped, and a note
    saying so is appended to `notes` (a list) when given.

    Raises:
        PlotError: the file is missing or a line is not JSON (quoting its number).
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path} does not exist: is {str(run_dir)!r} a distbn run directory?")

    def partial(number, line):
        if notes is not None:
            notes.append(f"{path}:{number}: skipped an incomplete last line (the run is "
                         f"still writing it?): {line[:60]!r}")

    try:
        return read_jsonl(path, on_partial=partial)
    except ValueError as err:
        raise PlotError(str(err)) from err


def _series(records, split, key):
    pts = [(r["step"], r[key]) for r in records
           if r.get("split") == split and r.get(key) is not None and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(run_dir, out=None, notes=None) -> Path:
    """Draw loss and accuracy against the step for the train and test splits.

    Args:
        run_dir: a run directory holding metrics.jsonl.
        out: the PNG to write (default `RUN_DIR/metrics.png`).
        notes: a list that gets a line for anything skipped (see `read_metrics`).

    Returns:
        The PNG's path.

    Raises:
        PlotError: matplotlib is not installed, or there is nothing to plot.
    """
    records = read_metrics(run_dir, notes)
    plt = pyplot()
    if plt is None:
        raise PlotError(NO_MATPLOTLIB)
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
    return _save(fig, plt, Path(out) if out else Path(run_dir) / "metrics.png")


# --- distbn bench ------------------------------------------------------------------------


def _shape(params) -> str:
    return "×".join(str(d) for d in params.get("shape", [])) or "–"


_SHORT = {"forward": "fwd", "backward": "bwd", "forward_backward": "fwd+bwd",
          "stats": "stats", "normalize": "norm"}


def kernel_figure(plt, records):
    """The kernel bandwidth bars: distbn, torch (only where measured) and the copy of
    the same array; None when there are no kernel records."""
    passes = [r for r in records if r["name"].startswith("kernel.")
              and r["name"] not in ("kernel.copy", "kernel.cold_start")
              and r["metric"] in ("bandwidth", "torch_bandwidth")]
    if not passes:
        return None

    def case(p):
        return (_shape(p), p.get("dtype"), p.get("layout"), p.get("threads"))

    several = len({r["params"].get("threads") for r in passes}) > 1

    def label(r):
        p = r["params"]
        name = r["name"].split(".", 1)[1]
        threads = f" {p.get('threads')} thr" if several else ""
        return f"{_SHORT.get(name, name)} {_shape(p)} {p.get('dtype')}{threads}"

    labels = list(dict.fromkeys(label(r) for r in passes))
    bars = {}
    for metric, name in (("bandwidth", "distbn"), ("torch_bandwidth", "torch")):
        vals = {label(r): r["value"] for r in passes if r["metric"] == metric}
        if vals:  # no torch: no torch bars and no torch legend entry
            bars[name] = [vals.get(lb, 0) for lb in labels]
    copies = {case(r["params"]): r["value"] for r in records
              if r["name"] == "kernel.copy" and r["metric"] == "bandwidth"}
    per_case = {label(r): copies.get(case(r["params"])) for r in passes}
    if any(v is not None for v in per_case.values()):
        bars["np.copyto (same array)"] = [per_case.get(lb) or 0 for lb in labels]
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(max(6, len(labels) * 0.7), 5))
    for j, (name, values) in enumerate(bars.items()):
        ax.bar([i + j * width for i in range(len(labels))], values, width=width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, fontsize=7,
                  rotation=40, ha="right")
    ax.set(ylabel="effective GB/s", title="BatchNormalization kernels")
    ax.legend()
    return fig


def bench_figures(results: dict, out_dir) -> list[Path]:
    """The benchmark PNGs (allreduce latency, scaling, kernel bandwidth).

    Args:
        results: {"environment", "records"}.
        out_dir: where the PNGs go.

    Returns:
        The files written; [] without matplotlib.
    """
    plt = pyplot()
    if plt is None:
        return []
    out_dir = Path(out_dir)
    records = results["records"]
    written = []

    lat = [r for r in records if r["name"].startswith("allreduce.") and r["metric"] == "latency"]
    if lat:
        fig, ax = plt.subplots(figsize=(6, 4))
        for ws in sorted({r["world_size"] for r in lat}):
            pts = sorted((r["params"]["bytes"], r["value"]) for r in lat if r["world_size"] == ws)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"n={ws}")
        ax.set(xscale="log", yscale="log", xlabel="message bytes", ylabel="latency (µs)",
               title="Allreduce latency")
        ax.legend()
        written.append(_save(fig, plt, out_dir / "allreduce.png"))

    thr = [r for r in records if r["name"] == "scaling.step" and r["metric"] == "throughput"]
    if thr:
        fig, ax = plt.subplots(figsize=(6, 4))
        pts = sorted((r["world_size"], r["value"]) for r in thr)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label="measured")
        base = [v for n, v in pts if n == 1]
        if base:
            ax.plot([p[0] for p in pts], [p[0] * base[0] for p in pts], ls="--", label="ideal")
        ax.set(xlabel="ranks", ylabel="samples/s", title="Training throughput")
        ax.legend()
        written.append(_save(fig, plt, out_dir / "scaling.png"))

    fig = kernel_figure(plt, records)
    if fig is not None:
        written.append(_save(fig, plt, out_dir / "kernel.png"))
    return written


# --- distbn compare ----------------------------------------------------------------------


def study_figure(panels, path, title) -> Path | None:
    """A grid of line panels, one colour per series name across panels.

    Args:
        panels: [{"title", "ylabel", "series": [(name, x, y, kind)]}] with kind "line"
            or "points"; a series named "reference" is drawn thin.
        path: the PNG to write.
        title: the figure's title.

    Returns:
        The path, or None without matplotlib (nothing written).
    """
    plt = pyplot()
    if plt is None:
        return None
    names = list(dict.fromkeys(s[0] for p in panels for s in p["series"]))
    colour = {n: _CYCLE[i % len(_CYCLE)] for i, n in enumerate(names)}
    cols = 3
    rows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    for ax in axes.ravel()[len(panels):]:
        ax.set_visible(False)
    for ax, spec in zip(axes.ravel(), panels, strict=False):
        for name, x, y, kind in spec["series"]:
            ax.plot(x, y, "o-" if kind == "points" else "-", color=colour[name], label=name,
                    lw=0.8 if name == "reference" else 1.6, ms=4)
        ax.set_title(spec["title"], fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(spec["ylabel"])
        ax.grid(alpha=0.3)
        if spec["series"]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, plt, path, dpi=90)


def batch_figure(panels, path, title) -> Path | None:
    """Panels of a value against the normalization batch size (`distbn compare`).

    Args:
        panels: [{"title", "ylabel", "series": [(name, x, y, yerr)], "levels":
            [(name, y, yerr)]}]: series are drawn as points joined by lines with error
            bars (yerr None: none) over a log2 x axis; levels (the per-sample modes,
            which have no batch) as horizontal dashed lines with a shaded +- yerr band.
        path: the PNG to write.
        title: the figure's title.

    Returns:
        The path, or None without matplotlib (nothing written).
    """
    plt = pyplot()
    if plt is None:
        return None
    names = list(dict.fromkeys([s[0] for p in panels for s in p["series"]]
                               + [v[0] for p in panels for v in p.get("levels", ())]))
    colour = {n: _CYCLE[i % len(_CYCLE)] for i, n in enumerate(names)}
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, spec in zip(axes.ravel(), panels, strict=True):
        xs = [x for s in spec["series"] for x in s[1]]
        for name, x, y, yerr in spec["series"]:
            ax.errorbar(x, y, yerr=yerr, fmt="o-", color=colour[name], label=name, lw=1.6,
                        ms=4, capsize=3)
        for name, y, yerr in spec.get("levels", ()):
            ax.axhline(y, color=colour[name], ls="--", lw=1.2, label=name)
            if yerr:
                ax.axhspan(y - yerr, y + yerr, color=colour[name], alpha=0.12)
        if xs and min(xs) > 0:
            ax.set_xscale("log", base=2)
            ticks = sorted(set(xs))
            ax.set_xticks(ticks)
            ax.set_xticklabels([f"{t:g}" for t in ticks])
        ax.set_title(spec["title"], fontsize=10)
        ax.set_xlabel("normalization batch size (samples per group)")
        ax.set_ylabel(spec["ylabel"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, plt, path, dpi=90)
