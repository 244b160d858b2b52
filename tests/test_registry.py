"""The registry: built-ins arrive through the entry-point group, lazily, with clear errors."""

import sys

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


@pytest.fixture
def plugin_site(tmp_path, monkeypatch):
    """A distribution registering ``nsplugin = nsplugin:NsPlugin`` (its dist-info is all
    importlib.metadata reads), on sys.path for one test; the registry rescans then and after."""
    site = tmp_path / "site"
    info = site / "nsplugin-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: nsplugin\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[kdbench.methods]\nnsplugin = nsplugin:NsPlugin\n")
    monkeypatch.syspath_prepend(str(site))

    def rescan():
        registry.registrations.cache_clear()
        registry.get.cache_clear()
        sys.modules.pop("nsplugin", None)

    rescan()
    yield site
    rescan()


def test_a_plugin_shadowed_by_a_namespace_package_names_the_folder_imported(plugin_site, tmp_path, monkeypatch):
    # The plugin's project folder "nsplugin/" (pyproject.toml, nsplugin.py) seen from its parent
    # directory, first on sys.path as the current directory is: `import nsplugin` finds the
    # folder, a namespace package without the class.
    parent = tmp_path / "parent"
    (parent / "nsplugin").mkdir(parents=True)
    (parent / "nsplugin" / "nsplugin.py").write_text("class NsPlugin: ...\n")
    monkeypatch.syspath_prepend(str(parent))
    with pytest.raises(registry.BrokenPlugin) as raised:
        registry.get("nsplugin")
    message = str(raised.value)
    assert "has no attribute 'NsPlugin'" in message
    assert f"namespace package over {parent / 'nsplugin'}" in message
    assert "\n" not in message


def test_a_plugin_module_without_its_class_names_the_file_imported(plugin_site):
    (plugin_site / "nsplugin.py").write_text("class SomethingElse: ...\n")
    with pytest.raises(registry.BrokenPlugin, match="has no attribute 'NsPlugin'") as raised:
        registry.get("nsplugin")
    assert f"the module imported as nsplugin is {plugin_site / 'nsplugin.py'}" in str(raised.value)
