"""The report of `distbn compare`: DIR/report.md and DIR/report.png from DIR/study.jsonl.

The records (`study` writes them) are a "meta" line, then per mode "step" records
(training loss/accuracy of the window, batch-statistics divergence, moving-statistics
spread), "eval" records (test loss/accuracy) and one "summary". The plot uses matplotlib
when it imports (the `plot` extra) and otherwise the built-in renderer (`png`), so the
report always has its figure.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

__all__ = ["REPORT_FILE", "PLOT_FILE", "read_records", "summaries", "render_table",
           "render_markdown", "write_plot", "write_report"]

REPORT_FILE = "report.md"
PLOT_FILE = "report.png"
_MODE_ORDER = ("replica-local", "synchronized", "reference")


def read_records(path) -> list[dict]:
    """The records of a study.jsonl, in order.

    Args:
        path: the file.

    Returns:
        The list of dicts. Raises ValueError quoting the line number of a bad line.
    """
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as err:
            raise ValueError(f"{path}:{number}: not JSON ({err})") from err
    return records


def _modes(records) -> list[str]:
    found = {r["mode"] for r in records if "mode" in r}
    return [m for m in _MODE_ORDER if m in found] + sorted(found - set(_MODE_ORDER))


def summaries(records) -> dict:
    """The summary record of each mode, in report order.

    Args:
        records: from `read_records`.

    Returns:
        {mode: summary dict}.
    """
    by_mode = {r["mode"]: r for r in records if r.get("type") == "summary"}
    return {m: by_mode[m] for m in _modes(records) if m in by_mode}


def _num(v, spec) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) \
        else format(v, spec)


def render_table(records) -> str:
    """The one-row-per-mode markdown table.

    Args:
        records: from `read_records`.

    Returns:
        The table (header, separator, rows).
    """
    head = ("| mode | ranks x batch | train loss | train acc | train acc (inference) | "
            "test loss | test acc | batch-stat mean dev | var ratio | moving-mean spread "
            "| train time |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for mode, s in summaries(records).items():
        one = s["ranks"] == 1  # nothing to compare across a single replica
        per = s["per_replica_batch"]
        lines.append(
            f"| {mode} | {s['ranks']} x {per:g} | {_num(s['train_loss'], '.4f')} | "
            f"{_num(s['train_accuracy'], '.4f')} | {_num(s['train_eval_accuracy'], '.4f')} | "
            f"{_num(s['test_loss'], '.4f')} | {_num(s['test_accuracy'], '.4f')} | "
            f"{'–' if one else _num(s['mean_dev'], '.3f')} | "
            f"{'–' if one else _num(s['var_ratio'], '.3f')} | "
            f"{'–' if one else _num(s['moving_mean_spread'], '.3g')} | "
            f"{s['train_seconds']:.1f} s |")
    return "\n".join(lines)


def _differences(sums) -> list[str]:
    """One line per comparison worth stating: replica-local and the reference against
    synchronized."""
    sync = sums.get("synchronized")
    if sync is None:
        return []
    out = []
    for mode, why in (("replica-local", ""),
                      ("reference", " (the same arithmetic up to float32 rounding, whose "
                                    "differences grow over many steps: a scale for run-to-run "
                                    "noise)")):
        s = sums.get(mode)
        if s is None or None in (s["test_accuracy"], sync["test_accuracy"], s["test_loss"],
                                 sync["test_loss"]):
            continue
        out.append(f"- {mode} minus synchronized: test accuracy "
                   f"{s['test_accuracy'] - sync['test_accuracy']:+.4f}, test loss "
                   f"{s['test_loss'] - sync['test_loss']:+.4f}{why}.")
    return out + [""] if out else []


def _layer_table(records) -> str:
    rows = []
    for mode, s in summaries(records).items():
        if s["ranks"] == 1:
            continue
        for name, m in s.get("layers", {}).items():
            rows.append(f"| {mode} | {name} | {m['mean_dev']:.3f} | {m['var_ratio']:.3f} | "
                        f"{m['var_dev']:.3f} | {m['moving_mean_spread']:.3g} | "
                        f"{m['moving_var_spread']:.3g} |")
    if not rows:
        return ""
    return "\n".join(["| mode | layer | mean dev | var ratio | log-var dev | moving-mean "
                      "spread | moving-var spread |", "|---|---|---|---|---|---|---|", *rows])


def render_markdown(records) -> str:
    """The whole report.md.

    Args:
        records: from `read_records`.

    Returns:
        Markdown text.
    """
    meta = next((r for r in records if r.get("type") == "meta"), {})
    sums = summaries(records)
    first = next(iter(sums.values()), None)
    lines = ["# Replica-local vs synchronized BatchNormalization statistics", ""]
    if meta:
        lines += [f"Command: `{meta.get('command', '')}`  ", f"Date: {meta.get('date', '')}, "
                  f"distbn {meta.get('distbn', '')}", ""]
    if first is not None:
        lines += [f"{first['steps']} steps at global batch {first['global_batch_size']}; "
                  f"statistics measured every {first['every']} step(s). Same seed, data "
                  "order and global batch in every mode; gradients are all-reduced in both "
                  "multi-rank modes, so they differ only in the statistics BN uses.", ""]
    lines += [render_table(records), "", *_differences(sums),
              "- train loss/acc: training mode (the statistics the mode normalises with), "
              "over the last tenth of the steps. train acc (inference) and test: inference "
              "mode with the moving statistics averaged over replicas (what model.npz "
              "holds).",
              "- batch-stat mean dev: max over ranks of the channel mean of |mu_r - mu| / "
              "sqrt(var + eps), rank r's batch mean against the global batch's, in the first "
              "BN layer, averaged over the measured steps. A property of the data and the "
              "per-replica batch, present in both modes; only replica-local mode normalises "
              "with mu_r. (Deeper layers: see below; replica-local normalisation has already "
              "removed most per-rank offsets from their inputs.)",
              "- var ratio: mean over ranks and channels of (var_r + eps) / (var + eps), first "
              "BN layer; below 1, a rank's batch underestimates the global variance.",
              "- moving-mean spread: at the end, max over layers and channels of the std "
              "across replicas of the moving mean / sqrt(moving variance); exactly 0 when "
              "synchronized.",
              "- train time: seconds in training steps after the first (which pays one-off "
              "kernel compilation), without measurement or evaluation."]
    layer_table = _layer_table(records)
    if layer_table:
        lines += ["", "## Per layer", "", "Divergences averaged over the measured steps; "
                  "spreads at the end.", "", layer_table]
    lines += ["", f"Curves: [{PLOT_FILE}]({PLOT_FILE}); every record: study.jsonl.", ""]
    return "\n".join(lines)


def _smooth(values, width) -> np.ndarray:
    """Trailing moving average (None as NaN, ignored)."""
    v = np.array([np.nan if x is None else x for x in values], dtype=np.float64)
    if width <= 1 or v.size == 0:
        return v
    ok = np.isfinite(v)
    csum = np.cumsum(np.where(ok, v, 0.0))
    ccount = np.cumsum(ok)
    lo = np.maximum(np.arange(v.size) - width, -1)
    s = csum - np.where(lo >= 0, csum[np.maximum(lo, 0)], 0.0)
    c = ccount - np.where(lo >= 0, ccount[np.maximum(lo, 0)], 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(c > 0, s / np.maximum(c, 1), np.nan)


def _curves(records) -> list[dict]:
    """What each panel shows: [{"title", "ylabel", "series": [(mode, x, y, kind)]}]."""
    modes = _modes(records)
    steps = {m: [r for r in records if r.get("mode") == m and r.get("type") == "step"]
             for m in modes}
    evals = {m: [r for r in records if r.get("mode") == m and r.get("type") == "eval"
                 and r.get("loss") is not None] for m in modes}
    width = max((len(v) for v in steps.values()), default=0) // 40

    def line(key, smooth=True, skip_single=False):
        out = []
        for m in modes:
            rs = steps[m]
            if not rs or (skip_single and _single(records, m)):
                continue
            y = [r[key] for r in rs]
            out.append((m, [r["step"] for r in rs], _smooth(y, width) if smooth else y,
                        "line"))
        return out

    def points(key):
        return [(m, [r["step"] for r in evals[m]], [r[key] for r in evals[m]], "points")
                for m in modes if evals[m]]

    return [
        {"title": "TRAINING LOSS (SMOOTHED)", "ylabel": "loss", "series": line("loss")},
        {"title": "TRAINING ACCURACY (SMOOTHED)", "ylabel": "accuracy",
         "series": line("accuracy")},
        {"title": "TEST ACCURACY (AVERAGED MOVING STATS)", "ylabel": "accuracy",
         "series": points("accuracy")},
        {"title": "BATCH MEAN DEV MAX_R |MU_R-MU|/SIGMA", "ylabel": "first BN layer",
         "series": line("mean_dev", skip_single=True)},
        {"title": "BATCH VAR RATIO VAR_R/VAR", "ylabel": "first BN layer, mean over ranks",
         "series": line("var_ratio", skip_single=True)},
        {"title": "MOVING-MEAN SPREAD ACROSS REPLICAS", "ylabel": "max over layers (smoothed)",
         "series": line("moving_mean_spread", skip_single=True)},
    ]


def _single(records, mode) -> bool:
    return any(r.get("type") == "summary" and r.get("mode") == mode and r["ranks"] == 1
               for r in records)


def _colours(records) -> dict:
    from distbn.bench.png import PALETTE

    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(_modes(records))}


def write_plot(records, path, backend="auto") -> str:
    """Draw the study's curves (loss, accuracy, test accuracy, divergences) into a PNG.

    Args:
        records: from `read_records`.
        path: the PNG to write.
        backend: "auto" (matplotlib when it imports, else the built-in renderer),
            "matplotlib" or "builtin".

    Returns:
        The backend used: "matplotlib" or "builtin".
    """
    if backend not in ("auto", "matplotlib", "builtin"):
        raise ValueError(f"backend must be 'auto', 'matplotlib' or 'builtin', got {backend!r}")
    if backend != "builtin":
        try:
            import matplotlib

            matplotlib.use("Agg")  # files only: no display needed
            import matplotlib.pyplot as plt
        except ImportError:
            if backend == "matplotlib":
                raise
        else:
            _plot_matplotlib(plt, records, path)
            return "matplotlib"
    _plot_builtin(records, path)
    return "builtin"


def _plot_builtin(records, path) -> None:
    from distbn.bench import png

    colours = _colours(records)
    panels = []
    for spec in _curves(records):
        # The reference is drawn thin, over the synchronized run it should coincide with.
        series = [png.Series(m, list(x), list(y), colours[m], markers=kind == "points",
                             width=1 if m == "reference" else 2)
                  for m, x, y, kind in spec["series"]]
        panels.append(png.Panel(spec["title"], series, ylabel=spec["ylabel"]))
    legend = [(m, c) for m, c in colours.items()]
    fig = png.Figure(panels, cols=3, panel_size=(420, 300),
                     title="REPLICA-LOCAL VS SYNCHRONIZED BN", legend=legend)
    png.write_png(path, fig.render())


def _plot_matplotlib(plt, records, path) -> None:
    colours = {m: tuple(v / 255 for v in c) for m, c in _colours(records).items()}
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, spec in zip(axes.ravel(), _curves(records), strict=True):
        for m, x, y, kind in spec["series"]:
            style = "o-" if kind == "points" else "-"
            ax.plot(x, y, style, color=colours[m], label=m, lw=0.8 if m == "reference" else 1.6,
                    ms=4)
        ax.set_title(spec["title"].capitalize(), fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(spec["ylabel"])
        ax.grid(alpha=0.3)
        if spec["series"]:
            ax.legend(fontsize=8)
    fig.suptitle("Replica-local vs synchronized BatchNormalization statistics")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(records, out_dir) -> list[Path]:
    """Write report.md and report.png into `out_dir`.

    Args:
        records: from `read_records`.
        out_dir: the study directory.

    Returns:
        The two paths.
    """
    out_dir = Path(out_dir)
    md = out_dir / REPORT_FILE
    md.write_text(render_markdown(records), encoding="utf-8")
    plot = out_dir / PLOT_FILE
    write_plot(records, plot)
    return [md, plot]
