"""report.md (tables) from benchmark results, and merging result directories.

Cells show the median; `±x%` after a time or throughput is its interquartile range
relative to the median. Records of names no table knows are listed at the end, so
nothing measured is left out.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["render_markdown", "render_summary", "write_report", "merge_dirs"]

REPORT_FILE = "report.md"
_KNOWN = ("kernel.", "allreduce.", "sync.", "scaling.", "step.")


# --- formatting ------------------------------------------------------------------------------

def _time(us: float) -> str:
    size = abs(us)  # overheads can be negative (noise)
    if size >= 1e6:
        return f"{us / 1e6:.2f} s"
    if size >= 1e3:
        return f"{us / 1e3:.2f} ms"
    return f"{us:.1f} µs" if size >= 10 else f"{us:.2f} µs"


def _spread_pct(rec) -> str:
    v = rec["value"]
    if not v or rec["spread"]["repeats"] < 2:
        return ""
    return f" ±{abs(rec['spread']['iqr'] / v) * 100:.0f}%"


def _cell(rec, with_spread: bool = False) -> str:
    """One table cell for a record (its median, in a readable unit)."""
    if rec is None:
        return "–"
    v, unit = rec["value"], rec["unit"]
    if unit == "us":
        text = _time(v)
    elif unit == "GB/s":
        text = f"{v:.2f}" if v < 100 else f"{v:.0f}"
    elif unit == "samples/s":
        text = f"{v:.0f}"
    elif unit == "MiB":
        text = f"{v:.1f} MiB"
    elif unit == "ratio":
        text = f"{v:.2f}"
    else:
        text = f"{v:.4g} {unit}"
    return text + (_spread_pct(rec) if with_spread else "")


def _pct(rec) -> str:
    return "–" if rec is None else f"{rec['value'] * 100:.0f}%"


def _shape(params) -> str:
    return "×".join(str(d) for d in params.get("shape", [])) or "–"


def _bytes(n) -> str:
    if n >= 2**20:
        return f"{n / 2**20:g} MiB"
    if n >= 1024:
        return f"{n / 1024:g} KiB"
    return f"{n} B"


def _table(headers, rows) -> list[str]:
    if not rows:
        return []
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out + [""]


# --- grouping --------------------------------------------------------------------------------

def _freeze(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _rows(records, prefix, multi_source):
    """Group records named `prefix*` into rows: {(name, ws, source, params): {metric: rec}},
    in first-seen order."""
    rows: dict = {}
    for rec in records:
        if not rec["name"].startswith(prefix):
            continue
        key = (rec["name"], rec["world_size"], rec.get("source") if multi_source else None,
               _freeze(rec["params"]))
        rows.setdefault(key, {"params": rec["params"], "source": rec.get("source")})
        rows[key][rec["metric"]] = rec
    return rows


# --- sections --------------------------------------------------------------------------------

def _backend(info) -> str | None:
    """"numba 0.61 (1 thread)" from a kernel_backend_info dict."""
    if not isinstance(info, dict) or not info.get("name"):
        return None
    name = info["name"]
    if info.get("numba"):
        name += f" {info['numba']}" if name == "numba" else f" (numba {info['numba']})"
    extra = [f"{info['threads']} thread(s)"] if info.get("threads") else []
    if info.get("fallback"):
        extra.append(f"fallback: {info['fallback']}")
    return name + (f", {', '.join(extra)}" if extra else "")


def _loads(env, runs) -> str:
    """"n=1: 0.2 → 0.9; n=2: ..." from the runs' load averages (other work skews timings)."""
    loads = []
    for run in runs or [env]:
        start = run.get("load_average", env.get("load_average"))
        end = run.get("load_average_end", env.get("load_average_end"))
        if start:
            ws = run.get("world_size", env.get("world_size"))
            where = f"n={ws}: " if runs and ws else ""
            loads.append(f"{where}{start[0]:g}" + (f" → {end[0]:g}" if end else ""))
    return "; ".join(loads)


def _environment(env) -> list[str]:
    runs = env.get("runs") or []

    def field(key):
        if key in env:
            return env[key]
        vals = {str(r.get(key)) for r in runs if r.get(key) is not None}
        return ", ".join(sorted(vals)) if vals else None

    threads = field("threads")
    if isinstance(threads, dict):
        set_ = [f"{k}={v}" for k, v in threads.items() if k != "cpu_count" and v is not None]
        threads = (", ".join(set_) or "none set") + f" (CPUs: {threads.get('cpu_count')})"
    rev = field("git_revision")
    world = sorted({r.get("world_size") for r in runs if r.get("world_size")}) or \
        [env.get("world_size")]
    rows = [
        ("date", field("date")),
        ("CPU model", field("cpu_model")),
        ("hosts", ", ".join(env.get("hosts", [])) or None),
        ("world sizes", ", ".join(str(w) for w in world if w is not None)),
        ("MPI library", field("mpi_library")),
        ("mpi4py", field("mpi4py")),
        ("numpy (BLAS)", f"{field('numpy')} ({field('blas')})"),
        ("python", field("python")),
        ("distbn", f"{field('distbn')} (git {rev[:12] if rev else 'n/a'}"
                   f"{' + uncommitted changes' if field('git_dirty') is True else ''})"),
        ("BN kernel backend", _backend(field("kernel_backend_info"))
         or field("kernel_backend")),
        ("torch", field("torch") or "not installed"),
        ("threads", threads),
        ("load average (1 min, start → end)", _loads(env, runs) or None),
        ("platform", field("platform")),
        ("command", field("command")),
    ]
    return _table(["", ""], [(k, f"`{v}`" if k == "command" else v) for k, v in rows
                            if v is not None])


def _kernel(records, multi, compact=False) -> list[str]:
    out = []
    for row in _rows(records, "kernel.copy", multi).values():
        rec = row.get("bandwidth")
        if rec and "shape" not in rec["params"]:  # results before the copy was per case
            src = f" ({row['source']})" if multi else ""
            out.append(f"Copy bandwidth{src}: **{_cell(rec, True)} GB/s** "
                       f"(`np.copyto` of {rec['params'].get('array_mib', 0):g} MiB, "
                       f"{rec['spread']['repeats']} repeats).")
    for row in _rows(records, "kernel.cold_start", multi).values():
        rec = row.get("compile_time")
        if rec:
            p = rec["params"]
            out.append(f"Cold start: {p.get('processes')} processes compiling at once from an "
                       f"empty numba cache took up to {rec['spread']['max']:.1f} s each "
                       f"(wall {p.get('wall_s', 0):.1f} s).")
    if out:
        out.append("")
    rows = []
    for (name, _ws, _s, _p), row in _rows(records, "kernel.", multi).items():
        p = row["params"]
        if name == "kernel.cold_start" or (name == "kernel.copy" and "shape" not in p):
            continue
        mem = row.get("peak_extra_memory")
        mem_cell = "–"
        if mem is not None:
            inp = p.get("input_bytes", 0) / 2**20
            mem_cell = _cell(mem) + (f" ({mem['value'] / inp:.1f}× input)" if inp else "")
        of_copy = "100%" if name == "kernel.copy" else _pct(row.get("copy_fraction"))
        if row.get("two_pass_copy_fraction"):
            of_copy += f" (2 passes {_pct(row['two_pass_copy_fraction'])})"
        label = name.split(".", 1)[1].replace("_", "+")
        if row.get("plain_ratio"):  # a layer variant: renorm, ghost batches
            label += f" fwd+bwd ({_cell(row['plain_ratio'])}× plain)"
        cells = [label, _shape(p), p.get("dtype"),
                 p.get("layout"), p.get("threads", "–"), _cell(row.get("time"), True),
                 _cell(row.get("bandwidth")), of_copy, _cell(row.get("torch_time"), True),
                 _cell(row.get("torch_bandwidth")), _cell(row.get("torch_ratio")), mem_cell]
        if compact:
            del cells[11], cells[9]
        rows.append(([row.get("source") or "–"] if multi else []) + cells)
    if rows and not compact:
        backend = next(iter(_rows(records, "kernel.forward", multi).values()), {}) \
            .get("params", {})
        out.append(f"BatchNormalization (training) on one process, backend "
                   f"`{backend.get('backend', '?')}`; copy = `np.copyto` of the case's input, "
                   "timed in turn with the passes; stats/normalize = the backend's two forward "
                   "passes alone; torch = `torch.nn.functional.batch_norm(training=True)` + "
                   "autograd at the same thread count. GB/s = effective bytes / time (copy "
                   "2×, stats 1×, normalize and forward 2×, backward 3×, forward+backward 5× "
                   "the input's bytes); \"of copy\" = that / the same round's copy "
                   "bandwidth (2 passes: copy time / (stats + normalize)); distbn/torch = "
                   "median of per-round time ratios (< 1: distbn faster); peak extra = numpy "
                   "memory allocated during forward+backward with both outputs kept "
                   "(tracemalloc).")
        out.append("")
    if rows:
        head = ["pass", "shape", "dtype", "layout", "threads", "time", "GB/s", "of copy",
                "torch time", "torch GB/s", "distbn/torch", "peak extra"]
        if compact:
            del head[11], head[9]
        head = (["source"] if multi else []) + head
        out += _table(head, rows)
    return out


def _allreduce(records, multi, compact=False) -> list[str]:
    rows = _rows(records, "allreduce.", multi)
    if compact:  # the forward buffers and the buckets tell the story
        rows = {k: v for k, v in rows.items() if k[0] != "allreduce.bn_backward"}
    if not rows:
        return []
    sizes = sorted({ws for (_, ws, _, _) in rows})
    table: dict = {}
    for (name, ws, src, _p), row in rows.items():
        p = row["params"]
        kind = name.split(".", 1)[1]
        what = (f"BN {kind.split('_')[1]} C={p['channels']}" if "channels" in p
                else f"bucket {p.get('dtype')}")
        # BN buffers by C (forward before backward), then buckets by size.
        key = (str(src), kind == "bucket", p.get("channels", 0), kind != "bn_forward",
               p.get("bytes") or 0)
        entry = table.setdefault(key, {"what": what, "bytes": p.get("bytes"), "source": src})
        entry[ws] = row
    out = [] if compact else [
        "`Allreduce(IN_PLACE, buf, SUM)` per call (slowest rank); GB/s = message bytes / "
        "latency (algorithm bandwidth). BN forward = 3C float64 [S1, S2, n], backward = "
        "2C float64 [Σdy, Σdy·x̂].", ""]
    head = (["source"] if multi else []) + ["buffer", "bytes"] + \
        [f"latency n={n}" for n in sizes] + [f"GB/s n={n}" for n in sizes if n > 1]
    body = []
    for key in sorted(table):
        e = table[key]
        body.append(([e["source"] or "–"] if multi else []) + [e["what"], _bytes(e["bytes"] or 0)]
                    + [_cell(e.get(n, {}).get("latency"), True) for n in sizes]
                    + [_cell(e.get(n, {}).get("bandwidth")) for n in sizes if n > 1])
    return out + _table(head, body)


def _sync(records, multi, compact=False) -> list[str]:
    rows = _rows(records, "sync.step" if compact else "sync.", multi)
    if not rows:
        return []
    out = [] if compact else [
        "One training-mode BatchNormalization layer per rank, replica-local vs "
        "`synchronized=True`, timed alternately (slowest rank); overhead = median of the "
        "per-pair differences; \"× allreduce\" = overhead / raw Allreduce latency of the "
        "pass's buffers (3C forward, 2C backward, both per step) measured in the same run.",
        ""]
    order = {"forward": 0, "backward": 1, "step": 2}
    body = []
    items = sorted(rows.items(), key=lambda kv: (str(kv[0][2]), _shape(kv[1]["params"]),
                                                 kv[1]["params"].get("dtype", ""),
                                                 order.get(kv[0][0].split(".")[1], 9),
                                                 kv[0][1]))
    for (name, ws, _s, _p), row in items:
        p = row["params"]
        body.append(([row.get("source") or "–"] if multi else []) + [
            _shape(p), p.get("dtype"), name.split(".", 1)[1], ws,
            _cell(row.get("local_time"), True), _cell(row.get("sync_time"), True),
            _cell(row.get("overhead")), _cell(row.get("slowdown")),
            _cell(row.get("allreduce_latency")), _cell(row.get("overhead_allreduces"))])
    head = (["source"] if multi else []) + [
        "shape per rank", "dtype", "pass", "n", "local", "synchronized", "overhead",
        "sync/local", "allreduce", "× allreduce"]
    return out + _table(head, body)


def _scaling(records, multi, compact=False) -> list[str]:
    rows = _rows(records, "scaling.", multi)
    if not rows:
        return []
    first = next(iter(rows.values()))["params"]
    out = [f"`Trainer.train_step()` of `{first.get('config')}` (forward, loss, backward, "
           f"gradient all-reduce, optimizer), {first.get('per_rank_batch')} samples per rank "
           "(weak scaling); efficiency = throughput / (n × one-rank throughput).", ""]
    if compact:
        out = []
    body = []
    for (_name, ws, _s, _p), row in sorted(rows.items(), key=lambda kv: (kv[0][1],
                                                                        str(kv[0][2]))):
        p = row["params"]
        body.append(([row.get("source") or "–"] if multi else []) + [
            ws, p.get("per_rank_batch"), p.get("global_batch"),
            _cell(row.get("step_time"), True), _cell(row.get("throughput"), True),
            _pct(row.get("efficiency"))])
    head = (["source"] if multi else []) + ["n", "batch/rank", "global batch", "step time",
                                            "samples/s", "efficiency"]
    return out + _table(head, body)


def _step(records, multi, compact=False) -> list[str]:
    """The step suite: distbn's training step vs PyTorch's, then the per-layer breakdown."""
    rows = _rows(records, "step.train_step", multi)
    if not rows:
        return []
    out = [] if compact else [
        "One training step of the quickstart model (`Trainer.train_step()`: forward, loss, "
        "backward, optimizer) next to the same model in PyTorch (torch.nn modules, SGD with "
        "momentum, the same initial weights), one process, timed interleaved (one sample of "
        "each per round); distbn/torch = median of the per-round ratios.", ""]
    times = {}
    for (_name, _ws, src, _p), row in rows.items():
        p = row["params"]
        key = (str(src), p.get("threads"), p.get("batch"), p.get("backend"))
        entry = times.setdefault(key, {"source": src})
        if "impl" in p:
            entry[p["impl"]] = row.get("time")
        else:
            entry.update(row)
    body = []
    for (_src, threads, batch, backend), e in sorted(times.items(), key=lambda kv: str(kv[0])):
        body.append(([e["source"] or "–"] if multi else []) + [
            batch, threads, backend, _cell(e.get("distbn"), True),
            _cell(e.get("torch_nchw"), True), _cell(e.get("torch_channels_last"), True),
            _cell(e.get("ratio_vs_torch_channels_last"), True),
            _cell(e.get("ratio_vs_torch_nchw"), True)])
    head = (["source"] if multi else []) + [
        "batch", "threads", "kernels", "distbn step", "torch NCHW", "torch channels_last",
        "distbn/torch (channels_last)", "distbn/torch (NCHW)"]
    out += _table(head, body)
    if compact:
        return out
    layers: dict = {}
    for rec in records:
        if rec["name"] != "step.layer":
            continue
        p = rec["params"]
        key = (str(rec.get("source") if multi else ""), p.get("threads"))
        table = layers.setdefault(key, {})
        row = table.setdefault(p["layer"], {"index": p.get("index", 0)})
        if p["impl"] == "distbn":
            row["index"], row["type"] = p.get("index", 0), p.get("type", "")
        row[(p["impl"], rec["metric"])] = rec
    impls = ("distbn", "torch_channels_last", "torch_nchw")
    for (src, threads), table in layers.items():
        out += [f"Per layer{f' ({src})' if src else ''}, {threads} thread(s): forward and "
                "backward time per step (medians of instrumented steps; distbn times each "
                "layer's `call` and `backward`, torch uses module hooks). \"rest\" = the "
                "instrumented step minus its layers (loss, optimizer, gradient norm, the "
                "model's loop); a layer fused into its predecessor shows ~0.", ""]
        body = []
        for name, row in sorted(table.items(), key=lambda kv: kv[1]["index"]):
            cells = [name, row.get("type", "")]
            for impl in impls:
                if name == "(rest of step)":
                    cells += [_cell(row.get((impl, "rest_time"))), "–"]
                else:
                    cells += [_cell(row.get((impl, "forward_time"))),
                              _cell(row.get((impl, "backward_time")))]
            body.append(cells)
        out += _table(["layer", "type", "distbn fwd", "distbn bwd", "torch CL fwd",
                       "torch CL bwd", "torch NCHW fwd", "torch NCHW bwd"], body)
    return out


def _other(records) -> list[str]:
    rest = [r for r in records if not r["name"].startswith(_KNOWN)]
    body = [[r["name"], r["metric"], r["world_size"], _cell(r, True),
             ", ".join(f"{k}={v}" for k, v in r["params"].items())] for r in rest]
    return _table(["name", "metric", "n", "value", "params"], body)


def render_markdown(results: dict, plots=()) -> str:
    """The report as Markdown.

    Args:
        results: {"environment", "records"} (one run or a merge).
        plots: PNG file names to link at the end.

    Returns:
        The Markdown text.
    """
    env, records = results["environment"], results["records"]
    multi = len({r.get("source") for r in records}) > 1
    lines = ["# distbn benchmark report", "",
             "Values are medians over the repeats shown in results.json (warm-up calls "
             "excluded); `±x%` is the interquartile range relative to the median.", "",
             "## Environment", ""]
    lines += _environment(env)
    for title, section in (("Kernels", _kernel(records, multi)),
                           ("Allreduce", _allreduce(records, multi)),
                           ("Synchronized vs replica-local BatchNormalization",
                            _sync(records, multi)),
                           ("Scaling", _scaling(records, multi)),
                           ("Training step vs PyTorch", _step(records, multi)),
                           ("Other records", _other(records))):
        if section:
            lines += [f"## {title}", ""] + section
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    return "\n".join(lines).rstrip() + "\n"


def render_summary(results: dict) -> str:
    """A compact Markdown summary (for a README): one line on the machine, then the kernel
    table, the allreduce forward buffers and buckets, the sync steps and the scaling.

    Args:
        results: {"environment", "records"}.

    Returns:
        The Markdown text.
    """
    env, records = results["environment"], results["records"]
    multi = len({r.get("source") for r in records}) > 1
    runs = env.get("runs") or [env]
    threads = env.get("threads") or runs[0].get("threads") or {}
    rev = env.get("git_revision") or runs[0].get("git_revision")
    date = env.get("date") or runs[0].get("date")
    dirty = env.get("git_dirty", runs[0].get("git_dirty")) is True
    lines = [f"Machine: {env.get('cpu_model') or runs[0].get('cpu_model')}, "
             f"{threads.get('cpu_count')} CPUs, host(s) {', '.join(env.get('hosts', []))}; "
             f"{env.get('mpi_library') or runs[0].get('mpi_library')}; numpy "
             f"{env.get('numpy') or runs[0].get('numpy')}; torch "
             f"{env.get('torch') or runs[0].get('torch') or 'not installed'}; distbn "
             f"{env.get('distbn') or runs[0].get('distbn')} (git {rev[:12] if rev else 'n/a'}"
             f"{' + uncommitted changes' if dirty else ''}); "
             f"{date}. Medians; ±x% = IQR / median."]
    loads = _loads(env, runs if env.get("runs") else [])
    if loads:
        lines[-1] += f" Load average (1 min, start → end): {loads}."
    lines.append("")
    if env.get("command"):
        lines += [f"Command: `{env['command']}`", ""]
    for section in (_kernel(records, multi, True), _allreduce(records, multi, True),
                    _sync(records, multi, True), _scaling(records, multi, True),
                    _step(records, multi, True)):
        lines += section
    return "\n".join(lines).rstrip() + "\n"


# --- files -----------------------------------------------------------------------------------

def write_report(results: dict, out_dir) -> list[Path]:
    """Write out_dir/report.md (and PNG plots when matplotlib is importable).

    Args:
        results: {"environment", "records"}.
        out_dir: an existing or new directory.

    Returns:
        The files written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from distbn.plot import bench_figures

    plots = bench_figures(results, out_dir)
    path = out_dir / REPORT_FILE
    path.write_text(render_markdown(results, plots), encoding="utf-8")
    return [path, *plots]


def merge_dirs(dirs) -> dict:
    """Merge the results.json of several directories (e.g. jobs on different node counts).

    Records keep their directory as `source` (with two or more directories); scaling
    efficiencies are derived across directories when one of them has a one-rank run.

    Args:
        dirs: result directories (or results.json files).

    Returns:
        The merged results.
    """
    from distbn.bench.results import merge_results, read_results
    from distbn.bench.scaling import derive_efficiency

    dirs = [Path(d) for d in dirs]
    if len(dirs) == 1:  # nothing to merge: the results as they are (re-rendering a report)
        merged = read_results(dirs[0])
    else:
        merged = merge_results([(str(d), read_results(d)) for d in dirs], tag_sources=True)
    merged["records"] += derive_efficiency(merged["records"])
    return merged
