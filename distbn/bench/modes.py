"""The normalization modes `distbn compare` trains, each one normalization group.

A mode says which samples a normalization layer takes its statistics over:

=================  =====================================================  ==============
mode               what every BatchNormalization layer becomes            samples/group
=================  =====================================================  ==============
``local``          replica-local BN (label "replica-local")               per-replica batch
``sync``           BN synchronized over all ranks (label "synchronized")  global batch
``sync:K``         BN synchronized over sync groups of K ranks            K x per-replica
``ghost:S``        replica-local BN with ghost batches of S samples       S
                   (`virtual_batch_size=S`)
``groupnorm[:G]``  GroupNormalization, at most G groups (default 32):     per-sample
                   gcd(G, channels) per layer
``layernorm``      LayerNormalization over the BN's channel axis          per-sample
=================  =====================================================  ==============

A BN mode followed by ``+renorm`` (``local+renorm``, ``sync+renorm``, ``ghost:8+renorm``)
trains the same groups with batch renormalization (`renorm=True`, the layer's default
clipping and `renorm_momentum` unless the config's entries set them); a BN entry's own
`renorm` follows the mode either way, so ``local`` against ``local+renorm`` compares
exactly that argument.

The normalization batch size (samples per normalization group) is the study's variable,
as in Wu & Johnson, "Rethinking 'Batch' in BatchNorm" (2021). `--modes` takes them
comma-separated: ``--modes local,sync,sync:2,ghost:4,groupnorm,layernorm``.
"""

from __future__ import annotations

import dataclasses
import json
import math

__all__ = ["Mode", "StudyError", "MODE_SYNTAX", "DEFAULT_MODES", "parse_modes",
           "check_modes", "normalization_batch", "mode_overrides", "bn_entries"]

MODE_SYNTAX = ("local, sync, sync:K, ghost:S, groupnorm, groupnorm:G, layernorm; a BN mode "
               "may end with +renorm")
#: The two modes `distbn compare` trains when none are given (today's study).
DEFAULT_MODES = "local,sync"
# Keras' and Wu & He's default group count; capped per layer at a divisor of the channels.
_DEFAULT_GROUPS = 32
# BN arguments GroupNormalization/LayerNormalization take too; the rest (momentum, moving
# statistics, synchronized, renorm, virtual_batch_size) have no meaning without a batch.
_SHARED_ARGS = ("epsilon", "center", "scale", "beta_initializer", "gamma_initializer",
                "beta_regularizer", "gamma_regularizer", "beta_constraint",
                "gamma_constraint", "name", "trainable", "dtype")


class StudyError(ValueError):
    """A problem with the study's arguments or config; the message quotes the value."""


@dataclasses.dataclass(frozen=True)
class Mode:
    """One normalization mode.

    Attributes:
        kind: "local", "sync", "sync_group", "ghost", "groupnorm" or "layernorm".
        size: K ranks (sync_group), S samples (ghost), G groups (groupnorm); else None.
        renorm: batch renormalization on the BN layers (BN modes only).
    """

    kind: str
    size: int | None = None
    renorm: bool = False

    @property
    def label(self) -> str:
        """The name in records and reports ("replica-local", "sync:2", "ghost:4", ...)."""
        base = {"local": "replica-local", "sync": "synchronized",
                "sync_group": f"sync:{self.size}", "ghost": f"ghost:{self.size}",
                "groupnorm": "groupnorm" if self.size is None else f"groupnorm:{self.size}",
                "layernorm": "layernorm"}[self.kind]
        return base + "+renorm" if self.renorm else base

    @property
    def uses_bn(self) -> bool:
        """Whether the model keeps BatchNormalization (so has moving statistics)."""
        return self.kind in ("local", "sync", "sync_group", "ghost")

    @property
    def synchronized(self) -> bool:
        return self.kind in ("sync", "sync_group")


_NAMES = {"local": "local", "replica-local": "local", "sync": "sync",
          "synchronized": "sync", "groupnorm": "groupnorm", "layernorm": "layernorm"}


def _parse_one(token: str, where: str) -> Mode:
    base, plus, modifier = token.partition("+")
    if not plus:
        return _parse_base(token, where)
    if modifier.strip().lower() != "renorm":
        raise StudyError(f"{where}: mode {token!r}: the only modifier is +renorm, got "
                         f"+{modifier.strip()!r}")
    mode = _parse_base(base.strip(), where)
    if not mode.uses_bn:
        raise StudyError(f"{where}: mode {token!r}: +renorm needs a BatchNormalization mode "
                         f"(local, sync, sync:K, ghost:S), not {mode.label!r}")
    return dataclasses.replace(mode, renorm=True)


def _parse_base(token: str, where: str) -> Mode:
    name, colon, arg = token.partition(":")
    name = name.strip().lower()
    if not colon:
        if name in _NAMES:
            return Mode(_NAMES[name])
        if name == "ghost":
            raise StudyError(f"{where}: mode 'ghost' needs a size, ghost:S (S samples per "
                             f"ghost batch), got {token!r}")
        raise StudyError(f"{where}: unknown mode {token!r}; modes are {MODE_SYNTAX}")
    kind = {"sync": "sync_group", "synchronized": "sync_group", "ghost": "ghost",
            "groupnorm": "groupnorm"}.get(name)
    if kind is None:
        raise StudyError(f"{where}: unknown mode {token!r}; modes are {MODE_SYNTAX} "
                         "(only sync, ghost and groupnorm take a number)")
    what = {"sync_group": "K ranks per sync group", "ghost": "S samples per ghost batch",
            "groupnorm": "G groups"}[kind]
    arg = arg.strip()
    if not arg.isdigit() or int(arg) < 1:
        raise StudyError(f"{where}: mode {token!r}: {name}:N needs a positive integer N "
                         f"({what}), got {arg!r}")
    size = int(arg)
    if kind == "sync_group" and size == 1:
        raise StudyError(f"{where}: mode {token!r}: a sync group of 1 rank is replica-local "
                         "BN; write 'local'")
    return Mode(kind, size)


def parse_modes(value, where: str = "--modes") -> list[Mode]:
    """Parse a mode list: "local,sync,sync:2,ghost:4" or a list of such strings.

    Args:
        value: a comma-separated string, or a list/tuple of strings.
        where: what to name in errors ("--modes", "study.modes at FILE:LINE").

    Returns:
        The modes in order. Raises `StudyError` quoting the bad token (unknown name, a
        missing or bad number, a mode given twice).
    """
    if isinstance(value, str):
        tokens = value.split(",")
    elif isinstance(value, (list, tuple)) and all(isinstance(t, str) for t in value):
        tokens = list(value)
    else:
        raise StudyError(f"{where}: expected comma-separated modes ({MODE_SYNTAX}), got "
                         f"{value!r}")
    modes = []
    for token in tokens:
        if not token.strip():
            raise StudyError(f"{where}: empty mode in {value!r}; modes are {MODE_SYNTAX}")
        mode = _parse_one(token.strip(), where)
        if mode.label in [m.label for m in modes]:
            raise StudyError(f"{where}: mode {mode.label!r} is given twice in {value!r}")
        modes.append(mode)
    if not modes:
        raise StudyError(f"{where}: no modes in {value!r}")
    return modes


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_modes(modes, ranks: int, global_batch: int, has_masks: bool = False,
                where: str = "--modes", last_batch: int = 0) -> None:
    """Check that every mode can run at `ranks` ranks and this global batch.

    Args:
        modes: from `parse_modes`.
        ranks: the study's ranks.
        global_batch: `train.global_batch_size`.
        has_masks: the data carry masks (ghost batches refuse them in training).
        where: what to name in errors.
        last_batch: the size of each epoch's short final batch (0: none).

    Raises:
        StudyError: quoting the mode and the valid values.
    """
    for m in modes:
        if m.kind == "sync_group" and ranks % m.size:
            valid = ", ".join(f"sync:{d}" for d in _divisors(ranks) if d > 1)
            raise StudyError(f"{where}: mode {m.label!r}: K={m.size} must divide the "
                             f"{ranks} ranks (valid: {valid or 'none at 1 rank'})")
        if m.kind == "ghost":
            if global_batch % ranks:
                raise StudyError(
                    f"{where}: mode {m.label!r}: ghost batches need equal shards, but "
                    f"train.global_batch_size {global_batch} does not divide over {ranks} "
                    "ranks")
            per = global_batch // ranks
            if per % m.size:
                valid = ", ".join(f"ghost:{d}" for d in _divisors(per))
                raise StudyError(
                    f"{where}: mode {m.label!r}: S={m.size} must divide the per-replica "
                    f"batch {per} (global batch {global_batch} over {ranks} ranks); valid: "
                    f"{valid}")
            if last_batch and (last_batch // ranks) % m.size or last_batch % ranks:
                raise StudyError(
                    f"{where}: mode {m.label!r}: each epoch ends with a batch of "
                    f"{last_batch} samples (data.n_train is not a multiple of "
                    f"train.global_batch_size {global_batch}), whose shards ghost batches "
                    f"of {m.size} cannot divide; set train.drop_last=true or make "
                    f"data.n_train a multiple of {global_batch}")
            if has_masks:
                raise StudyError(f"{where}: mode {m.label!r}: the data carry masks, which "
                                 "ghost batches cannot use in training")


def normalization_batch(mode: Mode, ranks: int, global_batch: int) -> tuple:
    """Samples per normalization group of a mode.

    Args:
        mode: the mode.
        ranks: the ranks it trains at.
        global_batch: the global batch size.

    Returns:
        (value, text): value a float (the mean group size when shards are uneven) or
        None for the per-sample modes; text as printed ("4", "21-22", "per-sample").
    """
    low, rem = divmod(int(global_batch), int(ranks))
    if mode.kind in ("groupnorm", "layernorm"):
        return None, "per-sample"
    if mode.kind == "sync":
        return float(global_batch), str(global_batch)
    if mode.kind == "ghost":
        return float(mode.size), str(mode.size)
    k = mode.size if mode.kind == "sync_group" else 1
    # Group g holds ranks g*k .. g*k+k-1; shard_slice gives the first `rem` ranks one more.
    sizes = sorted({sum(low + (r < rem) for r in range(g * k, g * k + k))
                    for g in range(ranks // k)})
    text = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
    return global_batch * k / ranks, text


def bn_entries(config) -> list:
    """The `model.layers` entries with moving statistics (BatchNormalization)."""
    from distbn.layers import registry

    out = []
    for spec in config.model.layers:
        try:
            if registry.get_layer_class(spec.type).has_moving_statistics:
                out.append(spec)
        except ValueError:
            pass  # the builder reports unknown types with their YAML line
    return out


def _replacement(spec, mode: Mode, channels: int | None) -> dict:
    """The GroupNormalization/LayerNormalization entry that replaces a BN entry."""
    kept = {k: v for k, v in spec.kwargs.items() if k in _SHARED_ARGS}
    axis = spec.kwargs.get("axis", -1)
    if not isinstance(axis, int):
        raise StudyError(f"{spec.path('axis')}: mode {mode.label!r} replaces BN by a "
                         f"per-sample normalization over one channel axis, got axis={axis!r}")
    kept["axis"] = axis
    if mode.kind == "layernorm":
        return {"type": "LayerNormalization", **kept}
    wanted = _DEFAULT_GROUPS if mode.size is None else mode.size
    groups = wanted if channels is None else math.gcd(wanted, channels)
    return {"type": "GroupNormalization", "groups": groups, **kept}


def mode_overrides(config, mode: Mode, channels=None) -> list[str]:
    """The `--set` overrides that turn a config into a mode's config.

    `model.synchronized` is set, and so is `synchronized` of every BN entry that gives its
    own, so no layer escapes the comparison; a BN entry's own `virtual_batch_size` is
    cleared unless the mode is a ghost mode.

    Args:
        config: the base `Config` (after the user's overrides).
        mode: the mode.
        channels: {layer index: channel count} of the BN layers (for groupnorm's
            groups); None: G as given.

    Returns:
        "KEY.PATH=VALUE" strings to apply after the user's.
    """
    entries = bn_entries(config)
    if not mode.uses_bn:
        return [f"model.layers.{spec.index}="
                + json.dumps(_replacement(spec, mode, (channels or {}).get(spec.index)))
                for spec in entries]
    flag = "true" if mode.synchronized else "false"
    out = [f"model.synchronized={flag}",
           f"strategy.sync_group={mode.size if mode.kind == 'sync_group' else 'null'}"]
    renorm = "true" if mode.renorm else "false"
    for spec in entries:
        if "synchronized" in spec.kwargs:
            out.append(f"model.layers.{spec.index}.synchronized={flag}")
        if mode.renorm or "renorm" in spec.kwargs:
            out.append(f"model.layers.{spec.index}.renorm={renorm}")
        if mode.kind == "ghost":
            out.append(f"model.layers.{spec.index}.virtual_batch_size={mode.size}")
        elif spec.kwargs.get("virtual_batch_size") is not None:
            out.append(f"model.layers.{spec.index}.virtual_batch_size=null")
    return out
