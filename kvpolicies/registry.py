"""The policy registry: every plugin of the ``kvpolicies`` entry-point group, loaded once through pluggy.

``KVPOLICIES_PLUGINS=name,name`` loads only those entry points (for reproducible runs and tests); unset loads all.
A plugin that fails to import or to register is reported with a warning and skipped; a name that two plugins claim
is reported naming both, and neither is used (asking for it is an error), while every other policy keeps working.
"""

from __future__ import annotations

import difflib
import inspect
import os
import sys
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import pluggy

from kvpolicies import hookspecs
from kvpolicies.engine.codecs import Codec
from kvpolicies.engine.policy import Policy, Role, Signal
from kvpolicies.errors import (
    KVPoliciesError,
    PluginError,
    PluginWarning,
    PolicyRegistryError,
    UnknownCodecError,
    UnknownPolicyError,
    out_of_memory,
)

ENTRY_POINT_GROUP = "kvpolicies"
PLUGINS_ENV = "KVPOLICIES_PLUGINS"


@dataclass(frozen=True)
class PolicyInfo:
    name: str
    policy_class: type[Policy]
    plugin: str
    package: str = ""
    """The distribution that installed the plugin (``pip show`` finds it), or the module of a plugin registered in
    code: whom to tell when the policy's code fails."""

    @property
    def summary(self) -> str:
        return self.policy_class.summary()

    @property
    def needs(self) -> frozenset[Signal]:
        """Signals read with the default options (a wrapper reads what its default scorer reads)."""
        try:
            return self.policy_class().needs
        except KVPoliciesError:  # defaults that need more input (a file, an uninstalled scorer): the class's needs
            return self.policy_class.needs

    @property
    def paper(self) -> str:
        """Where the method comes from: the first paragraph of its plugin module's docstring (by convention)."""
        module = sys.modules.get(self.policy_class.__module__)
        doc = (inspect.getdoc(module) if module is not None else None) or ""
        return " ".join(doc.split("\n\n")[0].split())

    @property
    def tracks(self) -> tuple[str, ...]:
        """Names of the policy's own tracks (per-entry quantities kept at every forward pass), default options."""
        try:
            return tuple(track.name for track in self.policy_class().tracks)
        except KVPoliciesError:
            return tuple(track.name for track in self.policy_class.tracks)

    @property
    def reads(self) -> list[str]:
        """Every signal and track ``score()`` reads, by name."""
        return sorted(self.needs) + sorted(self.tracks)

    @property
    def stage(self) -> bool:
        """Whether the policy chooses in an after-prefill stage (once, seeing every layer, free to run the model
        again) rather than in ``score()``."""
        return self.policy_class.after_prefill is not Policy.after_prefill

    @property
    def attention_free(self) -> bool:
        """True when scoring reads no attention weights, so it runs next to SDPA/FlashAttention at no extra q·Kᵀ
        (every track accumulates attention; a stage may run the model again, which this cannot see)."""
        return not self.needs & {Signal.ATTENTION, Signal.CUMULATIVE_ATTENTION} and not self.tracks and not self.stage

    def config_fields(self) -> dict[str, Any]:
        """Option name → default value."""
        fields = self.policy_class.Config.model_fields
        return {name: field.get_default(call_default_factory=True) for name, field in fields.items()}


@dataclass(frozen=True)
class CodecInfo:
    name: str
    codec_class: type[Codec]
    plugin: str
    package: str = ""

    @property
    def summary(self) -> str:
        return self.codec_class.summary()


class Registry:
    def __init__(self) -> None:
        self.manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.manager.add_hookspecs(hookspecs)
        self._policies: dict[str, PolicyInfo] | None = None
        self._codecs: dict[str, CodecInfo] | None = None
        self._clashes: dict[tuple[str, str], str] = {}
        """(kind, name) -> why the name is unusable: two plugins claim it."""
        self._packages: dict[str, str] = {}
        """Plugin name -> the distribution (or module) it comes from."""

    def load_entry_points(self) -> None:
        wanted = os.environ.get(PLUGINS_ENV)
        allowed = None if wanted is None else {name.strip() for name in wanted.split(",") if name.strip()}
        found = entry_points(group=ENTRY_POINT_GROUP)
        if allowed is not None and (missing := allowed - {ep.name for ep in found}):
            warnings.warn(
                f"{PLUGINS_ENV} names {sorted(missing)}, which are not installed; installed kvpolicies plugins: "
                f"{sorted(ep.name for ep in found)}",
                PluginWarning,
                stacklevel=4,
            )
        for entry_point in found:
            if allowed is not None and entry_point.name not in allowed:
                continue
            if self.manager.get_plugin(entry_point.name) is not None:
                continue
            try:
                plugin = entry_point.load()
                self.manager.register(plugin, name=entry_point.name)
                self._packages[entry_point.name] = entry_point.dist.name if entry_point.dist else entry_point.module
            except Exception as error:  # a broken plugin must not take the registry down
                warnings.warn(
                    f"kvpolicies plugin {entry_point.name!r} ({entry_point.value}) failed to load and was skipped: "
                    f"{type(error).__name__}: {error}",
                    PluginWarning,
                    stacklevel=4,
                )

    def register_plugin(self, plugin: object, name: str) -> None:
        """Register a plugin object directly (notebooks, tests); same rules as an entry point."""
        self.manager.register(plugin, name=name)
        self._packages[name] = getattr(plugin, "__name__", None) or type(plugin).__module__  # a module, or an object
        self._policies = self._codecs = None

    def unregister_plugin(self, name: str) -> None:
        self.manager.unregister(name=name)
        self._policies = self._codecs = None

    def policies(self) -> dict[str, PolicyInfo]:
        if self._policies is None:
            self._policies = self._infos("register_policies", Policy, "policy", "policies", PolicyInfo)
        return self._policies

    def codecs(self) -> dict[str, CodecInfo]:
        if self._codecs is None:
            self._codecs = self._infos("register_codecs", Codec, "codec", "codecs", CodecInfo)
        return self._codecs

    def _infos(self, hook_name: str, base: type, kind: str, plural: str, info: type) -> dict:
        """The registered classes of ``kind`` by name, each described by ``info(name, class, plugin, package)``."""
        self.load_entry_points()
        claims = self._claims(hook_name, base, kind, plural)
        return {name: info(name, cls, plugin, self._packages.get(plugin, "")) for name, (cls, plugin) in claims.items()}

    def _claims(self, hook_name: str, base: type, kind: str, plural: str) -> dict[str, tuple[type, str]]:
        """Every class of ``kind`` that plugins register through ``hook_name``, by name, with its plugin. A name two
        plugins claim is skipped with a warning: silently picking one would make results depend on install order,
        and failing would take every other one down with it."""
        claims: dict[str, dict[type, str]] = {}
        self._clashes = {key: why for key, why in self._clashes.items() if key[0] != kind}  # read afresh
        for plugin_name, plugin in self.manager.list_name_plugin():
            found: list[tuple[str, type]] = []

            def register(registered: type, *, aliases: tuple[str, ...] = ()) -> None:
                if not (isinstance(registered, type) and issubclass(registered, base)):
                    raise TypeError(f"register() takes a kvpolicies.{base.__name__} subclass, got {registered!r}")
                if not registered.name:
                    raise TypeError(f"{registered.__qualname__} has no `name`")
                for name in (registered.name, *aliases):
                    found.append((name, registered))

            hook = getattr(plugin, hook_name, None)
            if hook is None:
                continue
            try:
                hook(register=register)
            except Exception as error:
                warnings.warn(
                    f"kvpolicies plugin {plugin_name!r} failed while registering {plural} and was skipped: "
                    f"{type(error).__name__}: {error}",
                    PluginWarning,
                    stacklevel=5,
                )
                continue
            for name, registered in found:
                claims.setdefault(name, {})[registered] = plugin_name
        unique: dict[str, tuple[type, str]] = {}
        for name, owners in claims.items():
            if len(owners) == 1:
                unique[name] = next(iter(owners.items()))
                continue
            who = " and ".join(f"{plugin!r} ({cls.__module__})" for cls, plugin in owners.items())
            self._clashes[(kind, name)] = (
                f"{kind} name {name!r} is registered by two plugins: {who}, so neither is used; uninstall one or "
                f"load only the one you want with {PLUGINS_ENV}"
            )
            warnings.warn(self._clashes[(kind, name)], PluginWarning, stacklevel=5)
        return dict(sorted(unique.items()))

    def get(self, name: str) -> PolicyInfo:
        return self._get(name, self.policies(), "policy", "policies", UnknownPolicyError)

    def get_codec(self, name: str) -> CodecInfo:
        return self._get(name, self.codecs(), "codec", "codecs", UnknownCodecError)

    def _get(self, name: str, known: dict, kind: str, plural: str, unknown: type[KVPoliciesError]):
        if (kind, name) in self._clashes:
            raise PolicyRegistryError(self._clashes[(kind, name)])
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise unknown(
                f"unknown {kind} {name!r}.{hint} Available {plural}: {', '.join(known) or '(none installed)'}"
            )
        return known[name]


_registry = Registry()


def registry() -> Registry:
    return _registry


def reset_registry() -> None:
    """Forget loaded plugins so the next lookup reads the entry points (and ``KVPOLICIES_PLUGINS``) again."""
    global _registry
    _registry = Registry()


def list_policies() -> list[PolicyInfo]:
    """Every registered policy, sorted by name."""
    return list(_registry.policies().values())


def policy_with_role(role: Role) -> str | None:
    """The name of the installed policy playing ``role`` (the reference, the chance baseline), or None."""
    return next((info.name for info in list_policies() if info.policy_class.role == role), None)


def get_policy(name: str, **config: Any) -> Policy:
    """An instance of policy ``name`` configured with ``config`` (validated by the policy's pydantic config)."""
    info = _registry.get(name)
    try:
        return info.policy_class(**config)
    except Exception as error:
        raise plugin_error(info.policy_class, "__init__", error)


def list_codecs() -> list[CodecInfo]:
    """Every registered storage codec, sorted by name."""
    return list(_registry.codecs().values())


def get_codec(name: str) -> Codec:
    """An instance of storage codec ``name`` (``"full"``: full precision, the default)."""
    info = _registry.get_codec(name)
    try:
        return info.codec_class()
    except Exception as error:
        raise plugin_error(info.codec_class, "__init__", error)


def plugin_error(policy_class: type[Policy] | type[Codec], hook: str, error: Exception) -> Exception:
    """What to raise for ``error``, raised in ``hook`` of a policy (or codec) of ``policy_class``: a
    :class:`PluginError` naming the policy, its plugin and package and the original exception (chained as its cause), or ``error``
    itself when it is one of ours already (a clear message from code the plugin called: a contract check, a budget).

    Callers ``raise plugin_error(...)`` inside their ``except``: nothing is paid unless a hook raised.
    """
    if isinstance(error, KVPoliciesError) or out_of_memory(error):
        return error  # ours, or the machine's: no plugin's fault, and a caller may catch it by type to retry smaller
    message = " ".join(str(error).split()) or "(no message)"
    wrapped = plugin_fault(policy_class, f"raised {type(error).__name__} in {hook}(): {message}")
    wrapped.__cause__ = error
    return wrapped


def plugin_fault(policy_class: type[Policy] | type[Codec], what: str) -> PluginError:
    """A :class:`PluginError` saying that the policy (or codec) of ``policy_class`` did ``what`` (it broke a
    contract of the engine), naming its plugin and package, so the report reaches the plugin's authors, not the
    user's input."""
    is_codec = issubclass(policy_class, Codec)
    known = _registry.codecs() if is_codec else _registry.policies()
    info = next((info for info in known.values()
                 if getattr(info, "codec_class" if is_codec else "policy_class") is policy_class), None)
    origin = (f"plugin {info.plugin!r} of package {info.package or '?'}" if info else
              f"class {policy_class.__qualname__} of module {policy_class.__module__}, not a registered plugin")
    kind = "codec" if is_codec else "policy"
    return PluginError(f"{kind} {policy_class.name!r} ({origin}) {what}; the fault is in the plugin's code: report it "
                       "to its authors with the traceback (printed by `kvpolicies --debug`, saved in a sweep cell's "
                       "result file)")
