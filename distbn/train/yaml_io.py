"""The config's YAML side: safe loading with line numbers, the resolved config's text.

`load_yaml` reads with a `SafeLoader` subclass that builds plain values itself and
records the line of every key, refuses duplicate keys and every tag beyond plain
mappings, lists, strings, numbers, booleans and null (so `!!python/...` executes
nothing), and stops alias expansion past `_MAX_NODES` values. Numbers such as `1e-3` are
floats (YAML 1.2), not strings as in plain PyYAML; the dumper quotes strings that would
read back as such floats. `config_to_yaml` writes what a run directory's config.yaml
holds, headed by `config_hash`.

`ConfigError` (every configuration problem) and `format_path` live here, the lowest of
the config modules (`distbn.train.config` re-exports them).
"""

from __future__ import annotations

import hashlib
import json
import re

import yaml

__all__ = ["ConfigError", "format_path", "load_yaml", "config_hash", "config_to_yaml"]

Path = tuple  # of str (mapping keys) and int (list indices)

_YAML = "tag:yaml.org,2002:"
_PLAIN_TAGS = {_YAML + t for t in ("null", "bool", "int", "float", "str")}
# YAML 1.2 floats without a dot or without an exponent sign (1e-3, 1.0e5, 2E+4), which
# YAML 1.1 (and so PyYAML) would load as strings.
_FLOAT_12 = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
# Alias expansion can blow a small file up exponentially; no real config comes close.
_MAX_NODES = 100_000


class ConfigError(ValueError):
    """A configuration problem; the message starts with where the value came from.

    Attributes:
        location: "file:line", "--set KEY=VALUE" or the source name; None if unknown.
        path: the dotted key path, e.g. "train.optimizer.learning_rate", or None.
    """

    def __init__(self, message, location=None, path=None):
        super().__init__(message)
        self.location = location
        self.path = path


def format_path(path) -> str:
    """Dotted form of a key path: `("model", "layers", 3, "lr")` -> `model.layers[3].lr`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


# --------------------------------------------------------------------------------------
# Loading


class _Loader(yaml.SafeLoader):
    """SafeLoader that builds plain values from nodes, refusing duplicate keys and tags.

    Only composition (parsing into nodes) is PyYAML's; `load_located` walks the nodes,
    checks every tag before anything is constructed, and records the 1-based line of
    every mapping key and list item under its key path.
    """

    def __init__(self, stream, source):
        super().__init__(stream)
        self.source = source
        self.lines: dict[Path, int] = {}
        self._active: set[int] = set()
        self._count = 0

    def load_located(self):
        """Parse the single document: `(value, lines)` (an empty document is None)."""
        try:
            node = self.get_single_node()
            return (None if node is None else self._value(node, ())), self.lines
        except yaml.MarkedYAMLError as err:
            mark = err.problem_mark or err.context_mark
            where = f"{self.source}:{mark.line + 1}" if mark else str(self.source)
            raise ConfigError(_yaml_error_text(self.source, err), location=where) from None
        finally:
            self.dispose()

    def _fail(self, node, message, path=None):
        mark = node.start_mark
        where = f"{self.source}:{mark.line + 1}:{mark.column + 1}"
        raise ConfigError(f"{where}: {message}", location=f"{self.source}:{mark.line + 1}",
                          path=None if path is None else format_path(path))

    def _check_tag(self, node, allowed):
        if node.tag not in allowed:
            tag = node.tag.replace(_YAML, "!!")
            hint = " (quote the value to make it a string)" if node.tag.startswith(_YAML) \
                and isinstance(node, yaml.ScalarNode) else ""
            self._fail(node, f"tag {tag!r} is not allowed: a config holds only mappings, "
                             f"lists, strings, numbers, booleans and null{hint}")

    def _value(self, node, path):
        self._count += 1
        if self._count > _MAX_NODES:
            self._fail(node, f"more than {_MAX_NODES} values (aliases expanding?)")
        if id(node) in self._active:
            self._fail(node, "recursive alias")
        if isinstance(node, yaml.ScalarNode):
            self._check_tag(node, _PLAIN_TAGS)
            return self.construct_object(node, deep=True)
        self._active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                self._check_tag(node, {_YAML + "seq"})
                out = []
                for i, item in enumerate(node.value):
                    self.lines[path + (i,)] = item.start_mark.line + 1
                    out.append(self._value(item, path + (i,)))
                return out
            self._check_tag(node, {_YAML + "map"})
            return self._mapping(node, path)
        finally:
            self._active.discard(id(node))

    def _mapping(self, node, path):
        out: dict = {}
        merges = [v for k, v in node.value if k.tag == _YAML + "merge"]
        # `<<: *base` (or a list of them): merged first, earlier sources winning, so the
        # explicit keys that follow override them.
        for merged in reversed(merges):
            sources = merged.value if isinstance(merged, yaml.SequenceNode) else [merged]
            for src in reversed(sources):
                if not isinstance(src, yaml.MappingNode):
                    self._fail(src, "a merge key '<<' needs a mapping or a list of mappings")
                out.update(self._value(src, path))
        seen: dict = {}
        for key_node, value_node in node.value:
            if key_node.tag == _YAML + "merge":
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                where = format_path(path) or "the top level"
                self._fail(key_node, f"keys must be plain scalars, in {where}")
            self._check_tag(key_node, _PLAIN_TAGS)
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                where = format_path(path) or "the top level"
                self._fail(key_node, f"duplicate key {key!r} in {where} "
                                     f"(first on line {seen[key]}, again on line {line})",
                           path + (key,))
            seen[key] = line
            self.lines[path + (key,)] = line
            out[key] = self._value(value_node, path + (key,))
        return out


_Loader.add_implicit_resolver(_YAML + "float", _FLOAT_12, list("-+0123456789."))


def _yaml_error_text(source, err) -> str:
    mark = err.problem_mark or err.context_mark
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else str(source)
    text = f"{where}: malformed YAML: {err.problem or err.context}"
    if err.context and err.problem:
        cm = err.context_mark
        at = f" at line {cm.line + 1}, column {cm.column + 1}" if cm else ""
        text += f" ({err.context}{at})"
    return text


def load_yaml(text, source):
    """Parse one YAML document of plain values.

    Args:
        text: the YAML text.
        source: its name in messages (a path, "<string>", "--set KEY=VALUE").

    Returns:
        `(value, lines)`: the value (None for an empty document) and {key path: 1-based
        line} of every mapping key and list item. Raises `ConfigError` for malformed
        YAML, a duplicate key, a tag or runaway aliases, naming line and column.
    """
    return _Loader(text, source).load_located()


# --------------------------------------------------------------------------------------
# Writing


def config_hash(config) -> str:
    """sha256 (hex) of the canonical JSON of `config.to_dict()`: equal configs, equal hashes."""
    text = json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class _FlowMap(dict):
    """A mapping written on one line (layer entries)."""


class _Dumper(yaml.SafeDumper):
    """SafeDumper that writes layer entries in flow style and quotes 1e-3-like strings."""


_Dumper.add_representer(
    _FlowMap, lambda d, data: d.represent_mapping(_YAML + "map", data, flow_style=True))
# Strings our loader would read back as floats must be quoted.
_Dumper.add_implicit_resolver(_YAML + "float", _FLOAT_12, list("-+0123456789."))


def config_to_yaml(config) -> str:
    """The resolved config as YAML (what the run directory's config.yaml holds).

    Args:
        config: a `Config`.

    Returns:
        YAML text that `parse_config` turns back into an equal `Config`.
    """
    data = config.to_dict()
    data["model"]["layers"] = [_FlowMap(layer) for layer in data["model"]["layers"]]
    body = yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                     width=100)
    return f"# distbn resolved config, sha256 {config_hash(config)}\n{body}"

