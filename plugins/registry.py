"""Discovery and validation of plugin manifests (entry-point group ``organmtl.plugins``)."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from importlib import metadata
from importlib import resources

ENTRY_POINT_GROUP = "organmtl.plugins"


class PluginError(RuntimeError):
    """A plugin manifest is malformed or names something that cannot be found."""


@dataclass(frozen=True)
class Plugin:
    """Manifest of one method.

    name: short id used on the command line (``organmtl list``).
    nnunet_trainers: class names findable by ``nnUNetv2_train -tr`` (via ``nnUNet_extTrainer``),
        each given as ``"module:ClassName"`` so the manifest can be checked without nnU-Net's search.
    nnunet_trainer_sets: ``"module:attribute"`` of sequences of trainer classes (the built-in families:
        ``organmtl.nnunet_trainers:FOCUSNET`` ...), imported only when the trainers are asked for.
    detectron_modules: modules whose import registers the method's Detectron2 heads/backbones.
    detectron_configs: config files as ``"package:relative/path.yaml"`` (package resources).
    converters: ``{source_name: "module:function"}`` for ``organmtl convert <source_name>``.
    docs: path of the documentation page, relative to the repository root.
    """

    name: str
    description: str
    nnunet_trainers: tuple[str, ...] = ()
    nnunet_trainer_sets: tuple[str, ...] = ()
    detectron_modules: tuple[str, ...] = ()
    detectron_configs: tuple[str, ...] = ()
    converters: dict[str, str] = field(default_factory=dict)
    docs: str = ""
    distribution: str = ""  # filled by discovery: which installed package declared it

    @property
    def has_trainers(self) -> bool:
        return bool(self.nnunet_trainers or self.nnunet_trainer_sets)

    def trainer_refs(self) -> list[str]:
        """Every trainer as ``"module:ClassName"``: the named ones, then those of each set (imported)."""
        refs = list(self.nnunet_trainers)
        for ref in self.nnunet_trainer_sets:
            refs += [f"{c.__module__}:{c.__qualname__}" for c in load_reference(ref)]
        return list(dict.fromkeys(refs))

    @property
    def trainer_names(self) -> list[str]:
        return [t.split(":", 1)[1] for t in self.trainer_refs()]

    def config_paths(self) -> list[str]:
        """Absolute file paths of the Detectron2 configs (raises PluginError if one is missing)."""
        out = []
        for ref in self.detectron_configs:
            package, _, rel = ref.partition(":")
            path = resources.files(package).joinpath(rel)
            if not path.is_file():
                raise PluginError(f"plugin {self.name!r}: config {ref!r} does not exist")
            out.append(str(path))
        return out

    def check(self) -> list[str]:
        """Resolve every reference of the manifest; return a list of problems (empty when sound)."""
        problems = []
        try:
            trainers = self.trainer_refs()
        except Exception as e:  # noqa: BLE001 - a set that fails to import is a problem like any other
            trainers = list(self.nnunet_trainers)
            problems.append(f"{', '.join(self.nnunet_trainer_sets)}: {type(e).__name__}: {e}")
        for ref in trainers + list(self.converters.values()):
            try:
                load_reference(ref)
            except Exception as e:  # noqa: BLE001 - report every failure kind the same way
                problems.append(f"{ref}: {type(e).__name__}: {e}")
        for module in self.detectron_modules:
            try:
                importlib.import_module(module)
            except Exception as e:  # noqa: BLE001
                problems.append(f"{module}: {type(e).__name__}: {e}")
        try:
            self.config_paths()
        except PluginError as e:
            problems.append(str(e))
        return problems


def load_reference(ref: str):
    """Import ``"package.module:attribute"`` and return the attribute."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not attr:
        raise PluginError(f"reference {ref!r} is not of the form 'module:attribute'")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def discover_plugins() -> dict[str, Plugin]:
    """All plugins declared in the ``organmtl.plugins`` entry-point group, by name."""
    found: dict[str, Plugin] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            manifest = ep.load()
        except Exception as e:  # noqa: BLE001
            raise PluginError(f"entry point {ep.name!r} ({ep.value}) failed to load: {e}") from e
        if isinstance(manifest, dict):
            manifest = Plugin(**manifest)
        if not isinstance(manifest, Plugin):
            raise PluginError(f"entry point {ep.name!r} ({ep.value}) is not a Plugin or dict manifest")
        if manifest.name in found:
            raise PluginError(f"two plugins are named {manifest.name!r} ({found[manifest.name].distribution} "
                              f"and {ep.dist.name if ep.dist else '?'})")
        dist = ep.dist.name if ep.dist is not None else ""
        found[manifest.name] = Plugin(**{**manifest.__dict__, "distribution": dist})
    return dict(sorted(found.items()))


def get_plugin(name: str) -> Plugin:
    plugins = discover_plugins()
    if name not in plugins:
        raise PluginError(f"no plugin named {name!r}; installed: {', '.join(plugins) or 'none'}")
    return plugins[name]


def all_converters() -> dict[str, str]:
    """``{source: "module:function"}`` over every plugin (first declaration of a name wins)."""
    table: dict[str, str] = {}
    for plugin in discover_plugins().values():
        for source, ref in plugin.converters.items():
            table.setdefault(source, ref)
    return table
