"""Benchmark results: records, results.json files, and merging them (see environment.py).

`results.json` is `{"environment": {...}, "records": [record, ...]}` where a record is

    {"name": "kernel.forward", "metric": "time", "value": 1234.5, "unit": "us",
     "world_size": 1, "params": {"shape": [64, 32, 32, 64], ...},
     "spread": {"min", "max", "q1", "q3", "iqr", "stdev", "repeats", "warmup"}}

`value` is the median of `spread["repeats"]` samples (warm-up calls excluded). Records
merged from several result directories also carry `"source"`, the directory's label.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from distbn.bench.timing import Stats

__all__ = ["RECORD_KEYS", "SPREAD_KEYS", "make_record", "validate_record", "validate_results",
           "write_results", "read_results", "merge_results"]

RECORD_KEYS = ("name", "metric", "value", "unit", "world_size", "params", "spread")
SPREAD_KEYS = ("min", "max", "iqr", "stdev", "repeats")
RESULTS_FILE = "results.json"


def _plain(value):
    """JSON-friendly copy of a params value (numpy scalars and tuples become plain)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return value.item()
    return value


def make_record(name: str, metric: str, stats: Stats, unit: str, world_size: int,
                params: dict | None = None, warmup: int | None = None) -> dict:
    """One measurement as a results.json record.

    Args:
        name: what was measured, "<suite>.<measurement>" (e.g. "allreduce.bucket").
        metric: which quantity (e.g. "time", "bandwidth", "torch_ratio").
        stats: the samples' `Stats`, already in `unit`; the value is their median.
        unit: e.g. "us", "GB/s", "ratio", "samples/s", "MiB".
        world_size: the number of ranks that took part.
        params: what identifies the case (shape, dtype, bytes, ...).
        warmup: untimed calls before the samples, recorded in the spread.

    Returns:
        The record dict.
    """
    return {
        "name": name,
        "metric": metric,
        "value": stats.median,
        "unit": unit,
        "world_size": int(world_size),
        "params": _plain(dict(params or {})),
        "spread": stats.spread(warmup),
    }


def validate_record(rec) -> None:
    """Check one record against the schema; raise ValueError naming the problem.

    Args:
        rec: a record dict as read from results.json.
    """
    if not isinstance(rec, dict):
        raise ValueError(f"a record must be a JSON object, got {rec!r}")
    missing = [k for k in RECORD_KEYS if k not in rec]
    if missing:
        raise ValueError(f"record {rec.get('name')!r} lacks {missing}: {rec!r}")
    for key in ("name", "metric", "unit"):
        if not isinstance(rec[key], str) or not rec[key]:
            raise ValueError(f"record {key} must be a non-empty string, got {rec[key]!r}")
    if not isinstance(rec["value"], (int, float)) or isinstance(rec["value"], bool):
        raise ValueError(f"record {rec['name']!r}/{rec['metric']!r}: value must be a number, "
                         f"got {rec['value']!r}")
    ws = rec["world_size"]
    if not isinstance(ws, int) or isinstance(ws, bool) or ws < 1:
        raise ValueError(f"record {rec['name']!r}: world_size must be an int >= 1, got {ws!r}")
    if not isinstance(rec["params"], dict):
        raise ValueError(f"record {rec['name']!r}: params must be an object, "
                         f"got {rec['params']!r}")
    spread = rec["spread"]
    if not isinstance(spread, dict) or any(k not in spread for k in SPREAD_KEYS):
        raise ValueError(f"record {rec['name']!r}: spread must have {list(SPREAD_KEYS)}, "
                         f"got {spread!r}")
    if not isinstance(spread["repeats"], int) or spread["repeats"] < 1:
        raise ValueError(f"record {rec['name']!r}: spread.repeats must be an int >= 1, "
                         f"got {spread['repeats']!r}")


def validate_results(results) -> None:
    """Check a whole results.json object (environment dict + valid records)."""
    if not isinstance(results, dict) or not isinstance(results.get("environment"), dict) \
            or not isinstance(results.get("records"), list):
        raise ValueError("results must be {'environment': {...}, 'records': [...]}, got "
                         f"keys {sorted(results) if isinstance(results, dict) else results!r}")
    for rec in results["records"]:
        validate_record(rec)


# --- files ---------------------------------------------------------------------------------

def write_results(out_dir, environment_: dict, records: list) -> Path:
    """Write `out_dir/results.json` (atomically: a reader never sees half a file).

    Args:
        out_dir: the directory (created if missing).
        environment_: the environment dict.
        records: the records.

    Returns:
        The path written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"environment": environment_, "records": list(records)}
    validate_results(results)
    path = out_dir / RESULTS_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_results(path) -> dict:
    """Read and check a results.json, given the file or the directory holding it.

    Args:
        path: a results.json file or a directory containing one.

    Returns:
        The results dict. Raises FileNotFoundError / ValueError quoting the path.
    """
    path = Path(path)
    file = path / RESULTS_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no {RESULTS_FILE} in {str(path)!r} (looked for {str(file)!r})")
    try:
        results = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(file)!r} is not valid JSON: {err}") from None
    try:
        validate_results(results)
    except ValueError as err:
        raise ValueError(f"{str(file)!r}: {err}") from None
    return results


def merge_results(parts: list[tuple[str, dict]], tag_sources: bool = True) -> dict:
    """Merge several results into one: every record, and one environment.

    Environment fields equal in every part stay at the top level; `hosts` becomes the
    union; the rest (date, world size, ranks, ...) goes, per part, into `runs`.

    Args:
        parts: (label, results) pairs, e.g. (directory name, read_results(dir)).
        tag_sources: add `"source": label` to every record (for jobs run separately).

    Returns:
        A results dict.
    """
    if not parts:
        raise ValueError("merge_results needs at least one results object, got none")
    envs = [res["environment"] for _, res in parts]
    keys = [k for k in envs[0] if all(k in e and e[k] == envs[0][k] for e in envs[1:])]
    merged_env = {k: envs[0][k] for k in keys if k != "runs"}
    merged_env["hosts"] = sorted({h for e in envs for h in e.get("hosts", [])})
    runs = []
    for (label, _res), env in zip(parts, envs, strict=True):
        if "runs" in env:  # already a merge: its runs, with what the merge held above them
            above = {k: v for k, v in env.items() if k not in merged_env and k != "runs"}
            runs += [{**above, **r, "source": f"{label}/{r['source']}" if r.get("source")
                      else label} for r in env["runs"]]
        else:
            runs.append({"source": label,
                         **{k: v for k, v in env.items() if k not in merged_env}})
    merged_env["runs"] = runs
    records = []
    for label, res in parts:
        for rec in res["records"]:
            rec = dict(rec)
            if tag_sources:
                rec.setdefault("source", label)
            records.append(rec)
    return {"environment": merged_env, "records": records}
