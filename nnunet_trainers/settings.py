"""Trainer settings: one parser for ``ORGANMTL_*`` environment values, and frozen option records
that travel with the model (docs/trainers.md, "Settings").

The stock ``nnUNetv2_train`` command line has no room for method options, so they come from
environment variables. A value that changes the model must not depend on the shell that happens
to run ``--c`` or ``nnUNetv2_predict``: a family declares its options as a frozen dataclass whose
fields name their variable (:func:`setting`); :func:`resolve` builds it from, in this order, the
values stored with the model (the plans' configuration entry or the checkpoint), the environment
and the class defaults, and says which stored value won over a different environment value.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence


class SettingError(ValueError):
    """An environment value that does not parse; the message names the variable and the value."""

    def __init__(self, name: str, raw: str, problem: str):
        super().__init__(f"environment variable {name}={raw!r}: {problem}")
        self.name, self.raw, self.problem = name, raw, problem


def env_raw(name: str) -> str | None:
    """The variable's value, ``None`` when unset or empty."""
    value = os.environ.get(name)
    return value if value not in (None, "") else None


def _check_minimum(name: str, raw: str, value, minimum):
    if minimum is not None and value < minimum:
        raise SettingError(name, raw, f"must be >= {minimum}")
    return value


def parse_int(name: str, raw: str, minimum: int | None = None) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise SettingError(name, raw, "is not an integer") from None
    return _check_minimum(name, raw, value, minimum)


def parse_float(name: str, raw: str, minimum: float | None = None) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise SettingError(name, raw, "is not a number") from None
    return _check_minimum(name, raw, value, minimum)


def parse_choice(name: str, raw: str, choices: Sequence[str]) -> str:
    """One of ``choices`` (case and surrounding blanks ignored)."""
    value = raw.strip().lower()
    if value not in choices:
        raise SettingError(name, raw, f"must be one of {list(choices)}")
    return value


def parse_list(name: str, raw: str, item: Callable[[str, str], Any] = lambda n, v: v,
               length: int | None = None) -> tuple:
    """Comma-separated values, each parsed by ``item(name, text)`` (e.g. :func:`parse_int`)."""
    parts = [p.strip() for p in raw.split(",") if p.strip()]
    if not parts or (length is not None and len(parts) != length):
        raise SettingError(name, raw, f"must be {length or 'one or more'} comma-separated values")
    out = []
    for p in parts:
        try:
            out.append(item(name, p))
        except SettingError as e:
            raise SettingError(name, raw, f"item {p!r} {e.problem}") from None
    return tuple(out)


def parse_mapping(name: str, raw: str, keys: Sequence[str], value: Callable[[str, str], Any]) -> dict:
    """``"a=1,b=2"`` -> ``{"a": 1, "b": 2}``; every key must be one of ``keys``."""
    out = {}
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        key, sep, text = (s.strip() for s in part.partition("="))
        if not sep or key not in keys:
            raise SettingError(name, raw, f"{part!r} is not NAME=VALUE with NAME one of {list(keys)}")
        try:
            out[key] = value(name, text)
        except SettingError as e:
            raise SettingError(name, raw, f"{part!r}: the value {e.problem}") from None
    return out


def env_int(name: str, default: int, minimum: int | None = None) -> int:
    raw = env_raw(name)
    return default if raw is None else parse_int(name, raw, minimum)


def env_float(name: str, default: float, minimum: float | None = None) -> float:
    raw = env_raw(name)
    return default if raw is None else parse_float(name, raw, minimum)


# ---------------------------------------------------------------------------------- option records
def setting(default, env: str, parse: Callable[[str, str], Any], load: Callable[[Any], Any] = lambda v: v,
            doc: str = ""):
    """A dataclass field read from ``env`` with ``parse(name, raw)``; ``load`` turns the stored (JSON)
    value back into the field's type (lists into tuples...)."""
    return dataclasses.field(default=default, metadata={"env": env, "parse": parse, "load": load, "doc": doc})


def _load(f: dataclasses.Field, value):
    return None if value is None else f.metadata["load"](value)


def _plain(v):
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def to_stored(options) -> dict:
    """JSON-ready dict of an option record (or of a plain dict): tuples as lists, nested too."""
    items = options.items() if isinstance(options, dict) else \
        ((f.name, getattr(options, f.name)) for f in dataclasses.fields(options))
    return {k: _plain(v) for k, v in items}


@dataclasses.dataclass(frozen=True)
class Resolved:
    """What :func:`resolve` built: the options, and one line per field whose stored value won over a
    different environment value (for the training log)."""

    options: Any
    notes: tuple[str, ...]


def resolve(cls, stored: Mapping | None = None, stored_from: str = "the plans") -> Resolved:
    """``cls`` (a frozen dataclass of :func:`setting` fields) from ``stored`` values, else the
    environment, else the class defaults. A stored field always wins; when its variable is set to
    another value the returned notes say so (an unparsable variable is still an error)."""
    stored = dict(stored or {})
    values, notes = {}, []
    for f in dataclasses.fields(cls):
        name = f.metadata["env"]
        raw = env_raw(name)
        from_env = None if raw is None else f.metadata["parse"](name, raw)
        if f.name in stored:
            values[f.name] = _load(f, stored[f.name])
            if raw is not None and from_env != values[f.name]:
                notes.append(f"{f.name}={to_stored({f.name: values[f.name]})[f.name]!r} stored with the model "
                             f"({stored_from}) wins over {name}={raw!r}")
        elif raw is not None:
            values[f.name] = from_env
        else:
            values[f.name] = f.default
    return Resolved(cls(**values), tuple(notes))


# ---------------------------------------------------------------------------------- network size
def plan_width_factor(configuration_manager, paper_first_stage: int = 32) -> float:
    """Width of a paper network relative to the plan: the configuration's first-stage U-Net
    features over the paper's first-stage channels (nnU-Net's 3d_fullres: 32 -> 1.0; ``organmtl
    plan-tiny``'s 3d_tiny: 8 -> 0.25). This is how ``_Tiny`` trainers on tiny plans get small
    networks without a width of their own (docs/trainers.md)."""
    kwargs = configuration_manager.network_arch_init_kwargs or {}
    features = kwargs.get("features_per_stage")
    if not features:
        raise ValueError(f"plans configuration ({configuration_manager.network_arch_class_name}) has no "
                         f"'features_per_stage' to derive the network width from")
    return float(features[0]) / float(paper_first_stage)


# ------------------------------------------------------------------ a trainer's stored plans entries

def stored_plans_entry(trainer, key: str) -> tuple[dict | None, str]:
    """The entry ``key`` a model stored in its plans configuration, and where it was found: the plans the
    trainer was built from (``--c``/``--val``/``nnUNetv2_predict``: nnU-Net passes the model's plans), else
    the model folder's ``plans.json`` (a new fold of a trained model); ``(None, "")`` when neither has it."""
    entry = trainer.configuration_manager.configuration.get(key)
    if entry:
        return entry, "the plans' configuration entry"
    base = Path(trainer.output_folder_base) if trainer.output_folder_base else None
    if base is not None and (base / "plans.json").is_file():
        stored = json.loads((base / "plans.json").read_text())["configurations"].get(trainer.configuration_name, {})
        if stored.get(key):
            return stored[key], str(base / "plans.json")
    return None, ""


def set_plans_value(trainer, key: str, value) -> None:
    """Set ``key`` of the trainer's plans configuration everywhere nnU-Net reads it from: the configuration
    manager, the plans manager's plans (written to the model's plans.json) and the constructor's ``plans``
    argument (recorded in every checkpoint's ``init_args``); each gets its own copy."""
    configs = [trainer.configuration_manager.configuration,
               trainer.plans_manager.plans["configurations"][trainer.configuration_name]]
    plans = trainer.my_init_kwargs.get("plans")
    if isinstance(plans, dict) and plans is not trainer.plans_manager.plans:
        configs.append(plans["configurations"][trainer.configuration_name])
    for c in configs:
        c[key] = copy.deepcopy(value)
