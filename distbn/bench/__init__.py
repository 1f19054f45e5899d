"""Benchmark jobs: BN kernels, Allreduce, synchronized-vs-local BN, training scaling.

`distbn bench` (distbn/bench/cli.py) runs them; each suite is a module with
`run(ctx) -> records`. Results are `results.json` records (distbn/bench/results.py)
and a Markdown report (distbn/bench/report.py).
"""

from distbn.bench.context import MODES, Context
from distbn.bench.report import merge_dirs, render_markdown, write_report
from distbn.bench.results import make_record, read_results, validate_record, write_results
from distbn.bench.runner import SUITES, launch_all, measure, parse_ranks, parse_suites

__all__ = [
    "MODES", "Context", "SUITES", "launch_all", "measure", "parse_ranks", "parse_suites",
    "make_record", "read_results", "validate_record", "write_results", "merge_dirs",
    "render_markdown", "write_report",
]
