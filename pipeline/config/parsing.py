"""`section.key=value` overrides from the command line, and the one generic check of every enumerated
field against the choices its schema lists."""

from __future__ import annotations

import dataclasses
import typing

from pipeline.config.schema import Config, leaf_fields


def valid_keys() -> list[str]:
    """Every key that `key=value` overrides accept."""
    return sorted(leaf_fields(Config))


def _parse_value(key: str, kind: type, text: str):
    """Turn the text of one override into a value of the field's type, or raise naming both."""
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if typing.get_origin(kind) is typing.Literal:
            return text  # whether it is one of the choices: invalid_choices, with the rest of the config
        if kind in (int, float, str):
            return kind(text)
        if typing.get_origin(kind) is tuple:
            (item, _) = typing.get_args(kind)
            parts = [p for p in text.strip().strip("()[]").split(",") if p.strip()]  # 1,2 or (1, 2) or [1, 2]
            return tuple(item(p) for p in parts)
    except ValueError as err:
        raise ValueError(f"override {key}={text!r}: not a valid {getattr(kind, '__name__', kind)} ({err})") from None
    raise TypeError(f"override {key}: unsupported field type {kind}")


def apply_overrides(cfg: Config, overrides: typing.Iterable[str]) -> Config:
    """A new Config with `section.field=value` overrides applied; unknown keys and bad values raise."""
    fields = leaf_fields(Config)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value; valid keys: {', '.join(sorted(fields))}")
        if key not in fields:
            raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(sorted(fields))}")
        section, name = key.split(".")
        value = _parse_value(key, fields[key], text)
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})})
    return cfg


def invalid_choices(cfg: Config) -> list[str]:
    """"key='value'; valid: a, b" for every enumerated field (a `Literal` in the schema) whose value is not
    one of its choices: overrides, presets and saved configs alike."""
    found = []
    for key, kind in leaf_fields(Config).items():
        if typing.get_origin(kind) is typing.Literal:
            section, name = key.split(".")
            value = getattr(getattr(cfg, section), name)
            if value not in typing.get_args(kind):
                found.append(f"{key}={value!r}; valid: {', '.join(typing.get_args(kind))}")
    return found
