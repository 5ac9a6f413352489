"""Plugin registry of organmtl.

A *plugin* is one method (HMR-Net, FocusNetv2, ...) described by a :class:`Plugin` manifest:
the nnU-Net trainers, Detectron2 configs / registering modules and converters that belong to it.
Plugins are discovered through the Python entry-point group ``organmtl.plugins``; the built-in
methods are declared in organmtl's own ``pyproject.toml`` exactly like a third-party package would.
"""
from organmtl.plugins.registry import ENTRY_POINT_GROUP, Plugin, PluginError, discover_plugins, get_plugin

__all__ = ["ENTRY_POINT_GROUP", "Plugin", "PluginError", "discover_plugins", "get_plugin"]
