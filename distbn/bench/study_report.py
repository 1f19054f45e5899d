"""The report of `distbn compare`: DIR/report.md and the figures from DIR/study.jsonl.

The records (`study` writes them) are a "meta" line, then per seed and mode "step"
records (training loss/accuracy of the window, batch-statistics divergence,
moving-statistics spread), "eval" records (test loss/accuracy) and one "summary" (with
the EMA and PreciseBN evaluations and the normalization batch size). Every number of the
tables is the mean +- std over seeds (std with ddof=1; one seed: the value alone); the
per-seed values stay in study.jsonl. A difference is called significant only when it
exceeds the spread: |mean_a - mean_b| > std_a + std_b, with at least two seeds on each
side. The figures are drawn by `distbn.plot` (`study_figure`: curves of the first seed;
`batch_figure`: error against normalization batch size); without matplotlib the report
has the tables and says how to get them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

__all__ = ["REPORT_FILE", "PLOT_FILE", "BATCH_PLOT_FILE", "OUTPUT_FILES", "read_records",
           "summaries", "seed_summaries", "mean_std", "significant", "per_replica_batch",
           "render_table", "render_batch_table", "render_markdown", "write_plot",
           "write_batch_plot", "write_report"]

REPORT_FILE = "report.md"
PLOT_FILE = "report.png"
BATCH_PLOT_FILE = "error-vs-batch.png"
#: Every file the report writes (a new study removes the old ones first).
OUTPUT_FILES = (REPORT_FILE, PLOT_FILE, BATCH_PLOT_FILE)
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
    """Modes in report order: the order the study trained them (its meta record), then
    the reference; older records: replica-local, synchronized, reference, the rest."""
    found = list(dict.fromkeys(r["mode"] for r in records if "mode" in r))
    meta = next((r for r in records if r.get("type") == "meta"), {})
    first = [m for m in meta.get("modes", ()) if m in found]
    if not first:
        first = [m for m in _MODE_ORDER if m in found]
    rest = [m for m in found if m not in first and m != "reference"]
    return first + sorted(rest) + (["reference"] if "reference" in found and
                                   "reference" not in first else [])


def seed_summaries(records) -> dict:
    """The summary records of each mode, one per seed, in report order.

    Args:
        records: from `read_records`.

    Returns:
        {mode: [summary dict, ...]} (seeds in the order trained).
    """
    by_mode: dict = {}
    for r in records:
        if r.get("type") == "summary":
            by_mode.setdefault(r["mode"], []).append(r)
    return {m: by_mode[m] for m in _modes(records) if m in by_mode}


def summaries(records) -> dict:
    """The summary record of each mode (its first seed's), in report order.

    Args:
        records: from `read_records`.

    Returns:
        {mode: summary dict}.
    """
    return {m: rs[0] for m, rs in seed_summaries(records).items()}


def mean_std(values) -> tuple:
    """Mean and sample standard deviation (ddof=1) over seeds.

    Args:
        values: numbers; None and non-finite entries are left out.

    Returns:
        (mean, std, n): mean None when nothing is left, std None with fewer than two.
    """
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return None, None, 0
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None), len(v)


def significant(a, b) -> bool | None:
    """Whether two (mean, std, n) differ by more than their spread.

    The rule: |mean_a - mean_b| > std_a + std_b. Needs at least two seeds on each side.

    Returns:
        True or False; None when it cannot be decided (a mean missing, or one seed).
    """
    if a[0] is None or b[0] is None or a[1] is None or b[1] is None:
        return None
    return abs(a[0] - b[0]) > a[1] + b[1]


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


def _cell(values, spec, scale=1.0) -> str:
    """One table cell: the value (one seed) or "mean ± std" over seeds."""
    mean, std, n = mean_std(values)
    if mean is None:
        return "–"
    text = format(mean * scale, spec)
    return text if n < 2 else f"{text} ± {format(std * scale, spec)}"


def render_table(records) -> str:
    """The one-row-per-mode markdown table (mean ± std over seeds).

    Args:
        records: from `read_records`.

    Returns:
        The table (header, separator, rows).
    """
    head = ("| mode | ranks x batch | train loss | train acc | train acc (inference) | "
            "test loss | test acc | batch-stat mean dev | var ratio | moving-mean spread "
            "| train time |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for mode, rs in seed_summaries(records).items():
        s = rs[0]
        # Nothing to compare across a single replica, nor without batch statistics.
        none = s["ranks"] == 1 or s.get("mean_dev") is None
        per = per_replica_batch(s["global_batch_size"], s["ranks"])

        def cell(key, spec, rs=rs):
            return _cell([r.get(key) for r in rs], spec)

        lines.append(
            f"| {mode} | {s['ranks']} x {per} | {cell('train_loss', '.4f')} | "
            f"{cell('train_accuracy', '.4f')} | {cell('train_eval_accuracy', '.4f')} | "
            f"{cell('test_loss', '.4f')} | {cell('test_accuracy', '.4f')} | "
            f"{'–' if none else cell('mean_dev', '.3f')} | "
            f"{'–' if none else cell('var_ratio', '.3f')} | "
            f"{'–' if none else cell('moving_mean_spread', '.3g')} | "
            f"{cell('train_seconds', '.1f')} s |")
    return "\n".join(lines)


def _error(acc):
    return None if acc is None else 1.0 - acc


def _seed_metrics(s) -> dict:
    """Per-seed derived numbers of one summary (errors as fractions)."""
    test_e, train_e = _error(s.get("test_accuracy")), _error(s.get("train_eval_accuracy"))
    ptest_e = _error(s.get("precise_test_accuracy"))
    ptrain_e = _error(s.get("precise_train_eval_accuracy"))
    train_t = _error(s.get("train_accuracy"))
    return {
        "test_ema": test_e, "test_precise": ptest_e,
        "train_ema": train_e, "train_precise": ptrain_e,
        "gap_ema": None if None in (test_e, train_e) else test_e - train_e,
        "gap_precise": None if None in (ptest_e, ptrain_e) else ptest_e - ptrain_e,
        "train_training": train_t,
        # Wu & Johnson's train-test inconsistency: how much worse the model is on its own
        # training data in inference mode (these statistics) than in training mode (the
        # batch statistics it was trained with). A lagging EMA makes it large; PreciseBN's
        # population statistics of the final weights should close it.
        "incons_ema": None if None in (train_e, train_t) else train_e - train_t,
        "incons_precise": None if None in (ptrain_e, train_t) else ptrain_e - train_t,
        "precise_minus_ema": None if None in (ptest_e, test_e) else ptest_e - test_e,
    }


def batch_rows(records) -> list[dict]:
    """Per mode (the reference left out): the normalization batch and every derived
    number as (mean, std, n) over seeds, sorted by normalization batch size with the
    per-sample modes last.

    Args:
        records: from `read_records`.

    Returns:
        [{"mode", "norm_batch", "norm_batch_text", "seeds", "bn", metric: (mean, std, n)}].
    """
    rows = []
    for mode, rs in seed_summaries(records).items():
        if mode == "reference" or "norm_batch_text" not in rs[0]:
            continue
        per_seed = [_seed_metrics(r) for r in rs]
        row = {"mode": mode, "norm_batch": rs[0]["norm_batch"],
               "norm_batch_text": rs[0]["norm_batch_text"], "seeds": len(rs),
               "bn": rs[0].get("mean_dev") is not None,
               "spread": mean_std([r.get("moving_mean_spread") for r in rs])}
        for key in per_seed[0]:
            row[key] = mean_std([m[key] for m in per_seed])
        rows.append(row)
    return sorted(rows, key=lambda r: (r["norm_batch"] is None, r["norm_batch"] or 0))


def _pct(ms) -> str:
    mean, std, n = ms
    if mean is None:
        return "–"
    return f"{100 * mean:.2f}" if n < 2 else f"{100 * mean:.2f} ± {100 * std:.2f}"


def render_batch_table(records) -> str:
    """Test error (EMA and PreciseBN) against normalization batch size, with the
    generalization gaps, the moving-statistics spread and the train-test inconsistencies;
    "" for records without it.

    Args:
        records: from `read_records`.

    Returns:
        The markdown table (errors in %, mean ± std over seeds).
    """
    rows = batch_rows(records)
    if not rows:
        return ""
    lines = ["| mode | norm. batch | seeds | test err EMA | test err PreciseBN | PreciseBN - "
             "EMA | train err EMA (inference) | gap EMA | train err PreciseBN (inference) "
             "| gap PreciseBN | train err (training mode) | moving-mean spread "
             "| inconsistency EMA | inconsistency PreciseBN |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        spread = r["spread"]
        lines.append(
            f"| {r['mode']} | {r['norm_batch_text']} | {r['seeds']} | {_pct(r['test_ema'])} | "
            f"{_pct(r['test_precise'])} | {_pct(r['precise_minus_ema'])} | "
            f"{_pct(r['train_ema'])} | {_pct(r['gap_ema'])} | {_pct(r['train_precise'])} | "
            f"{_pct(r['gap_precise'])} | {_pct(r['train_training'])} | "
            f"{'–' if spread[0] is None else _cell([spread[0]], '.3g')}"
            f"{'' if spread[1] is None else f' ± {spread[1]:.2g}'} | "
            f"{_pct(r['incons_ema'])} | {_pct(r['incons_precise'])} |")
    return "\n".join(lines)


def _verdict(a, b) -> str:
    sig = significant(a, b)
    return {True: "significant", False: "within the spread",
            None: "one seed: not decided"}[sig]


def _closed(r) -> str:
    """How PreciseBN changes the EMA's train-test inconsistency of one mode (", ..." or "")."""
    ie, ip = r["incons_ema"], r["incons_precise"]
    if ie[0] is None or ip[0] is None:
        return ""
    moved = f"{_pct(ie)} -> {_pct(ip)} points, {_verdict(ip, ie)}"
    if ie[0] <= 0:
        return f"; the EMA has no train-test inconsistency to close ({moved})"
    if abs(ip[0]) < ie[0]:
        return (f"; it closes {100 * (ie[0] - abs(ip[0])) / ie[0]:.0f}% of the EMA "
                f"train-test inconsistency ({moved})")
    return f"; it does not close the EMA train-test inconsistency ({moved})"


def _findings(records) -> list[str]:
    """The comparisons the study exists for, each with its significance."""
    rows = batch_rows(records)
    bn = [r for r in rows if r["bn"] and r["test_ema"][0] is not None]
    if len(rows) < 2 and not any(r["test_precise"][0] is not None for r in bn):
        return []
    out = ["## Findings", "",
           "Significance rule: a difference between two numbers is called significant "
           "only when |mean_a - mean_b| > std_a + std_b (std over seeds, ddof=1), which "
           "needs at least two seeds.", ""]
    for key, what in (("test_ema", "EMA"), ("test_precise", "PreciseBN")):
        have = [r for r in bn if r[key][0] is not None]
        if len(have) < 2:
            continue
        best = min(have, key=lambda r: r[key][0])
        out.append(f"- Test error ({what}) is lowest at normalization batch "
                   f"{best['norm_batch_text']} ({best['mode']}, {_pct(best[key])}%).")
        small, large = have[0], have[-1]
        ends = []
        for end, name in ((small, "smallest"), (large, "largest")):
            if end is best:
                continue
            ends.append(f"the {name} BN batch ({end['norm_batch_text']}, {end['mode']}) is "
                        f"{100 * (end[key][0] - best[key][0]):+.2f} points "
                        f"({_verdict(end[key], best[key])})")
        if ends:
            out.append("  Against it, " + "; ".join(ends) + ".")
        u = len(ends) == 2 and all(significant(e[key], best[key]) for e in (small, large))
        out.append(f"  U-shape in {what} test error: "
                   f"{'yes (both ends significantly higher)' if u else 'not shown'}.")
    for r in bn:
        if r["test_precise"][0] is None:
            continue
        closed = _closed(r)
        out.append(f"- {r['mode']} (batch {r['norm_batch_text']}): PreciseBN minus EMA test "
                   f"error {_pct(r['precise_minus_ema'])} points "
                   f"({_verdict(r['test_precise'], r['test_ema'])}){closed}.")
    for r in rows:
        if r["bn"] or r["test_ema"][0] is None or not bn:
            continue
        best = min(bn, key=lambda b: b["test_ema"][0])
        out.append(f"- {r['mode']} (per-sample statistics): test error {_pct(r['test_ema'])}%, "
                   f"{100 * (r['test_ema'][0] - best['test_ema'][0]):+.2f} points against "
                   f"the best BN mode ({best['mode']}; "
                   f"{_verdict(r['test_ema'], best['test_ema'])}).")
    return out + [""]


def _differences(records) -> list[str]:
    """One line per comparison worth stating: replica-local and the reference against
    synchronized (means over seeds)."""
    groups = seed_summaries(records)
    if "synchronized" not in groups:
        return []

    def means(mode):
        rs = groups[mode]
        return tuple(mean_std([r.get(k) for r in rs])[0] for k in ("test_accuracy",
                                                                    "test_loss"))

    sync = means("synchronized")
    out = []
    for mode, why in (("replica-local", ""),
                      ("reference", " (the same arithmetic up to float32 rounding, whose "
                                    "differences grow over many steps: a scale for run-to-run "
                                    "noise)")):
        if mode not in groups:
            continue
        mine = means(mode)
        if None in mine or None in sync:
            continue
        out.append(f"- {mode} minus synchronized: test accuracy "
                   f"{mine[0] - sync[0]:+.4f}, test loss {mine[1] - sync[1]:+.4f}{why}.")
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
    seeds = meta.get("seeds") or sorted({r["seed"] for r in records if "seed" in r})
    lines = ["# Normalization statistics: replica-local, synchronized and other groups"
             if len(sums) > 3 or set(sums) - set(_MODE_ORDER)
             else "# Replica-local vs synchronized BatchNormalization statistics", ""]
    if meta:
        lines += [f"Command: `{meta.get('command', '')}`  ", f"Date: {meta.get('date', '')}, "
                  f"distbn {meta.get('distbn', '')}", ""]
    if first is not None:
        lines += [f"{first['steps']} steps at global batch {first['global_batch_size']}; "
                  f"statistics measured every {first['every']} step(s). Same seed, data "
                  "order and global batch in every mode; gradients are all-reduced in every "
                  "multi-rank mode, so they differ only in the statistics the normalization "
                  "layers use." + (f" Seeds {', '.join(map(str, seeds))}: every number is "
                                   "mean ± std over seeds (std with ddof=1); per-seed values "
                                   "in study.jsonl." if len(seeds) > 1 else ""), ""]
    batch_table = render_batch_table(records)
    if batch_table:
        lines += ["## Test error against normalization batch size", "",
                  f"Errors in % ({meta.get('precise_bn_samples', 'n/a')} training samples "
                  "for PreciseBN).", "", batch_table, "",
                  "- norm. batch: samples per normalization group in training: the "
                  "per-replica batch (replica-local), K x per-replica (sync:K), the global "
                  "batch (synchronized), S (ghost:S); per-sample for GroupNorm/LayerNorm.",
                  "- EMA: the moving statistics training left (averaged over replicas, what "
                  "model.npz holds); PreciseBN: population statistics of the training "
                  "samples above, recomputed with frozen weights and pooled over all ranks, "
                  "on a copy (training is unaffected).",
                  "- train err (inference): the whole training split in inference mode with "
                  "those statistics; gap (generalization) = test err - train err "
                  "(inference), per seed. train err (training mode): the last tenth of the "
                  "steps, batch statistics.",
                  "- inconsistency (Wu & Johnson's train-test inconsistency) = train err "
                  "(inference) with those statistics - train err (training mode), per seed: "
                  "how much worse the model does on its training data at test time than "
                  "with the batch statistics it trains with. PreciseBN closes the share of "
                  "the EMA's that |inconsistency PreciseBN| no longer has.", "",
                  *_findings(records)]
    lines += ["## Per mode" if batch_table else "", "" if batch_table else "",
              render_table(records), "", *_differences(records),
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
        batch = (f"; error against normalization batch: [{BATCH_PLOT_FILE}]({BATCH_PLOT_FILE})"
                 if batch_table else "")
        lines += ["", f"Curves: [{PLOT_FILE}]({PLOT_FILE}){batch}; every record: "
                  "study.jsonl.", ""]
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
    """What each panel shows: [{"title", "ylabel", "series": [(mode, x, y, kind)]}]
    (the first seed's records)."""
    seeds = [r["seed"] for r in records if "seed" in r]
    if seeds:
        records = [r for r in records if r.get("seed", seeds[0]) == seeds[0]]
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
            if not rs or (skip_single and _single(records, m)) or rs[0].get(key) is None:
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


def write_batch_plot(records, path) -> Path | None:
    """Draw test error and the train-test inconsistency (EMA, PreciseBN) against the
    normalization batch size, the per-sample modes as levels.

    Args:
        records: from `read_records`.
        path: the PNG to write.

    Returns:
        The path, or None when matplotlib is not installed or the records have no
        normalization batch sizes (nothing written).
    """
    from distbn.plot import batch_figure, have_matplotlib

    rows = batch_rows(records)
    if not rows or not have_matplotlib():
        return None
    bn = [r for r in rows if r["norm_batch"] is not None]
    per_sample = [r for r in rows if r["norm_batch"] is None]

    def series(key, name):
        have = [r for r in bn if r[key][0] is not None]
        if not have:
            return []
        return [(name, [r["norm_batch"] for r in have], [100 * r[key][0] for r in have],
                 [100 * (r[key][1] or 0.0) for r in have])]

    def levels(key):
        return [(r["mode"], 100 * r[key][0], 100 * (r[key][1] or 0.0)) for r in per_sample
                if r[key][0] is not None]

    panels = [
        {"title": "Test error (mean ± std over seeds)", "ylabel": "test error (%)",
         "series": series("test_ema", "EMA") + series("test_precise", "PreciseBN"),
         "levels": levels("test_ema")},
        {"title": "Train-test inconsistency",
         "ylabel": "train error: inference - training mode (points)",
         "series": series("incons_ema", "EMA") + series("incons_precise", "PreciseBN"),
         "levels": levels("incons_ema")},
    ]
    return batch_figure(panels, path, "Error against normalization batch size")


def write_report(records, out_dir) -> list[Path]:
    """Write report.md and (with matplotlib) report.png and error-vs-batch.png into
    `out_dir`.

    Args:
        records: from `read_records`.
        out_dir: the study directory.

    Returns:
        The paths written.
    """
    out_dir = Path(out_dir)
    plot = write_plot(records, out_dir / PLOT_FILE)
    batch = write_batch_plot(records, out_dir / BATCH_PLOT_FILE)
    md = out_dir / REPORT_FILE
    md.write_text(render_markdown(records, plot=plot is not None), encoding="utf-8")
    return [p for p in (md, plot, batch) if p is not None]
