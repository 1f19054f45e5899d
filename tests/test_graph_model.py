"""`Model`: layers that name their inputs (branches, residual blocks, merges): forward
and backward against central differences, the wiring's errors, and the YAML form."""

import textwrap

import numpy as np
import pytest
from gradcheck import numeric_grad

import distbn
from distbn.models import INPUT, Model, Sequential
from distbn.train import builder
from distbn.train.config import ConfigError, parse_config

RNG = np.random.default_rng(4)


def residual(dtype="float64"):
    """input -> dense -> relu -> dense2 ; (dense + dense2) -> out (a skip over relu, dense2),
    dense's output feeding two layers."""
    layers = [distbn.Dense(4, name="dense", dtype=dtype),
              distbn.ReLU(name="relu", dtype=dtype),
              distbn.Dense(4, name="dense2", dtype=dtype),
              distbn.layers.Add(name="sum", dtype=dtype),
              distbn.BatchNormalization(name="bn", dtype=dtype),
              distbn.Dense(3, name="out", dtype=dtype)]
    return Model(layers, inputs={"sum": ["dense", "dense2"]})


def test_residual_forward_is_the_composition_and_backward_matches_central_differences():
    model = residual()
    x = RNG.normal(size=(5, 3))
    model.build((None, 3))
    dense, relu, dense2, _, bn, out = model.layers
    h = dense(x)
    expected = out(bn(h + dense2(relu(h)), training=True))
    y = model(x, training=True)
    np.testing.assert_allclose(y, expected, rtol=1e-12)
    dy = RNG.normal(size=y.shape)
    dx = model.backward(dy)

    def loss():
        return float(np.sum(model(x, training=True) * dy))

    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-6, atol=1e-8)
    model(x, training=True)
    model.backward(dy)
    kernel = dense.kernel
    got = kernel.grad.copy()
    np.testing.assert_allclose(got, numeric_grad(loss, kernel.value), rtol=1e-6, atol=1e-8)


def test_layer_outputs_follow_the_order_and_summary_shows_the_wiring():
    model = residual()
    x = RNG.normal(size=(2, 3))
    names = [la.name for la, _ in model.layer_outputs(x)]
    assert names == ["dense", "relu", "dense2", "sum", "bn", "out"]
    assert "Add <- dense, dense2" in model.summary()
    again = Model.from_config(model.get_config())
    assert again.get_config()["inputs"] == {"sum": ["dense", "dense2"]}


def test_layers_given_out_of_order_run_after_their_sources():
    a, b, c = (distbn.Dense(2, name=n) for n in "abc")
    model = Model([b, a, c], inputs={"a": [INPUT], "b": ["a"], "c": ["b"]})
    assert [model.layers[i].name for i in model.order] == ["a", "b", "c"]


@pytest.mark.parametrize("inputs,message", [
    ({"b": ["nope"]}, "layer 'b' takes 'nope', which is neither a layer nor 'input'"),
    ({"a": ["b"], "b": ["a"]}, "the inputs form a cycle: "),
    ({"b": ["b"]}, "layer 'b' takes its own output (a cycle)"),
    ({"b": ["a", INPUT]}, "layer 'b' (Dense) takes one input, got ['a', 'input']"),
    ({"c": ["a"]}, "inputs are given for 'c', which is not a layer"),
])
def test_wiring_errors_name_the_layer(inputs, message):
    with pytest.raises(ValueError) as info:
        Model([distbn.Dense(2, name="a"), distbn.Dense(2, name="b")], inputs=inputs)
    assert message in str(info.value)


def test_an_output_that_feeds_nothing_is_an_error():
    with pytest.raises(ValueError, match="the output of layer 'a' feeds no other layer"):
        Model([distbn.Dense(2, name="a"), distbn.Dense(2, name="b")], inputs={"b": [INPUT]})


def test_sequential_is_unchanged():
    model = Sequential([distbn.Dense(3), distbn.ReLU()])
    assert model.sources(0) == [INPUT] and model.order == [0, 1]


CONFIG = textwrap.dedent("""\
    seed: 0
    data: {name: patterns, n_train: 20, n_test: 10, image_size: 8}
    model:
      dtype: float64
      layers:
        - {type: Conv2D, filters: 4, kernel_size: 3, padding: same, name: stem}
        - {type: BatchNormalization}
        - {type: ReLU}
        - {type: Conv2D, filters: 4, kernel_size: 3, padding: same, inputs: [INPUTS]}
        - {type: GlobalAveragePooling2D}
        - {type: Dense, units: 10}
    train: {from_logits: true, steps: 1}
""")


def _build(text):
    config = parse_config(text, source="cfg.yaml")
    return builder.build_model(config, (8, 8, 3), 10)


def test_yaml_inputs_build_a_model():
    model = _build(CONFIG.replace("INPUTS", "re_lu"))
    assert isinstance(model, Model) and model.sources(3) == ["re_lu"]
    assert model.layers[3].kernel.shape == (3, 3, 4, 4)


@pytest.mark.parametrize("inputs,line,message", [
    ("nope", 9, "model.layers[3].inputs: Model 'model': layer 'conv2d' takes 'nope'"),
    ("stem", 8, "the output of layer 're_lu' feeds no other layer"),
    ("[]", 9, "model.layers[3].inputs: must be a layer name or a non-empty list"),
])
def test_yaml_wiring_errors_quote_the_entry_line(inputs, line, message):
    with pytest.raises(ConfigError) as info:
        _build(CONFIG.replace("[INPUTS]", inputs))
    assert str(info.value).startswith(f"cfg.yaml:{line}: "), str(info.value)
    assert message in str(info.value)


def test_resnet_config_builds_and_a_merge_shape_mismatch_names_the_entry():
    from pathlib import Path

    from distbn.train.config import load_config

    path = Path(__file__).resolve().parents[1] / "configs" / "resnet.yaml"
    config = load_config(path)
    model = builder.build_model(config, (16, 16, 3), 10)
    assert isinstance(model, Model) and model.count_params() > 20000
    text = path.read_text().replace("kernel_size: 1, strides: 2,", "kernel_size: 1, strides: 1,")
    with pytest.raises(ConfigError) as info:
        builder.build_model(parse_config(text, source="resnet.yaml"), (16, 16, 3), 10)
    line = next(i for i, t in enumerate(text.splitlines(), 1)
                if "inputs: [block2_shortcut, block2_residual]" in t)
    assert str(info.value).startswith(f"resnet.yaml:{line}: model.layers[17]: Add 'add_1' "
                                      "cannot take the output of block2_shortcut, "
                                      "block2_residual"), str(info.value)
