"""The trainer's config: safe YAML with line numbers, schema checks, --set overrides."""

import json
import os
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from distbn.train import builder, optimizers, schedules
from distbn.train.config import (
    Config,
    ConfigError,
    config_hash,
    config_to_yaml,
    layer_path,
    load_config,
    parse_config,
    parse_override,
)

ROOT = Path(__file__).resolve().parents[1]

BASE = textwrap.dedent("""\
    seed: 1
    data:
      name: patterns
      n_train: 100
    model:
      layers:
        - {type: Conv2D, filters: 4, kernel_size: 3}
        - type: BatchNormalization
          momentum: 0.9
        - {type: Dense, units: 10}
    train:
      global_batch_size: 32
      epochs: 2
      optimizer:
        name: sgd
        learning_rate: 0.1
""")
# Line numbers in BASE, for the messages below.
LINE = {"momentum": 9, "global_batch_size": 12, "epochs": 13, "name": 15, "learning_rate": 16}


def parse(text=BASE, overrides=()):
    return parse_config(text, source="config.yaml", overrides=overrides)


def error_of(text=BASE, overrides=()):
    with pytest.raises(ConfigError) as info:
        parse(text, overrides)
    return str(info.value)


def edit(old, new, text=BASE):
    assert old in text, old
    return text.replace(old, new)


def test_quickstart_parses():
    config = load_config(ROOT / "configs" / "quickstart.yaml")
    assert isinstance(config, Config)
    assert config.data.name == "patterns"
    assert config.model.layers[0].type == "Conv2D"
    assert (config.train.epochs is None) != (config.train.steps is None)


def test_base_values_and_defaults():
    config = parse()
    assert config.seed == 1 and config.source == "config.yaml"
    assert config.data.n_train == 100 and config.data.n_test == 2000  # patterns default
    assert config.train.optimizer.learning_rate == 0.1
    assert config.train.optimizer.schedule.name == "constant"
    assert config.model.synchronized is True and config.model.dtype == "float32"
    assert [s.type for s in config.model.layers] == ["Conv2D", "BatchNormalization", "Dense"]
    assert config.model.layers[1].kwargs == {"momentum": 0.9}
    assert config.checkpoint.every_steps == 0 and config.checkpoint.keep == 3


def test_unknown_nested_key_names_path_suggestion_and_line():
    msg = error_of(edit("learning_rate: 0.1", "learnig_rate: 0.1"))
    assert msg == (f"config.yaml:{LINE['learning_rate']}: train.optimizer.learnig_rate: "
                   "unknown argument 'learnig_rate' for optimizer 'sgd' "
                   "(did you mean 'learning_rate'?)")


def test_unknown_key_without_close_match_lists_known_keys():
    msg = error_of(BASE + "strategy: {zzz: 1}\n")
    assert "unknown key 'strategy.zzz'" in msg and "known keys: sync_group" in msg
    assert msg.startswith("config.yaml:17:")


def test_unknown_top_level_key():
    msg = error_of("sed: 3\n" + BASE)
    assert msg.startswith("config.yaml:1: unknown key 'sed' (did you mean 'seed'?)")


@pytest.mark.parametrize("old,new,expected", [
    ("global_batch_size: 32", "global_batch_size: true",
     "train.global_batch_size: expected an int, got True"),
    ("global_batch_size: 32", "global_batch_size: 32.0",
     "train.global_batch_size: expected an int, got 32.0"),
    ("global_batch_size: 32", "global_batch_size: null",
     "train.global_batch_size: expected an int, got None"),
    ("global_batch_size: 32", "global_batch_size: '32'",
     "train.global_batch_size: expected an int, got '32'"),
    ("learning_rate: 0.1", "learning_rate: fast",
     "train.optimizer.learning_rate: SGD: learning_rate must be a non-negative finite float, "
     "got learning_rate='fast'"),
    ("learning_rate: 0.1", "learning_rate: [0.1]",
     "train.optimizer.learning_rate: expected a number (a schedule goes in "
     "train.optimizer.schedule), got [0.1]"),
    ("epochs: 2", "epochs: two", "train.epochs: expected an int or null, got 'two'"),
])
def test_wrong_type_names_path_value_and_line(old, new, expected):
    key = old.split(":")[0]
    assert error_of(edit(old, new)) == f"config.yaml:{LINE[key]}: {expected}"


def test_int_accepted_for_float_and_1e_notation_is_a_float():
    config = parse(edit("learning_rate: 0.1", "learning_rate: 1"))
    assert config.train.optimizer.learning_rate == 1  # as written; the optimizer's float:
    rate = builder.build_optimizer(config.train.optimizer, 10).learning_rate
    assert rate == 1.0 and isinstance(rate, float)
    config = parse(edit("learning_rate: 0.1", "learning_rate: 1e-3"))
    assert config.train.optimizer.learning_rate == 1e-3


@pytest.mark.parametrize("old,new,line,expected", [
    ("learning_rate: 0.1", "learning_rate: -0.1", 16,
     "train.optimizer.learning_rate: SGD: learning_rate must be a non-negative finite float, "
     "got learning_rate=-0.1"),
    ("learning_rate: 0.1", "learning_rate: .inf", 16,
     "train.optimizer.learning_rate: SGD: learning_rate must be a non-negative finite float, "
     "got learning_rate=inf"),
    ("learning_rate: 0.1", "learning_rate: 0.1\n    momentum: 1.0", 17,
     "train.optimizer.momentum: SGD: momentum must be a float in [0, 1), got momentum=1.0"),
    ("global_batch_size: 32", "global_batch_size: 0", 12,
     "train.global_batch_size: must be >= 1, got 0"),
    ("name: sgd", "name: adma", 15,
     "train.optimizer.name: expected one of 'sgd', 'adam', 'adamw', got 'adma' "
     "(did you mean 'adam'?)"),
    ("seed: 1", "seed: -1", 1, "seed: must be >= 0, got -1"),
])
def test_out_of_range_names_path_value_and_line(old, new, line, expected):
    assert error_of(edit(old, new)) == f"config.yaml:{line}: {expected}"


def test_error_carries_location_and_path():
    with pytest.raises(ConfigError) as info:
        parse(edit("learning_rate: 0.1", "learning_rate: -1"))
    assert isinstance(info.value, ValueError)
    assert info.value.location == f"config.yaml:{LINE['learning_rate']}"
    assert info.value.path == "train.optimizer.learning_rate"


@pytest.mark.parametrize("text,line", [
    (edit("epochs: 2", "epochs: [2"), 14),
    (edit("  name: patterns", "  name: patterns\n bad: indent"), 4),
    (edit("seed: 1", "seed: 1\n\tdata: x"), 2),
])
def test_malformed_yaml_reports_line_and_column(text, line):
    msg = error_of(text)
    assert msg.startswith(f"config.yaml:{line}:"), msg
    assert "malformed YAML" in msg


def test_duplicate_key_names_key_and_both_lines():
    msg = error_of(edit("epochs: 2", "epochs: 2\n  epochs: 3"))
    assert msg.startswith("config.yaml:14:")
    assert "duplicate key 'epochs' in train" in msg
    assert "first on line 13, again on line 14" in msg


def test_duplicate_key_in_flow_mapping_and_at_top_level():
    assert "duplicate key 'type'" in error_of(edit("{type: Dense,", "{type: Dense, type: X,"))
    assert "duplicate key 'seed' in the top level" in error_of("seed: 1\n" + BASE)


@pytest.mark.parametrize("payload", [
    "!!python/object/apply:os.system ['touch {marker}']",
    "!!python/object/apply:builtins.open ['{marker}', 'w']",
    "!!python/object/new:builtins.open ['{marker}', 'w']",
    "!!python/name:os.system",
    "!!python/object/apply:subprocess.check_call [['touch', '{marker}']]",
])
def test_python_tags_refused_and_nothing_runs(tmp_path, payload):
    marker = tmp_path / "pwned"
    text = payload.format(marker=marker)
    for where in (f"seed: {text}\n", BASE + f"logging:\n  progress: {text}\n"):
        msg = error_of(where)
        assert "is not allowed" in msg and "python/" in msg
        assert not marker.exists()
    with pytest.raises(ConfigError):
        parse(overrides=[f"seed={text}"])
    assert not marker.exists()


def test_the_python_tag_payload_is_live(tmp_path):
    # The refusal above means something: PyYAML's unsafe loader does create the file.
    marker = tmp_path / "pwned"
    yaml.unsafe_load(f"!!python/object/apply:builtins.open ['{marker}', 'w']").close()
    assert marker.exists()


def test_custom_and_non_plain_tags_refused():
    assert "tag '!include' is not allowed" in error_of("!include other.yaml\n")
    msg = error_of(edit("seed: 1", "seed: 2024-01-01"))
    assert msg.startswith("config.yaml:1:") and "'!!timestamp'" in msg and "quote" in msg
    assert "'!!binary'" in error_of(edit("seed: 1", "seed: !!binary aGk="))
    assert "'!!set'" in error_of(edit("seed: 1", "seed: !!set {a}"))


def test_recursive_alias_refused():
    assert "recursive alias" in error_of("a: &x [*x]\n")


def test_alias_bomb_refused_quickly():
    # Nine levels of ten aliases each: 10**9 values if expanded.
    names = "abcdefghi"
    text = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{names[i + 1]}: &{names[i + 1]} [{', '.join(['*' + names[i]] * 10)}]\n"
        for i in range(8))
    start = time.perf_counter()
    assert "more than 100000 values" in error_of(text)
    assert time.perf_counter() - start < 2.0


def test_plain_pyyaml_is_left_alone():
    # The 1e-3-is-a-float resolver belongs to our loader only.
    assert yaml.safe_load("x: 1e-3") == {"x": "1e-3"}


def test_anchors_and_merge_keys():
    text = edit("    - type: BatchNormalization\n      momentum: 0.9\n",
                "    - &bn {type: BatchNormalization, momentum: 0.5, center: false}\n"
                "    - *bn\n"
                "    - {<<: *bn, momentum: 0.8}\n")
    layers = parse(text).model.layers
    assert layers[1].kwargs == layers[2].kwargs == {"momentum": 0.5, "center": False}
    assert layers[3].type == "BatchNormalization"
    assert layers[3].kwargs == {"momentum": 0.8, "center": False}  # explicit key wins
    assert layers[3].locations["momentum"] == "config.yaml:10"


def test_empty_and_non_mapping_documents():
    assert error_of("") == "config.yaml: model: required key is missing"
    assert "top level must be a mapping, got [1]" in error_of("- 1\n")
    msg = error_of(BASE + "---\nseed: 2\n")
    assert msg.startswith("config.yaml:17:1: malformed YAML: but found another document")


# --- --set overrides ---------------------------------------------------------------------

def test_set_without_equals():
    assert error_of(overrides=["train.steps"]) == \
        "--set train.steps: expected KEY.PATH=VALUE, e.g. train.steps=100"


def test_set_unknown_path():
    assert error_of(overrides=["train.stepz=3"]) == \
        "--set train.stepz=3: unknown key 'train.stepz' (did you mean 'train.steps'?)"
    msg = error_of(overrides=["train.optimizer.foo.bar=1"])
    assert msg.startswith("--set train.optimizer.foo.bar=1: train.optimizer.foo: unknown "
                          "argument 'foo' for optimizer 'sgd'")


def test_set_wrong_type_and_range():
    assert error_of(overrides=["train.steps=abc"]) == \
        "--set train.steps=abc: train.steps: expected an int or null, got 'abc'"
    assert error_of(overrides=["train.optimizer.learning_rate=-0.1"]) == (
        "--set train.optimizer.learning_rate=-0.1: train.optimizer.learning_rate: "
        "SGD: learning_rate must be a non-negative finite float, got learning_rate=-0.1")
    assert "malformed" in error_of(overrides=["seed=[1"])


def test_set_into_scalar_and_bad_index():
    assert "'seed' is 1, not a mapping or list" in error_of(overrides=["seed.x=1"])
    assert "index 7 out of range: 'model.layers' has 3 entries" in \
        error_of(overrides=["model.layers.7.momentum=0.5"])
    assert "is a list: index it with a number" in error_of(overrides=["model.layers.x=1"])
    assert "bad key path" in error_of(overrides=["train..steps=1"])


def test_set_values_and_list_indexing():
    config = parse(overrides=["model.layers.1.momentum=0.5", "model.layers[2].units=7",
                              "train.optimizer.learning_rate=0.02", "model.dtype=float64",
                              "strategy.sync_group=node", "train.optimizer.schedule.name=cosine"])
    assert config.model.layers[1].kwargs == {"momentum": 0.5}
    assert config.model.layers[2].kwargs == {"units": 7}
    assert config.train.optimizer.learning_rate == 0.02
    assert config.model.dtype == "float64" and config.strategy.sync_group == "node"
    assert config.train.optimizer.schedule.name == "cosine"
    assert config.model.layers[1].locations["momentum"] == "--set model.layers.1.momentum=0.5"


def test_set_later_wins_and_mapping_input_not_mutated():
    raw = parse().to_dict()
    before = json.dumps(raw, sort_keys=True)
    config = parse_config(raw, overrides=["seed=5", "seed=6", "train.steps=3"])
    assert config.seed == 6 and config.train.steps == 3
    assert json.dumps(raw, sort_keys=True) == before
    assert parse_config(raw, overrides=None) == parse_config(raw, overrides="seed=1")


def test_parse_override():
    assert parse_override("a.b.c=1") == (("a", "b", "c"), 1)
    assert parse_override("model.layers[2].x=") == (("model", "layers", 2, "x"), None)
    assert parse_override("a=x=y") == (("a",), "x=y")
    assert parse_override("a={b: [1, 2]}") == (("a",), {"b": [1, 2]})


def test_steps_override_beats_file_epochs_and_vice_versa():
    config = parse(overrides=["train.steps=12"])
    assert config.train.steps == 12 and config.train.epochs is None
    with_steps = edit("epochs: 2", "steps: 40")
    config = parse(with_steps, overrides=["train.epochs=3"])
    assert config.train.epochs == 3 and config.train.steps is None
    config = parse(with_steps)
    assert config.train.steps == 40 and config.train.epochs is None


def test_epochs_and_steps_together_is_an_error():
    msg = error_of(edit("epochs: 2", "epochs: 2\n  steps: 3"))
    assert msg.startswith("config.yaml:14: train.steps: give either train.epochs or "
                          "train.steps, not both (epochs=2 at config.yaml:13)")
    msg = error_of(overrides=["train.steps=5", "train.epochs=1"])
    assert "not both" in msg
    assert parse(edit("  epochs: 2\n", "")).train.epochs == 1  # neither: one epoch


# --- cross-field and layer checks --------------------------------------------------------

def test_data_cross_checks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.npz").write_bytes(b"")
    assert error_of(overrides=["data.name=npz"]) == \
        "--set data.name=npz: data.path: required when data.name is 'npz'"
    msg = error_of(edit("n_train: 100", "n_train: 100\n  path: x.npz"))
    assert msg == ("config.yaml:5: data.path: only used when data.name is 'npz' or 'npy', "
                   "got 'x.npz'")
    config = parse(overrides=["data.name=npz", "data.path=d.npz"])
    assert config.data.n_train == 100 and config.data.n_test is None
    assert config.data.path == str(tmp_path / "d.npz")  # --set: from the working directory
    assert "data.path: data file 'e.npz' not found: looked for" in error_of(
        overrides=["data.name=npz", "data.path=e.npz"])
    assert "must be <= 10" in error_of(overrides=["data.num_classes=11"])


def test_schedule_and_strategy_checks():
    assert "train.optimizer.schedule.decay_steps: required for schedule 'step'" in \
        error_of(overrides=["train.optimizer.schedule.name=step"])
    assert parse(overrides=["strategy.sync_group=2"]).strategy.sync_group == 2
    assert "must be >= 1, got 0" in error_of(overrides=["strategy.sync_group=0"])
    assert "did you mean 'node'" in error_of(overrides=["strategy.sync_group=nod"])
    assert "expected an int or one of 'node' or null, got True" in \
        error_of(overrides=["strategy.sync_group=true"])


# --- typed optimizer and schedule entries ------------------------------------------------

@pytest.mark.parametrize("optimizer,expected", [
    # An argument the chosen class does not take, once silently ignored:
    ("{name: adam, momentum: 0.5}",
     "train.optimizer.momentum: unknown argument 'momentum' for optimizer 'adam' (accepted: "
     "learning_rate, beta_1, beta_2, epsilon, amsgrad, weight_decay, name, global_clipnorm, "
     "schedule; 'momentum' is an argument of 'sgd')"),
    ("{name: adamw, nesterov: true}",
     "train.optimizer.nesterov: unknown argument 'nesterov' for optimizer 'adamw'"),
    ("{name: sgd, beta_1: 0.5}", "'beta_1' is an argument of 'adam' and 'adamw'"),
    ("{name: sgd, schedul: {}}", "train.optimizer.schedul: unknown argument 'schedul' for "
     "optimizer 'sgd' (did you mean 'schedule'?)"),
    ("{name: sgd, schedule: {name: constant, alpha: 0.1}}",
     "train.optimizer.schedule.alpha: unknown argument 'alpha' for schedule 'constant' "
     "(accepted: warmup_steps, warmup_from, name; 'alpha' is an argument of 'cosine')"),
    ("{name: sgd, schedule: {name: cosine, decay_rate: 0.5}}",
     "(did you mean 'decay_steps'? 'decay_rate' is an argument of 'step')"),
    # Bounds are the constructors' own checks, quoted with the class:
    ("{name: adam, beta_2: 1.0}",
     "train.optimizer.beta_2: Adam: beta_2 must be a float in [0, 1), got beta_2=1.0"),
    ("{name: sgd, nesterov: 1}", "train.optimizer.nesterov: SGD: nesterov must be a bool, "
     "got nesterov=1"),
    ("{name: sgd, schedule: {name: step, decay_steps: 0}}",
     "train.optimizer.schedule.decay_steps: StepDecay: decay_steps must be a positive "
     "integer, got decay_steps=0"),
    ("{name: sgd, schedule: {name: cosine, alpha: 2}}",
     "train.optimizer.schedule.alpha: CosineDecay: alpha must be a float in [0, 1], got "
     "alpha=2"),
    ("{name: sgd, schedule: {warmup_steps: -1}}",
     "train.optimizer.schedule.warmup_steps: Constant: warmup_steps must be a non-negative "
     "integer, got warmup_steps=-1"),
    ("{name: sgd, global_clipnorm: 0}", "train.optimizer.global_clipnorm: global_clipnorm "
     "must be a positive finite float, got global_clipnorm=0.0"),
])
def test_optimizer_and_schedule_are_checked_by_their_constructors(optimizer, expected):
    msg = error_of(overrides=[f"train.optimizer={optimizer}"])
    assert msg.startswith(f"--set train.optimizer={optimizer}: "), msg
    assert expected in msg, msg


def test_typed_entry_error_names_the_yaml_line():
    msg = error_of(edit("learning_rate: 0.1", "learning_rate: 0.1\n    momentum: 0.5",
                        edit("name: sgd", "name: adam")))
    assert msg.startswith(f"config.yaml:{LINE['learning_rate'] + 1}: "
                          "train.optimizer.momentum: unknown argument 'momentum' for "
                          "optimizer 'adam'"), msg


def test_optimizer_entry_defaults_arguments_and_build():
    opt = parse().train.optimizer
    # The config's defaults where they differ from Keras' (sgd momentum 0.9) are written
    # out; every other argument is the constructor's default.
    assert opt.kwargs == {"learning_rate": 0.1, "momentum": 0.9}
    assert opt.momentum == 0.9 and opt.nesterov is False and opt.weight_decay is None
    with pytest.raises(AttributeError, match="no argument 'beta_1'"):
        _ = opt.beta_1
    assert parse_config({"model": {"layers": [{"type": "Dense", "units": 2}]}}) \
        .train.optimizer == parse(overrides=["train.optimizer={}"]).train.optimizer \
        .__class__()
    config = parse(overrides=["train.optimizer={name: adam, amsgrad: true, epsilon: 0.0, "
                              "schedule: {name: cosine, warmup_steps: 2, warmup_from: 0.01}}"])
    built = builder.build_optimizer(config.train.optimizer, 12)
    assert type(built) is optimizers.Adam and built.amsgrad and built.epsilon == 0.0
    sched = built.schedule
    assert type(sched) is schedules.CosineDecay and sched.decay_steps == 10  # 12 - warm-up
    assert sched.warmup_from == 0.01 and sched.initial == 0.01  # the config's default
    adamw = parse(overrides=["train.optimizer.name=adamw"]).train.optimizer
    assert builder.build_optimizer(adamw, 5).weight_decay == 0.0  # the config's default
    assert parse_config(config.to_dict()) == config
    assert parse_config(config_to_yaml(config)) == config


@pytest.mark.parametrize("layers,expected", [
    ("[]", "model.layers: must list at least one layer"),
    ("{type: Dense}", "model.layers: expected a list of layer mappings"),
    ("[Dense]", "model.layers[0]: expected a mapping with a 'type' key, got 'Dense'"),
    ("[{units: 3}]", "model.layers[0]: missing 'type'"),
    ("[{type: 3}]", "model.layers[0].type: expected a layer class name, got 3"),
])
def test_layer_structure_errors(layers, expected):
    msg = error_of(f"model:\n  layers: {layers}\n")
    assert msg.startswith(f"config.yaml:2: {expected}"), msg


def test_layer_spec_error_quotes_the_yaml_line():
    spec = parse().model.layers[1]
    assert spec.path("momentum") == layer_path(1, "momentum") == "model.layers[1].momentum"
    err = spec.error("momentum", "must be in [0, 1], got 1.5")
    assert isinstance(err, ConfigError)
    assert str(err) == f"config.yaml:{LINE['momentum']}: model.layers[1].momentum: " \
                       "must be in [0, 1], got 1.5"
    # A key the entry does not have: the entry's own line.
    assert str(spec.error("center", "x")).startswith("config.yaml:8: model.layers[1].center")


def test_missing_required_model():
    assert error_of("seed: 0\n") == "config.yaml: model: required key is missing"
    assert error_of("model: {}\n") == "config.yaml:1: model.layers: required key is missing"


# --- round trips, hashing, files ---------------------------------------------------------

def test_to_dict_round_trip_and_plain_types():
    config = parse(overrides=["train.optimizer.global_clipnorm=1"])
    data = config.to_dict()
    json.dumps(data)  # plain types only
    assert "source" not in data
    assert data["model"]["layers"][1] == {"type": "BatchNormalization", "momentum": 0.9}
    assert parse_config(data) == config
    text = config_to_yaml(config)
    assert parse_config(text) == config
    assert config_hash(parse_config(text)) == config_hash(config)


def test_yaml_output_quotes_number_like_strings():
    config = parse(overrides=["model.layers.0.name='1e5'"])
    assert config.model.layers[0].kwargs["name"] == "1e5"
    assert parse_config(config_to_yaml(config)) == config


def test_hash_stable_and_sensitive():
    a = parse()
    h = config_hash(a)
    assert len(h) == 64 and int(h, 16) >= 0
    assert config_hash(parse()) == h
    assert config_hash(parse_config(a.to_dict(), source="elsewhere")) == h
    assert config_hash(parse("# comment\n" + BASE.replace(": ", ":   "))) == h
    assert config_hash(parse(overrides=["train.optimizer.learning_rate=0.1"])) == h
    for override in ("seed=2", "train.optimizer.learning_rate=0.2",
                     "model.layers.1.momentum=0.95", "model.synchronized=false"):
        assert config_hash(parse(overrides=[override])) != h, override


def test_load_config_file_and_errors(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(edit("learning_rate: 0.1", "learning_rate: -0.1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}:{LINE['learning_rate']}: ")
    config = load_config(path, overrides=["train.optimizer.learning_rate=0.3"])
    assert config.source == os.fspath(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(tmp_path)
