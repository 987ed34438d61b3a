"""Config: defaults, YAML files, --set overrides and the messages for bad values."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from keras_ham.config import (
    FIELD_HELP,
    Config,
    ConfigError,
    add_config_arguments,
    config_reference_markdown,
    load_config,
    parse_overrides,
    valid_keys,
)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return parser.parse_args(argv)


def test_defaults_match_the_documented_recipe():
    config = load_config()
    assert config == Config()
    assert (config.seed, config.model, config.image_size, config.batch_size, config.max_epochs) == (
        42,
        "resnet50",
        224,
        32,
        15,
    )
    assert config.lr == pytest.approx(3e-4)
    assert config.weight_decay == pytest.approx(1e-4)
    assert config.label_smoothing == pytest.approx(0.05)
    assert config.use_class_weights is True


def test_yaml_file_changes_only_the_keys_it_lists(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text("max_epochs: 3\nweights: null\nimage_dirs: [a, b]\nlr: 1e-3\n", encoding="utf-8")
    config = load_config(path)
    assert config.max_epochs == 3
    assert config.weights is None
    assert config.image_dirs == ("a", "b")
    assert config.lr == pytest.approx(1e-3)  # YAML reads "1e-3" as a string; coerced
    assert config.batch_size == Config().batch_size


def test_set_overrides_win_over_the_yaml_file_and_use_yaml_values(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("max_epochs: 3\nbatch_size: 8\n", encoding="utf-8")
    args = parse(
        ["--config", str(path), "--set", "max_epochs=5", "--set", "weights=null", "--set", "image_dirs=[x, y]",
         "--set", "use_class_weights=false", "--set", "lr=2e-3"]
    )
    config = load_config(args.config, args.overrides)
    assert config.max_epochs == 5
    assert config.batch_size == 8
    assert config.weights is None
    assert config.image_dirs == ("x", "y")
    assert config.use_class_weights is False
    assert config.lr == pytest.approx(2e-3)


def test_unknown_key_lists_the_valid_keys(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("max_epoch: 3\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert str(path) in message
    assert "max_epoch" in message
    assert "Valid keys:" in message
    for key in valid_keys():
        assert key in message


@pytest.mark.parametrize(
    "override, key, shown",
    [
        ("batch_size=abc", "batch_size", "'abc'"),
        ("use_class_weights=maybe", "use_class_weights", "'maybe'"),
        ("max_epochs=2.5", "max_epochs", "2.5"),
        ("model=[1]", "model", "[1]"),
        ("image_dirs=[a, 3]", "image_dirs", "3"),
        ("image_dirs=['']", "image_dirs", "''"),
    ],
)
def test_wrong_type_names_key_and_value(override, key, shown):
    with pytest.raises(ConfigError) as caught:
        load_config(None, [override])
    assert f"'{key}'" in str(caught.value)
    assert shown in str(caught.value)


@pytest.mark.parametrize(
    "override, key, shown",
    [
        ("image_size=16", "image_size", "16"),
        ("batch_size=0", "batch_size", "0"),
        ("lr=0", "lr", "0"),
        ("lr=-1e-3", "lr", "-0.001"),
        ("dropout=1.0", "dropout", "1.0"),
        ("dropout=.nan", "dropout", "nan"),
        ("test_fraction=0.95", "test_fraction", "0.95"),
        ("model=vgg16", "model", "'vgg16'"),
    ],
)
def test_out_of_range_names_key_and_value(override, key, shown):
    with pytest.raises(ConfigError) as caught:
        load_config(None, [override])
    assert f"'{key}'" in str(caught.value)
    assert shown in str(caught.value)


def test_fractions_must_leave_training_images():
    with pytest.raises(ConfigError, match="test_fraction.*val_fraction"):
        load_config(None, {"test_fraction": 0.5, "val_fraction": 0.45})


def test_choice_error_lists_the_choices():
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["device=tpu"])
    for device in ("auto", "cpu", "cuda"):
        assert device in str(caught.value)


def test_empty_file_gives_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")
    assert load_config(path) == Config()


@pytest.mark.parametrize("text", ["- max_epochs\n- 3\n", "just a string\n", "42\n"])
def test_non_mapping_yaml_is_rejected(tmp_path, text):
    path = tmp_path / "list.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(path)


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("max_epochs: [3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML") as caught:
        load_config(path)
    assert str(path) in str(caught.value)


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("item", ["max_epochs", "=3", " =3"])
def test_bad_override_syntax_shows_an_example(item):
    with pytest.raises(ConfigError, match="expected key=value") as caught:
        parse_overrides([item])
    assert repr(item) in str(caught.value)


def test_override_with_invalid_yaml_value():
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_overrides(["image_dirs=[a"])


def test_config_is_frozen_and_replace_validates():
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 1  # type: ignore[misc]
    assert config.replace(seed=7).seed == 7
    with pytest.raises(ConfigError, match="batch_size"):
        config.replace(batch_size=-1)


def test_yaml_round_trip_keeps_every_value(tmp_path):
    config = load_config(None, ["weights=null", "image_dirs=[a, b]", "lr=1e-3", "run_name=trial"])
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml(), encoding="utf-8")
    assert load_config(path) == config


def test_every_key_is_documented_in_the_reference_table():
    assert set(FIELD_HELP) == set(valid_keys())
    table = config_reference_markdown()
    for key in valid_keys():
        assert f"| `{key}` |" in table


def test_readme_config_table_matches_the_dataclass(repo_root):
    from keras_ham.config import config_reference_markdown

    assert config_reference_markdown() in (repo_root / "README.md").read_text(encoding="utf-8")


def test_shipped_configs_load(repo_root):
    from keras_ham.config import load_config

    for path in sorted((repo_root / "configs").glob("*.yaml")):
        config = load_config(path)
        assert config.model in ("resnet50", "resnet18"), path


def test_unusable_config_files_are_named_with_the_problem(tmp_path):
    numeric_key = tmp_path / "numeric.yaml"
    numeric_key.write_text("1: 2\nlr: 0.1\n")
    with pytest.raises(ConfigError, match=r"numeric.yaml: Config keys must be names, received 1\. Valid keys: seed"):
        load_config(numeric_key)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="binary.yaml is not UTF-8 text"):
        load_config(binary)
    with pytest.raises(ConfigError, match="is a folder; expected a YAML file"):
        load_config(tmp_path)


def test_a_bad_override_is_blamed_on_the_override_not_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.01\nmax_epochs: 0\n")
    with pytest.raises(ConfigError, match=r"^--set lr: Config key 'lr'"):
        load_config(path, ["lr=nan", "max_epochs=2"])
    with pytest.raises(ConfigError, match=r"c.yaml: Config key 'max_epochs'"):
        load_config(path, ["lr=0.1"])
