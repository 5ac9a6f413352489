"""Environment wiring: where nnU-Net finds our trainers and how the start-up hook is installed.

Kept free of heavy imports (no torch / nnunetv2): it runs at every interpreter start-up via a
``.pth`` file, so it must cost milliseconds.
"""
from __future__ import annotations

import os
import site
import sysconfig
from pathlib import Path

EXT_TRAINER_VAR = "nnUNet_extTrainer"
HOOK_FILENAME = "organmtl_nnunet_ext.pth"


def ext_trainer_dir() -> Path:
    """Folder holding the one shim module that re-exports every organmtl nnU-Net trainer.

    nnU-Net imports each module of the ``nnUNet_extTrainer`` folders by file name and looks the
    trainer up by attribute; the shim re-exports classes defined in ``organmtl.nnunet_trainers`` so
    their ``__module__`` (and therefore pickling and checkpoints) stays ``organmtl.*``.
    """
    import importlib.util

    spec = importlib.util.find_spec("organmtl.nnunet_trainers")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("organmtl.nnunet_trainers is not importable; is organmtl installed?")
    return Path(list(spec.submodule_search_locations)[0]) / "ext_shim"


def ensure_ext_trainer_env() -> None:
    """Add our shim folder to ``nnUNet_extTrainer`` (keeping what the user put there)."""
    try:
        shim = str(ext_trainer_dir())
    except (RuntimeError, ImportError, ValueError):
        return
    current = os.environ.get(EXT_TRAINER_VAR, "")
    parts = [p for p in current.split(os.pathsep) if p]
    if shim not in parts:
        os.environ[EXT_TRAINER_VAR] = os.pathsep.join(parts + [shim])


def site_packages_dir() -> Path:
    """site-packages of the running interpreter (the venv's when run from a venv)."""
    return Path(sysconfig.get_paths()["purelib"])


def install_startup_hook() -> Path:
    """Write the ``.pth`` start-up hook into site-packages (idempotent); return its path.

    The hook only sets the environment variable (no organmtl import at start-up), so it costs
    a few milliseconds per interpreter start.
    """
    shim = ext_trainer_dir()
    line = ("import os; _v = os.environ.get('nnUNet_extTrainer', ''); "
            f"os.environ['nnUNet_extTrainer'] = _v if {str(shim)!r} in _v.split(os.pathsep) "
            f"else os.pathsep.join([p for p in (_v, {str(shim)!r}) if p])\n")
    path = site_packages_dir() / HOOK_FILENAME
    if not path.exists() or path.read_text() != line:
        path.write_text(line)
    return path


def startup_hook_path() -> Path | None:
    """The installed hook, if any site directory holds it."""
    for d in [site_packages_dir(), *map(Path, site.getsitepackages())]:
        if (d / HOOK_FILENAME).is_file():
            return d / HOOK_FILENAME
    return None
