"""One builder for every typed config: dataclass sections from a mapping, `a.b=v` overrides, YAML out.

The LightningDiT config (`repro.config.Config`) and the tokenizer config
(`repro.tokenizer_training.config.TokenizerConfig`) are both a root dataclass whose fields are values
or dataclass sections. `ConfigBuilder(root, label, check)` gives either one the same behaviour:

    builder = ConfigBuilder(Config, "config", check=_validate, example="sample.cfg_scale=4.0")
    cfg = builder.from_dict({"sample": {"cfg_scale": 4}})      # keys and types checked, then `check`
    builder.apply_overrides(cfg, ["sample.num_sampling_steps=50"])  # typed, all or nothing, then `check`
    builder.save(cfg, "runs/x/config.yaml", header=["written by ..."])

Values are coerced to the field's annotation: int, float (ints and YAML 1.1's '1e-6' strings accepted),
bool, str, Optional/Union, Literal choices and `list[T]` (each element checked as `key[i]`). Every
error is one line naming the key (`section.key`), the value and what the key expects; unknown keys
get the nearest valid key (after nanoGPT's configurator.py), a section key written at the top level
gets its section.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from functools import reduce
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import yaml

from repro.errors import ConfigError
from repro.utils.io import atomic_write_text


def type_name(tp: Any) -> str:
    """How an error message names an annotation: 'int', "'l1' or 'mse'", 'a list of int or null'."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(c) for c in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _literal_choices(tp: Any) -> list[str]:
    if typing.get_origin(tp) is Literal:
        return [str(c) for c in typing.get_args(tp)]
    return [c for arg in typing.get_args(tp) for c in _literal_choices(arg)]


class ConfigBuilder:
    """Build, override, check and write one config schema (the root dataclass `root`).

    `label` starts every message ("config", "tokenizer config"); `check(cfg)` runs the range and
    consistency checks that types cannot express (it raises ConfigError or returns cfg); `example`
    is the override the 'must look like' message shows.
    """

    def __init__(self, root: type, label: str, check: Callable[[Any], Any], example: str):
        self.root, self.label, self.check, self.example = root, label, check, example

    # ------------------------------------------------------------------------------------------
    # Values and keys

    def coerce(self, value: Any, tp: Any, key: str) -> Any:
        """`value` checked against the annotation `tp` (ints are accepted for floats); raises naming `key`."""
        origin = typing.get_origin(tp)
        if origin in (Union, types.UnionType):
            args = typing.get_args(tp)
            if value is None and type(None) in args:
                return None
            for arg in (a for a in args if a is not type(None)):
                try:
                    return self.coerce(value, arg, key)
                except ConfigError:
                    pass
            raise self._wrong_type(value, tp, key, with_type=True)
        if origin is Literal:
            # exact type too: YAML's `true` must not pass for a choice 1, nor 1 for True
            if any(value == choice and type(value) is type(choice) for choice in typing.get_args(tp)):
                return value
            raise self._wrong_type(value, tp, key, with_type=False)
        if origin is list:
            if not isinstance(value, (list, tuple)):
                raise self._wrong_type(value, tp, key, with_type=True)
            return [self.coerce(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
        # a str too: YAML 1.1 reads '1e-6' (no dot) as a string
        if tp is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                pass
        if tp in (int, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
            return value
        raise self._wrong_type(value, tp, key, with_type=True)

    def _wrong_type(self, value: Any, tp: Any, key: str, with_type: bool) -> ConfigError:
        # a Literal's choices already say the type; elsewhere the got-type tells '4' (str) from 4
        got = f"{value!r} ({type(value).__name__})" if with_type else repr(value)
        # a near miss of one of the Literal choices inside `tp`: '; did you mean 'bf16'?'
        close = (difflib.get_close_matches(value, _literal_choices(tp), n=1, cutoff=0.5)
                 if isinstance(value, str) else [])
        return ConfigError(f"{self.label} key '{key}': expected {type_name(tp)}, got {got}"
                           + (f"; did you mean '{close[0]}'?" if close else ""))

    def nearest_key(self, name: str, valid: list[str], prefix: str = "") -> str:
        """'; did you mean ...?' for an unknown key `prefix + name`, or the valid keys when none is close."""
        if not prefix:  # a section key written at the top level ('cfg_scale: 4'): point at its section
            owners = [f"{section}.{name}" for section, tp in typing.get_type_hints(self.root).items()
                      if dataclasses.is_dataclass(tp) and name in {f.name for f in dataclasses.fields(tp)}]
            if owners:
                return f"; did you mean '{owners[0]}'?"
        close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
        if close:
            return f"; did you mean '{prefix}{close[0]}'?"
        return f"; valid keys: {', '.join(prefix + v for v in sorted(valid))}"

    # ------------------------------------------------------------------------------------------
    # Building

    def build(self, cls: type, raw: Any, prefix: str = "") -> Any:
        """An instance of the dataclass `cls` from the mapping `raw` (keys and types checked, not values)."""
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{self.label} section '{prefix.rstrip('.') or 'top'}' must be a mapping, got {raw!r}")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        kwargs = {}
        for key, value in raw.items():
            full = f"{prefix}{key}"
            if key not in names:
                raise ConfigError(f"unknown {self.label} key '{full}'{self.nearest_key(str(key), names, prefix)}")
            tp = hints[key]
            kwargs[key] = (self.build(tp, value, f"{full}.") if dataclasses.is_dataclass(tp)
                           else self.coerce(value, tp, full))
        return cls(**kwargs)

    def from_dict(self, raw: dict[str, Any], check: bool = True) -> Any:
        """The root config from a parsed mapping (keys and types always checked; values unless check=False)."""
        cfg = self.build(self.root, raw)
        return self.check(cfg) if check else cfg

    def check_at_least(self, cfg: Any, low: int, keys: tuple[str, ...], suffix: str = "") -> None:
        """For `check`: a ConfigError for the first dotted key whose number is below `low` (null, 'auto' pass)."""
        for key in keys:
            value = reduce(getattr, key.split("."), cfg)
            if isinstance(value, (int, float)) and value < low:
                raise ConfigError(f"{self.label} key '{key}' must be >= {low}{suffix}, got {value}")

    # ------------------------------------------------------------------------------------------
    # Overrides

    def with_overrides(self, cfg: Any, overrides: Optional[list[str]]) -> Any:
        """A checked copy of `cfg` with dotted `key=value` overrides set; `cfg` itself is left as it is."""
        work = copy.deepcopy(cfg)
        for item in overrides or []:
            self._set_override(work, item)
        return self.check(work)

    def apply_overrides(self, cfg: Any, overrides: Optional[list[str]]) -> Any:
        """Apply the overrides to `cfg` in place and return it; all or nothing (a bad one leaves cfg untouched)."""
        work = self.with_overrides(cfg, overrides)
        for f in dataclasses.fields(cfg):
            setattr(cfg, f.name, getattr(work, f.name))
        return cfg

    def _set_override(self, work: Any, item: str) -> None:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value (e.g. {self.example})")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        obj: Any = work
        for i, part in enumerate(parts):
            names = [f.name for f in dataclasses.fields(obj)]
            full = ".".join(parts[: i + 1])
            if part not in names:
                hint = self.nearest_key(part, names, ".".join(parts[:i]) + "." if i else "")
                raise ConfigError(f"unknown {self.label} key '{full}'{hint} (override '{item}')")
            tp = typing.get_type_hints(type(obj))[part]
            if i < len(parts) - 1:
                if not dataclasses.is_dataclass(tp):
                    raise ConfigError(f"{self.label} key '{full}' is a value, not a section (override '{item}')")
                obj = getattr(obj, part)
            elif dataclasses.is_dataclass(tp):
                raise ConfigError(f"{self.label} key '{full}' is a section; set one of its keys (override '{item}')")
            else:  # the value is YAML (4.0, true, null, 'text', [1, 2]); an empty value is the empty string
                setattr(obj, part, self.coerce(yaml.safe_load(text) if text != "" else "", tp, full))

    # ------------------------------------------------------------------------------------------
    # Writing

    @staticmethod
    def to_dict(cfg: Any) -> dict[str, Any]:
        return dataclasses.asdict(cfg)

    def to_yaml(self, cfg: Any, header: str | list[str] | None = None) -> str:
        """YAML in schema order; `header` lines become leading comments (they survive loading)."""
        lines = header.splitlines() if isinstance(header, str) else list(header or [])
        comments = "".join(f"# {line}".rstrip() + "\n" for line in lines)
        return comments + yaml.safe_dump(self.to_dict(cfg), sort_keys=False)

    def save(self, cfg: Any, path: str | os.PathLike, header: str | list[str] | None = None) -> Path:
        """Write the config atomically (temp file, then rename) so every run records what it ran with."""
        return atomic_write_text(path, self.to_yaml(cfg, header))
