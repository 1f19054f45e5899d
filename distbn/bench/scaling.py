"""Suite `scaling`: training throughput of the quickstart model at this run's world size.

Weak scaling: every rank keeps the same per-rank batch, so the global batch grows with
the world size. What is timed is `distbn.train.trainer.Trainer.train_step()`, one whole
optimizer step as `distbn train` runs it: the rank's slice of the global batch, forward
with synchronized BatchNormalization, loss, backward, the bucketed gradient all-reduce,
the gradient norm and the optimizer update. A sample is the slowest rank's step time.

Records: `step_time` (µs) and `throughput` (global samples per second = global batch /
step time). The efficiency at N ranks, throughput_N / (N * throughput_1), needs the
one-rank run and is added when results are merged (`derive_efficiency`).
"""

from __future__ import annotations

from pathlib import Path

from distbn.bench.context import Context
from distbn.bench.results import make_record
from distbn.bench.timing import Stats

__all__ = ["NAME", "default_config", "derive_efficiency", "run"]

NAME = "scaling"
_US = 1e6


def default_config() -> Path:
    """The quickstart config shipped in the package (`distbn/configs/quickstart.yaml`)."""
    from distbn.configs import packaged_config

    return packaged_config("quickstart.yaml")


def run(ctx: Context, config_path=None) -> list[dict]:
    """Run the scaling suite on every rank of `ctx.comm` (collective).

    Args:
        ctx: the run context; needs a communicator.
        config_path: the training config (default: the packaged quickstart.yaml).

    Returns:
        The records on rank 0, [] elsewhere.
    """
    if ctx.comm is None:
        raise ValueError("the scaling suite needs an MPI communicator, got comm=None")
    from distbn.distribute import MPIStrategy
    from distbn.train.config import load_config
    from distbn.train.trainer import Trainer

    path = Path(config_path) if config_path is not None else default_config()
    if not path.is_file():
        raise FileNotFoundError(
            f"scaling: training config {str(path)!r} not found; pass --scaling-config")
    n = ctx.size
    per_rank = ctx.pick(64, 32, 4)
    repeats, warmup = ctx.pick(40, 20, 3), ctx.pick(3, 2, 1)
    global_batch = per_rank * n
    # Enough samples for every timed step without generating a full data set.
    n_train = global_batch * ctx.pick(8, 4, 2)
    overrides = [f"train.global_batch_size={global_batch}", f"data.n_train={n_train}",
                 "data.n_test=16", "logging.progress=none"]
    config = load_config(path, overrides)
    strategy = MPIStrategy(ctx.comm)
    try:
        trainer = Trainer(config, strategy)
        t = ctx.time(trainer.train_step, repeats, warmup)
    finally:
        strategy.close()
    params = {"config": path.name, "per_rank_batch": per_rank, "global_batch": global_batch,
              "dtype": config.model.dtype, "synchronized": bool(config.model.synchronized)}
    thr = t.map(lambda s: global_batch / s)
    ctx.progress(f"scaling {path.name} batch {per_rank}/rank: step {t.median * 1e3:.1f} ms, "
                 f"{thr.median:.0f} samples/s")
    records = [make_record("scaling.step", "step_time", t.scaled(_US), "us", n, params, warmup),
               make_record("scaling.step", "throughput", thr, "samples/s", n, params, warmup)]
    return records if ctx.is_root else []


def _key(rec) -> tuple:
    """What identifies a scaling series apart from the world size (and the source)."""
    p = {k: v for k, v in rec["params"].items() if k != "global_batch"}
    return (rec["name"], tuple(sorted((k, repr(v)) for k, v in p.items())))


def derive_efficiency(records: list[dict]) -> list[dict]:
    """Efficiency records for scaling throughputs that have a one-rank baseline.

    efficiency_N = throughput_N / (N * throughput_1), with the spread of the N-rank
    samples (the baseline's median is the reference). Existing efficiency records are
    not duplicated.

    Args:
        records: all records of a run or a merge.

    Returns:
        The new records (possibly empty).
    """
    thr = [r for r in records if r["name"] == "scaling.step" and r["metric"] == "throughput"]
    have = {(_key(r), r["world_size"], r.get("source")) for r in records
            if r["name"] == "scaling.step" and r["metric"] == "efficiency"}
    base = {}
    for r in thr:
        if r["world_size"] == 1:
            base.setdefault(_key(r), r)
    out = []
    for r in thr:
        b = base.get(_key(r))
        if b is None or (_key(r), r["world_size"], r.get("source")) in have:
            continue
        n = r["world_size"]
        ref = n * b["value"]
        sp = r["spread"]
        # The samples are gone; scale the N-rank spread by the baseline median.
        stats = Stats([r["value"] / ref])
        spread = stats.spread(sp.get("warmup"))
        spread.update({k: sp[k] / ref for k in ("min", "max", "q1", "q3", "iqr", "stdev")
                       if k in sp})
        spread["repeats"] = sp["repeats"]
        rec = {"name": r["name"], "metric": "efficiency", "value": r["value"] / ref,
               "unit": "ratio", "world_size": n,
               "params": dict(r["params"]), "spread": spread}
        if "source" in r:
            rec["source"] = r["source"]
        out.append(rec)
    return out
