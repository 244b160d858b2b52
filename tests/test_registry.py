"""The registry: built-ins arrive through the entry-point group, lazily, with clear errors."""

import pytest

from kdbench import registry
from kdbench.errors import UserError
from kdbench.method import Method, MethodConfig, parse_config_value


def test_builtins_are_registered_through_entry_points():
    names = registry.names()
    for name in ("vanilla", "kd", "fitnet", "at", "rkd", "mhgd"):
        assert name in names
        assert registry.registrations()[name][0].distribution == "kdbench"


def test_get_returns_the_class_with_its_name_and_paper():
    kd = registry.get("kd")
    assert issubclass(kd, Method) and kd.name == "kd" and "Hinton" in kd.paper


def test_unknown_method_suggests_the_nearest_names():
    with pytest.raises(UserError, match="did you mean kd"):
        registry.get("kdd")


def test_typed_config_values_from_the_command_line():
    config = registry.get("kd").Config
    assert parse_config_value(config, "temperature", "2") == 2.0
    with pytest.raises(KeyError):
        parse_config_value(config, "temprature", "2")
    with pytest.raises(ValueError):
        parse_config_value(config, "temperature", "warm")


def test_config_round_trips_through_json():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Example(MethodConfig):
        layers: tuple[int, ...] = (1, 2)
        flag: bool = False

    config = Example(layers=(3,), flag=True)
    assert Example.from_json(config.to_json()) == config
    assert parse_config_value(Example, "layers", "1,2,3") == (1, 2, 3)
    assert parse_config_value(Example, "flag", "true") is True
