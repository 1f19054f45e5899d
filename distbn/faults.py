"""Failure injection for tests: `DISTBN_FAULT=<point>[:<rank>][@<hit>][=<action>]`.

A testing aid, not a feature: the reliability tests use it to make one rank fail at a
named place in a real `distbn train` run (docs/reliability.md). distbn calls
`maybe_fail(point)` at a few points; with the variable unset that is one environment
lookup and nothing else.

Points:
    "data_load"   a `Trainer` loading its data set (before training; set-up failures
                  are decided collectively, exit 1 on every rank)
    "data"        every training step's batch fetch
    "checkpoint"  rank 0 writing a checkpoint, after the array files and before the
                  manifest (the hidden temporary directory is left half-written)
    "bn_forward"  a synchronized BatchNormalization forward, just before its
                  statistics all-reduce: `MPIStrategy.sync_all_reduce` with a name
                  ending in "/forward" (the numpy layer and the torch adapter name it so)

Syntax: `point` alone fails on every rank the first time it is reached; `:rank` only
on that COMM_WORLD rank; `@hit` at the hit-th time (from 1) that rank reaches it;
`=action` is `raise` (default: `FaultInjected`), `kill` (SIGKILL itself, as the
kernel's OOM killer would) or `sleep:SECONDS` (a stall, for the watchdog). Examples:
`data:1@3`, `checkpoint:0`, `bn_forward:1=sleep:60`.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time

from distbn.launchenv import world_rank

__all__ = ["FAULT_ENV_VAR", "POINTS", "FaultInjected", "FaultSpec", "parse_fault", "maybe_fail"]

FAULT_ENV_VAR = "DISTBN_FAULT"
POINTS = ("data_load", "data", "checkpoint", "bn_forward")

_SPEC = re.compile(
    r"^(?P<point>[a-z_]+)(?::(?P<rank>\d+))?(?:@(?P<hit>\d+))?"
    r"(?:=(?P<action>raise|kill|sleep:(?P<seconds>\d+(?:\.\d*)?)))?$"
)

_lock = threading.Lock()
_hits: dict[str, int] = {}
_parsed: dict[str, FaultSpec] = {}


class FaultInjected(RuntimeError):
    """The exception `DISTBN_FAULT` raises at its point."""


class FaultSpec:
    """A parsed `DISTBN_FAULT` value.

    Attributes:
        point: one of `POINTS`.
        rank: the COMM_WORLD rank it applies to, or None for every rank.
        hit: fail at this (1-based) arrival at the point.
        action: "raise", "kill" or "sleep".
        seconds: the sleep's length (action "sleep"), else 0.
        text: the variable's value, quoted in messages.
    """

    __slots__ = ("point", "rank", "hit", "action", "seconds", "text")

    def __init__(self, point, rank, hit, action, seconds, text):
        self.point, self.rank, self.hit = point, rank, hit
        self.action, self.seconds, self.text = action, seconds, text


def parse_fault(text: str) -> FaultSpec:
    """Parse a `DISTBN_FAULT` value.

    Args:
        text: e.g. "data:1@3" or "bn_forward:1=sleep:60".

    Returns:
        The `FaultSpec`.

    Raises:
        ValueError: malformed, an unknown point, or hit 0; the value is quoted.
    """
    m = _SPEC.match(text.strip())
    if m is None:
        raise ValueError(
            f"${FAULT_ENV_VAR} must look like <point>[:<rank>][@<hit>][=raise|kill|"
            f"sleep:<seconds>], got {text!r}")
    if m["point"] not in POINTS:
        raise ValueError(f"${FAULT_ENV_VAR}: unknown point {m['point']!r} in {text!r}; "
                         f"points: {', '.join(POINTS)}")
    hit = 1 if m["hit"] is None else int(m["hit"])
    if hit < 1:
        raise ValueError(f"${FAULT_ENV_VAR}: @hit counts from 1, got {text!r}")
    action = (m["action"] or "raise").split(":")[0]
    seconds = float(m["seconds"]) if m["seconds"] else 0.0
    rank = None if m["rank"] is None else int(m["rank"])
    return FaultSpec(m["point"], rank, hit, action, seconds, text)


def maybe_fail(point: str) -> None:
    """Fail here if `$DISTBN_FAULT` names this point, this rank and this arrival.

    Args:
        point: one of `POINTS`.

    Raises:
        FaultInjected: when the spec's action is "raise" (the default).
        ValueError: a malformed `$DISTBN_FAULT` (raised at the first point reached).
    """
    text = os.environ.get(FAULT_ENV_VAR)
    if not text:
        return
    with _lock:
        spec = _parsed.get(text)
        if spec is None:
            spec = _parsed[text] = parse_fault(text)
        if spec.point != point:
            return
        rank = world_rank()
        if spec.rank is not None and spec.rank != rank:
            return
        _hits[point] = count = _hits.get(point, 0) + 1
    if count != spec.hit:
        return
    where = f"'{point}' on rank {rank} (arrival {count}; ${FAULT_ENV_VAR}={text})"
    if spec.action == "kill":
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    if spec.action == "sleep":
        print(f"[rank {rank}] distbn: injected stall of {spec.seconds:g} s at {where}",
              file=sys.stderr, flush=True)
        time.sleep(spec.seconds)
        return
    raise FaultInjected(f"injected fault at {where}")


def _reset() -> None:
    """Forget arrival counts (for tests that run several scenarios in one process)."""
    with _lock:
        _hits.clear()
