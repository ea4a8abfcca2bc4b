"""The registry: built-ins and third-party plugins through one entry-point group, with helpful failures."""

from __future__ import annotations

import importlib
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import kvpolicies
from kvpolicies import (
    CompressedCache,
    PolicyConfigError,
    PolicyRegistryError,
    UnknownPolicyError,
)
from kvpolicies.registry import PluginWarning

BUILT_INS = {"full", "l2norm", "random", "streaming"}


def install_fake_distribution(root: Path, name: str, modules: dict[str, str], entry_points: dict[str, str]) -> None:
    """Write modules plus a ``.dist-info`` with entry points under ``root`` (what ``pip install`` would leave)."""
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = "\n".join(f"{key} = {value}" for key, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[kvpolicies]\n{lines}\n")


THIRD_PARTY = """
    import torch
    import kvpolicies
    from pydantic import Field

    class OldestConfig(kvpolicies.PolicyConfig):
        bias: float = Field(0.0)

    class Oldest(kvpolicies.Policy):
        '''Keep the oldest entries of every head.'''
        name = "oldest"
        Config = OldestConfig

        def score(self, inputs):
            return -inputs.order.float() + self.config.bias

    @kvpolicies.hookimpl
    def register_policies(register):
        register(Oldest, aliases=("first-come",))
"""


@pytest.fixture
def site(tmp_path, monkeypatch, fresh_registry):
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    return tmp_path


def test_built_in_policies_come_from_the_entry_point_group():
    policies = {info.name: info for info in kvpolicies.list_policies()}
    assert BUILT_INS <= set(policies)
    for name in BUILT_INS:
        assert policies[name].policy_class.__module__.startswith("kvpolicies_plugins.")
        assert policies[name].plugin == name


def test_third_party_plugin_is_listed_and_compresses_a_cache(site, tiny_model):
    install_fake_distribution(site, "kvp-oldest", {"kvp_oldest": THIRD_PARTY}, {"oldest": "kvp_oldest"})
    names = [info.name for info in kvpolicies.list_policies()]
    assert "oldest" in names and "first-come" in names and BUILT_INS <= set(names)

    policy = kvpolicies.get_policy("oldest", bias=1.0)
    cache = CompressedCache(tiny_model, policy, 0.5)
    ids = torch.arange(3, 43)[None]
    with torch.no_grad():
        tiny_model(ids, cache=cache)
    kept = cache.kept_per_head()
    assert (kept == 20).all()  # 40 tokens at half budget, every head
    stats = cache.stats()
    assert stats.kept_entries * 2 == stats.full_entries


def test_unknown_policy_lists_names_and_close_matches():
    with pytest.raises(UnknownPolicyError) as error:
        kvpolicies.get_policy("l2-norm")
    message = str(error.value)
    assert "Did you mean 'l2norm'" in message
    for name in BUILT_INS:
        assert name in message


def test_two_plugins_with_one_policy_name_are_both_skipped_and_the_rest_keeps_working(site):
    duplicate = THIRD_PARTY.replace('name = "oldest"', 'name = "l2norm"')
    install_fake_distribution(site, "kvp-clash", {"kvp_clash": duplicate}, {"clash": "kvp_clash"})
    with pytest.warns(PluginWarning, match=r"'l2norm' is registered by two plugins: .*'clash'.*neither is used"):
        names = {info.name for info in kvpolicies.list_policies()}
    assert "l2norm" not in names and BUILT_INS - {"l2norm"} <= names
    assert kvpolicies.get_policy("random").name == "random"
    with pytest.raises(PolicyRegistryError, match=r"'l2norm' is registered by two plugins.*KVPOLICIES_PLUGINS"):
        kvpolicies.get_policy("l2norm")


def test_a_clash_ends_when_one_of_the_two_plugins_is_unregistered(fresh_registry):
    from kvpolicies.engine.codecs import FullPrecision

    other_random = type("OtherRandom", (type(kvpolicies.get_policy("random")),), {})
    other_full = type("OtherFull", (FullPrecision,), {})

    class Clashing:
        @kvpolicies.hookimpl
        def register_policies(self, register):
            register(other_random)

        @kvpolicies.hookimpl
        def register_codecs(self, register):
            register(other_full)

    registry = kvpolicies.registry.registry()
    registry.register_plugin(Clashing(), name="clashing")
    with pytest.warns(PluginWarning, match="registered by two plugins"):
        with pytest.raises(PolicyRegistryError, match="policy name 'random' is registered by two plugins"):
            kvpolicies.get_policy("random")
        with pytest.raises(PolicyRegistryError, match="codec name 'full' is registered by two plugins"):
            kvpolicies.get_codec("full")
    registry.unregister_plugin("clashing")
    assert kvpolicies.get_policy("random").name == "random" and kvpolicies.get_codec("full").name == "full"


def test_broken_plugin_is_reported_and_skipped(site):
    install_fake_distribution(
        site,
        "kvp-broken",
        {"kvp_broken": "raise ImportError('missing dependency: fancy-kernels')", "kvp_oldest": THIRD_PARTY},
        {"broken": "kvp_broken", "oldest": "kvp_oldest"},
    )
    with pytest.warns(PluginWarning, match=r"'broken' \(kvp_broken\) failed to load.*fancy-kernels"):
        names = {info.name for info in kvpolicies.list_policies()}
    assert "oldest" in names and BUILT_INS <= names


def test_plugin_whose_hook_raises_is_reported_and_skipped(site):
    failing = THIRD_PARTY.replace("register(Oldest", "raise RuntimeError('boom'); register(Oldest")
    install_fake_distribution(site, "kvp-failing", {"kvp_failing": failing}, {"failing": "kvp_failing"})
    with pytest.warns(PluginWarning, match="'failing' failed while registering policies.*boom"):
        names = {info.name for info in kvpolicies.list_policies()}
    assert BUILT_INS <= names and "oldest" not in names


def test_environment_variable_restricts_loaded_plugins(monkeypatch, fresh_registry):
    monkeypatch.setenv("KVPOLICIES_PLUGINS", "l2norm, full")
    assert {info.name for info in kvpolicies.list_policies()} == {"l2norm", "full"}
    with pytest.raises(UnknownPolicyError, match="Available policies: full, l2norm"):
        kvpolicies.get_policy("random")


def test_environment_variable_naming_a_missing_plugin_warns(monkeypatch, fresh_registry):
    monkeypatch.setenv("KVPOLICIES_PLUGINS", "l2norm,nonexistent")
    with pytest.warns(PluginWarning, match="nonexistent"):
        assert [info.name for info in kvpolicies.list_policies()] == ["l2norm"]


def test_policy_options_are_validated_with_the_valid_keys_listed():
    with pytest.raises(PolicyConfigError, match="no option 'sinks'.*valid options: sink_tokens, window_tokens"):
        kvpolicies.get_policy("l2norm", sinks=4)
    with pytest.raises(PolicyConfigError, match="window_tokens"):
        kvpolicies.get_policy("l2norm", window_tokens=-1)


def test_config_hash_is_stable_and_sensitive_to_every_option():
    default = kvpolicies.get_policy("l2norm")
    assert default.config_hash() == kvpolicies.get_policy("l2norm", uncompressed_layers=[0, 1]).config_hash()
    assert default.config_hash() != kvpolicies.get_policy("l2norm", keep_highest=True).config_hash()
    assert default.config_hash() != kvpolicies.get_policy("random").config_hash()
    assert len(default.config_hash()) == 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert default.config.model_dump(mode="json")["uncompressed_layers"] == [0, 1]


def test_every_public_name_resolves_and_plugins_import_what_they_need_from_the_top():
    """The package imports its names on first use; each one must exist (plugin authors import them from here)."""
    for name in kvpolicies.__all__:
        assert getattr(kvpolicies, name) is not None, name
    assert {"ScorerWrapper", "WrapperConfig", "distribute"} <= set(kvpolicies.__all__)
