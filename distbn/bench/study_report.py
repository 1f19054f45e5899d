"""The report of `distbn compare`: DIR/report.md and DIR/report.png from DIR/study.jsonl.

The records (`study` writes them) are a "meta" line, then per mode "step" records
(training loss/accuracy of the window, batch-statistics divergence, moving-statistics
spread), "eval" records (test loss/accuracy) and one "summary". The figure is drawn by
`distbn.plot.study_figure` (matplotlib); without matplotlib the report has the tables and
says how to get it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

__all__ = ["REPORT_FILE", "PLOT_FILE", "read_records", "summaries", "per_replica_batch",
           "render_table", "render_markdown", "write_plot", "write_report"]

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
    from distbn.jsonl import read_jsonl

    return read_jsonl(path)


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


def per_replica_batch(global_batch: int, ranks: int) -> str:
    """The per-replica batch sizes as the ranks really get them: "4", or "21-22" when the
    global batch does not divide (`shard_slice` gives the first ranks one sample more).

    Args:
        global_batch: the global batch size.
        ranks: the number of replicas (>= 1).

    Returns:
        The text.
    """
    low, rem = divmod(int(global_batch), int(ranks))
    return f"{low}" if rem == 0 else f"{low}-{low + 1}"


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
        per = per_replica_batch(s["global_batch_size"], s["ranks"])
        lines.append(
            f"| {mode} | {s['ranks']} x {per} | {_num(s['train_loss'], '.4f')} | "
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


def render_markdown(records, plot: bool = True) -> str:
    """The whole report.md.

    Args:
        records: from `read_records`.
        plot: whether report.png is written beside it (else a line says how to get it).

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
    if plot:
        lines += ["", f"Curves: [{PLOT_FILE}]({PLOT_FILE}); every record: study.jsonl.", ""]
    else:
        from distbn.plot import NO_MATPLOTLIB

        lines += ["", f"Every record: study.jsonl. No curves: {NO_MATPLOTLIB}.", ""]
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
        {"title": "Training loss (smoothed)", "ylabel": "loss", "series": line("loss")},
        {"title": "Training accuracy (smoothed)", "ylabel": "accuracy",
         "series": line("accuracy")},
        {"title": "Test accuracy (averaged moving stats)", "ylabel": "accuracy",
         "series": points("accuracy")},
        {"title": "Batch mean dev max_r |mu_r - mu| / sigma", "ylabel": "first BN layer",
         "series": line("mean_dev", skip_single=True)},
        {"title": "Batch var ratio var_r / var", "ylabel": "first BN layer, mean over ranks",
         "series": line("var_ratio", skip_single=True)},
        {"title": "Moving-mean spread across replicas", "ylabel": "max over layers (smoothed)",
         "series": line("moving_mean_spread", skip_single=True)},
    ]


def _single(records, mode) -> bool:
    return any(r.get("type") == "summary" and r.get("mode") == mode and r["ranks"] == 1
               for r in records)


def write_plot(records, path) -> Path | None:
    """Draw the study's curves (loss, accuracy, test accuracy, divergences) into a PNG.

    Args:
        records: from `read_records`.
        path: the PNG to write.

    Returns:
        The path, or None when matplotlib is not installed (nothing written).
    """
    from distbn.plot import study_figure

    return study_figure(_curves(records), path,
                        "Replica-local vs synchronized BatchNormalization statistics")


def write_report(records, out_dir) -> list[Path]:
    """Write report.md and (with matplotlib) report.png into `out_dir`.

    Args:
        records: from `read_records`.
        out_dir: the study directory.

    Returns:
        The paths written.
    """
    out_dir = Path(out_dir)
    plot = write_plot(records, out_dir / PLOT_FILE)
    md = out_dir / REPORT_FILE
    md.write_text(render_markdown(records, plot=plot is not None), encoding="utf-8")
    return [md] if plot is None else [md, plot]
