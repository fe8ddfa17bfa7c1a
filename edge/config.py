"""Map a TOML file and CLI overrides onto a frozen dataclass config (one per process).

Unknown keys and wrong types are errors, never ignored.
"""
from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from edge.errors import ConfigError

T = TypeVar("T")


def _check_type(cls: type, name: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        return _check_type(cls, name, value, hint)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{cls.__name__}.{name}: expected a list, got {value!r}")
        return tuple(value) if origin is tuple else list(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"{cls.__name__}.{name}: expected {hint.__name__}, got {value!r}")
    return value


def make_config(cls: type[T], values: dict[str, Any]) -> T:
    """Build ``cls`` (a frozen dataclass) from ``values``; unknown keys or wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} key(s): {', '.join(unknown)} (known: {', '.join(sorted(fields))})")
    checked = {k: _check_type(cls, k, v, hints[k]) for k, v in values.items()}
    try:
        return cls(**checked)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from exc


def load_config(cls: type[T], path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                section: str | None = None) -> T:
    """Defaults in code < TOML file (optionally one ``[section]``) < CLI overrides (None values are skipped)."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {p}") from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from exc
        if section is not None:
            data = data.get(section, {})
            if not isinstance(data, dict):
                raise ConfigError(f"config file {p}: [{section}] must be a table")
        values.update(data)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return make_config(cls, values)


def config_from_args(cls: type[T], args) -> T:
    """A CLI namespace -> ``cls``: ``--config`` TOML, overridden by every option named like a field (None = unset)."""
    overrides = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(cls)}
    return load_config(cls, getattr(args, "config", None), overrides)
