"""Plugin discovery through a real (tiny) distribution on sys.path: entry points, listing, name resolution, Lightning
strategy names, and the errors for a broken, clashing or missing plugin."""

import sys
import textwrap

import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import SingleDeviceStrategy, StrategyRegistry

from moe_lightning import plugins
from moe_lightning.plugins import known, registry

PLUGIN_MODULE = """
from moe_lightning.plugins import Plugin, Registration

PLUGIN = Plugin("{name}", (
    Registration("strategy", "{name}_single", "lightning.pytorch.strategies:SingleDeviceStrategy",
                 "one CPU device", init_params={{"device": "cpu"}}),
    Registration("experts", "{name}_experts", "{name}_pkg.experts:Experts", "a backend"),
))
"""


def install_fake(root, name, module_source=PLUGIN_MODULE, entry="PLUGIN"):
    """A distribution ``fake-<name>`` with package ``<name>_pkg`` and an entry point ``<name>`` in the group."""
    package = root / f"{name}_pkg"
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent(module_source.format(name=name)))
    (package / "experts.py").write_text("class Experts:\n    pass\n")
    info = root / f"fake_{name}-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fake-{name}\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(f"[{plugins.ENTRY_POINT_GROUP}]\n{name} = {name}_pkg:{entry}\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    site = tmp_path
    monkeypatch.syspath_prepend(str(site))
    yield site
    fakes = [name for name, module in sys.modules.items() if str(getattr(module, "__file__", "")).startswith(str(site))]
    for name in fakes:
        del sys.modules[name]  # the next test's fake of the same name must be imported afresh


@pytest.fixture
def clean_registry():
    before = set(StrategyRegistry)
    yield
    for name in set(StrategyRegistry) - before:
        StrategyRegistry.remove(name)


def fakes(found):
    return [p for p in found if p.distribution.startswith("fake-")]


def test_an_installed_distribution_is_discovered_with_its_records(site):
    install_fake(site, "alpha")
    [alpha] = fakes(plugins.installed_plugins())
    assert (alpha.name, alpha.distribution, alpha.version, alpha.error) == ("alpha", "fake-alpha", "0.3", None)
    assert [(r.kind, r.name) for r in alpha.plugin.registrations] == [
        ("strategy", "alpha_single"), ("experts", "alpha_experts")
    ]


def test_listing_names_each_plugin_its_registrations_and_what_is_not_installed(site):
    install_fake(site, "alpha")
    text = plugins.describe_plugins(fakes(plugins.installed_plugins()))
    assert "alpha  (fake-alpha 0.3)" in text
    assert "experts         alpha_experts            alpha_pkg.experts:Experts" in text
    assert "one CPU device" in text
    for shipped in plugins.KNOWN_PLUGINS:  # none of the shipped ones is among the fakes
        assert f"{shipped.name:<15} pip install -e plugins/{shipped.name}" in text


def test_resolve_imports_the_target_only_when_asked(site):
    install_fake(site, "alpha")
    experts = plugins.resolve("experts", "alpha_experts")
    assert experts.__module__ == "alpha_pkg.experts" and experts.__name__ == "Experts"
    with pytest.raises(ValueError, match=r"unknown experts 'nope': installed plugins register \[.*'alpha_experts'"):
        plugins.resolve("experts", "nope")


def test_a_plugin_strategy_works_by_name_in_a_trainer(site, clean_registry):
    install_fake(site, "alpha")
    plugins.register_plugin_strategies()
    assert "(plugin alpha)" in StrategyRegistry["alpha_single"]["description"]
    trainer = Trainer(strategy="alpha_single", accelerator="cpu", devices=1, logger=False)
    assert type(trainer.strategy) is SingleDeviceStrategy


def test_a_broken_plugin_is_reported_and_the_others_still_load(site):
    install_fake(site, "alpha")
    install_fake(site, "beta", "raise ImportError('no backend here')\n")
    install_fake(site, "gamma", entry="NOT_THERE")
    found = {p.name: p for p in fakes(plugins.installed_plugins())}
    assert found["alpha"].error is None
    assert "beta = beta_pkg:PLUGIN of fake-beta 0.3 failed to load: ImportError('no backend here')" in (
        found["beta"].error
    )
    assert "gamma = gamma_pkg:NOT_THERE" in found["gamma"].error
    assert "broken: entry point beta" in plugins.describe_plugins(list(found.values()))


def test_an_entry_point_naming_the_wrong_plugin_is_refused(site):
    install_fake(site, "alpha", PLUGIN_MODULE.replace('Plugin("{name}"', 'Plugin("other"'))
    [alpha] = fakes(plugins.installed_plugins())
    assert alpha.plugin is None and "names its plugin 'other', not 'alpha'" in alpha.error


def test_two_plugins_registering_one_name_are_named(site):
    install_fake(site, "alpha")
    install_fake(site, "beta", PLUGIN_MODULE.replace('"{name}_experts"', '"alpha_experts"'))
    with pytest.raises(ValueError, match="experts 'alpha_experts' is registered by two plugins: 'alpha' and 'beta'"):
        plugins.registrations("experts", fakes(plugins.installed_plugins()))


@pytest.fixture
def absent_plugin(monkeypatch):
    """A shipped plugin that is not installed."""
    absent = plugins.KnownPlugin("absent", {"strategy": ("absent_strategy",), "experts": ("absent_experts",)})
    for module in (known, registry):
        monkeypatch.setattr(module, "KNOWN_PLUGINS", (*known.KNOWN_PLUGINS, absent))
    return absent


def test_a_missing_plugins_name_says_what_to_install(absent_plugin, clean_registry):
    expected = (r"is provided by the 'absent' plugin \(package moe_lightning_absent\), which is not installed: "
                r"run `pip install -e plugins/absent`")
    with pytest.raises(plugins.PluginNotInstalledError, match="experts 'absent_experts' " + expected):
        plugins.resolve("experts", "absent_experts")
    plugins.register_plugin_strategies()
    with pytest.raises(plugins.PluginNotInstalledError, match="strategy 'absent_strategy' " + expected):
        Trainer(strategy="absent_strategy", accelerator="cpu", logger=False)


def test_a_missing_plugin_package_in_a_class_path_says_what_to_install(absent_plugin):
    with pytest.raises(plugins.PluginNotInstalledError, match="module 'moe_lightning_absent' is provided by"):
        plugins.load_target("moe_lightning_absent.strategy:Strategy")
    unrelated = ModuleNotFoundError("No module named 'numpyy'", name="numpyy")
    assert plugins.missing_plugin_error(unrelated) is None
    with pytest.raises(ModuleNotFoundError):
        plugins.load_target("numpyy:thing")


def test_records_refuse_bad_fields():
    with pytest.raises(ValueError, match="kind must be one of .* got kind='optimizer'"):
        plugins.Registration("optimizer", "x", "a:b")
    with pytest.raises(ValueError, match="target must be 'package.module:Attribute', got target='a.b'"):
        plugins.Registration("experts", "x", "a.b")
    with pytest.raises(ValueError, match="only strategies take init_params"):
        plugins.Registration("experts", "x", "a:b", init_params={"stage": 2})
