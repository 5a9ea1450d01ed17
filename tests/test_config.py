"""Config reading: YAML 1.2 numbers, and every TrainConfig key checked against its type."""

from __future__ import annotations

import dataclasses
import re
import typing

import pytest
import yaml

from pixelwise.config import check_field_types, describe, load_yaml, matches
from pixelwise.training import TrainConfig, load_config


@pytest.mark.parametrize(
    ("text", "value"),
    [("1e-3", 0.001), ("-2.5E+4", -25000.0), (".5e1", 5.0), ("1.0e-3", 0.001), ("12", 12), ("1e", "1e"),
     ("[1e-3, 2]", [0.001, 2]), ("abc", "abc"), ("true", True), ("", None)],
)
def test_load_yaml_reads_exponent_floats(text, value) -> None:
    assert load_yaml(text) == value and type(load_yaml(text)) is type(value)


def test_load_yaml_leaves_pyyaml_alone_and_stays_safe() -> None:
    assert yaml.safe_load("1e-3") == "1e-3"  # the stock loader is not changed
    with pytest.raises(yaml.YAMLError):
        load_yaml("!!python/object/apply:os.system ['true']")


@pytest.mark.parametrize(
    ("value", "hint", "ok"),
    [(1, float, True), (True, float, False), (True, int, False), (1.5, int, False), ("a", str, True),
     (None, int | None, True), ([1, 2], list[int] | None, True), ([1, 2.5], list[int], False),
     ([1, 2.5], list[float], True), ((1, 2), list[int], False), ({"a": 1}, dict[str, int], True),
     ({1: 1}, dict[str, int], False), ("median_frequency", str | list[float] | None, True),
     (5, str | list[float] | None, False)],
)
def test_matches(value, hint, ok) -> None:
    assert matches(value, hint) is ok


def test_describe() -> None:
    assert describe(list[int] | None) == "a list of whole numbers or null"
    assert describe(float) == "a number" and describe(bool) == "true or false"


# Every field of TrainConfig with one value of the wrong type and the words the error must hold.
WRONG = {
    "data": (3, "data=3 must be text"),
    "out": (None, "out is empty"),
    "model": (1, "model=1 must be text"),
    "model_args": (5, "model_args=5 must be a mapping"),
    "task": (None, "task is empty"),
    "train_split": (1, "train_split=1 must be text"),
    "val_split": (1.5, "val_split=1.5 must be text"),
    "epochs": (2.5, "epochs=2.5 must be a whole number"),
    "max_minutes": ("soon", "max_minutes='soon' must be a number or null"),
    "batch_size": ("8", "batch_size='8' must be a whole number"),
    "accumulate": (True, "accumulate=True must be a whole number"),
    "crop_size": (64, "crop_size=64 must be a list of whole numbers or null"),
    "scale_range": (0.5, "scale_range=0.5 must be a list of numbers"),
    "hflip": ("yes", "hflip='yes' must be true or false"),
    "color_jitter": ("x", "color_jitter='x' must be a number"),
    "elastic": (1, "elastic=1 must be true or false"),
    "mean": ("abc", "mean='abc' must be a list of numbers or null"),
    "std": ([1, "a"], "std=[1, 'a'] must be a list of numbers or null"),
    "optimizer": (1, "optimizer=1 must be text"),
    "lr": ("abc", "lr='abc' must be a number"),
    "momentum": ([0.9], "momentum=[0.9] must be a number"),
    "weight_decay": ("0", "weight_decay='0' must be a number"),
    "poly_power": (None, "poly_power is empty"),
    "loss": (2, "loss=2 must be text"),
    "class_weights": (5, "class_weights=5 must be text or a list of numbers or null"),
    "unet_weight_map": ("no", "unet_weight_map='no' must be true or false"),
    "bf16": (0, "bf16=0 must be true or false"),
    "workers": (1.0, "workers=1.0 must be a whole number"),
    "seed": ("0", "seed='0' must be a whole number"),
    "val_every": ([1], "val_every=[1] must be a whole number"),
    "val_scales": (1.0, "val_scales=1.0 must be a list of numbers"),
    "threads": ("2", "threads='2' must be a whole number or null"),
    "val_fraction": ("0.2", "val_fraction='0.2' must be a number"),
}


def test_keys_outside_the_table_are_checked_too() -> None:
    """Keys added later: some value of another type than the hint says must be refused, naming the key."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in WRONG:
            continue
        wrong = next(v for v in (3, "x", 2.5, [object()], {"a": object()}, True) if not matches(v, hints[f.name]))
        with pytest.raises(ValueError, match=f"^{f.name}="):
            TrainConfig(**{"data": "somewhere", f.name: wrong})


@pytest.mark.parametrize("key", sorted(WRONG))
def test_train_config_refuses_a_wrong_type_naming_the_key(key) -> None:
    value, message = WRONG[key]
    kwargs = {"data": "somewhere", key: value}
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        TrainConfig(**kwargs)


def test_train_config_accepts_ints_for_floats_and_checks_pairs() -> None:
    cfg = TrainConfig(data="d", lr=1, max_minutes=2, mean=[0, 0, 0], crop_size=[32, 48])
    check_field_types(cfg)
    with pytest.raises(ValueError, match=r"crop_size=\[1, 2, 3\] must hold two numbers"):
        TrainConfig(data="d", crop_size=[1, 2, 3])
    with pytest.raises(ValueError, match=r"ema_decay=1 must be in \(0, 1\)"):
        TrainConfig(data="d", ema_decay=1)


def test_overrides_parse_exponents_and_refuse_bad_values() -> None:
    assert load_config(None, ["data=x", "lr=1e-3", "weight_decay=5E-4"]).lr == 0.001
    with pytest.raises(ValueError, match="lr='abc' must be a number"):
        load_config(None, ["data=x", "lr=abc"])
    with pytest.raises(ValueError, match="needs a 'data' value"):
        load_config(None, ["data="])
