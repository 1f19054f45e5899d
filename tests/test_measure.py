"""`distbn bench kernel`'s measurements that `python -m distbn.ops.measure` used to take:
peak memory with both outputs kept, the cold-start record, the command line options."""

from __future__ import annotations

import numpy as np
import pytest

import distbn
from distbn.bench import Context, kernel
from distbn.cli import build_parser


def test_peak_extra_bytes_keeps_both_outputs():
    x = np.random.default_rng(0).standard_normal((8, 4, 4, 8)).astype("float32")
    bn = distbn.BatchNormalization()
    bn(x, training=True)
    assert kernel.peak_extra_bytes(bn, x, x) >= 2 * x.nbytes  # y and dx at least


def test_cold_start_record(monkeypatch):
    monkeypatch.setattr(kernel, "cold_start", lambda n: {
        "wall_s": 3.0, "compile_s": [2.0, 2.5], "lock_wait_s": [0.0, 1.5], "ok": True,
        "same_result": True, "errors": []})
    (rec,) = kernel._cold_start_records(Context("tiny"), 2)
    assert rec["name"] == "kernel.cold_start" and rec["value"] == pytest.approx(2.25)
    assert rec["spread"]["max"] == 2.5 and rec["params"]["processes"] == 2
    monkeypatch.setattr(kernel, "cold_start", lambda n: {
        "wall_s": 3.0, "compile_s": [2.0], "lock_wait_s": [0.0], "ok": False,
        "same_result": True, "errors": ["boom"]})
    with pytest.raises(RuntimeError, match="boom"):
        kernel._cold_start_records(Context("tiny"), 2)


def test_bench_kernel_options_parse():
    args = build_parser().parse_args(["bench", "kernel", "--threads", "1,2", "--cold-start",
                                      "4"])
    assert args.threads == "1,2" and args.cold_start == 4 and args.suites == ["kernel"]
