"""``organmtl doctor``: what is installed, where nnU-Net's paths point, and whether the stock
``nnUNetv2_train`` would find our trainers in a fresh interpreter."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

PROBE_TRAINER = "nnUNetTrainerOMTLBaseline_Tiny"


def _version(module: str) -> str:
    try:
        m = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure is reported, not raised
        return f"NOT IMPORTABLE ({type(e).__name__}: {e})"
    version = getattr(m, "__version__", None)
    if version is None:
        from importlib import metadata

        try:
            version = metadata.version(module)
        except metadata.PackageNotFoundError:
            version = "?"
    return version


def detectron2_status() -> dict:
    """Version, install route and whether the compiled ``detectron2._C`` extension loads."""
    try:
        import detectron2
    except Exception as e:  # noqa: BLE001
        return {"version": None, "error": f"{type(e).__name__}: {e}"}
    path = os.path.dirname(detectron2.__file__)
    route = ("sal-detectron2 wheel (upstream Python code, no _C for this Python)"
             if "detectron2-sal" in path else "source build (official route) or other")
    try:
        importlib.import_module("detectron2._C")
        compiled = True
    except ImportError:
        compiled = False
    return {"version": detectron2.__version__, "path": path, "route": route, "compiled_C": compiled}


def trainer_visible_to_nnunet(trainer: str = PROBE_TRAINER) -> tuple[bool, str]:
    """Ask nnU-Net's own trainer search, in a fresh interpreter that does not import organmtl."""
    code = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f; "
            f"import sys; c = f({trainer!r}); print(c.__module__ + '.' + c.__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return False, (proc.stderr.strip().splitlines() or ["?"])[-1]
    return True, proc.stdout.strip().splitlines()[-1]


def gpu_status() -> str:
    """What torch sees: the CUDA devices (name, memory) or why there is none."""
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - reported by the version lines already
        return f"unknown (torch: {type(e).__name__})"
    if torch.cuda.is_available():
        names = []
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            names.append(f"cuda:{i} {props.name} ({props.total_memory / 2 ** 30:.0f} GiB)")
        return f"{len(names)} CUDA device(s): {', '.join(names)}"
    why = ("torch built without CUDA" if torch.version.cuda is None
           else f"torch built for CUDA {torch.version.cuda}, no device visible")
    return f"none ({why}): -device auto runs on the CPU; train _Tiny trainers with -device cpu"


def schedule_overrides() -> dict[str, str]:
    """``ORGANMTL_EPOCHS`` / ``ORGANMTL_ITERS_PER_EPOCH`` / ``ORGANMTL_VAL_ITERS`` that are set (they shorten
    the full trainers too: :mod:`organmtl.nnunet_trainers.budget`)."""
    names = ("ORGANMTL_EPOCHS", "ORGANMTL_ITERS_PER_EPOCH", "ORGANMTL_VAL_ITERS")
    return {n: os.environ[n] for n in names if os.environ.get(n)}


def run_doctor(verbose: bool = False) -> int:
    from organmtl.env import EXT_TRAINER_VAR, ext_trainer_dir, startup_hook_path

    ok = True
    print(f"python       : {sys.version.split()[0]} ({sys.executable})")
    for module in ("organmtl", "torch", "torchvision", "nnunetv2", "SimpleITK", "pydicom", "pycocotools"):
        v = _version(module)
        ok &= not v.startswith("NOT")
        print(f"{module:<13}: {v}")
    d2 = detectron2_status()
    if d2.get("version") is None:
        ok = False
        print(f"detectron2   : NOT IMPORTABLE ({d2['error']})")
    else:
        print(f"detectron2   : {d2['version']} via {d2['route']}")
        print(f"detectron2._C: {'present' if d2['compiled_C'] else 'absent (organmtl needs none of it)'}")
        if verbose:
            print(f"               {d2['path']}")
    print(f"GPU          : {gpu_status()}")
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        value = os.environ.get(var)
        ok &= bool(value)
        print(f"{var:<20}: {value or 'NOT SET: export it (nnU-Net commands, organmtl convert and plan-tiny need it)'}")
    warnings = 0
    for var, value in schedule_overrides().items():
        warnings += 1
        print(f"WARNING: {var}={value} is set: it shortens the schedule of every organmtl trainer, the full "
              "(non-_Tiny) ones included; unset it for a real training")
    hook = startup_hook_path()
    print(f"{EXT_TRAINER_VAR:<20}: {os.environ.get(EXT_TRAINER_VAR, '<unset>')}")
    print(f"start-up hook       : {hook or 'MISSING (run: organmtl install-hooks)'}")
    ok &= hook is not None and ext_trainer_dir().is_dir()
    visible, detail = trainer_visible_to_nnunet()
    print(f"nnUNetv2_train -tr {PROBE_TRAINER}: {'found ' + detail if visible else 'NOT FOUND: ' + detail}")
    ok &= visible
    if not ok:
        print("doctor: problems found (see above)")
    elif warnings:
        print(f"doctor: no problems, {warnings} warning(s) (see above)")
    else:
        print("doctor: all good")
    return 0 if ok else 1
