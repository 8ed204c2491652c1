"""The generic validation engine behind every configuration the project reads.

Typed construction of frozen dataclasses from mappings, dotted-key overrides (``ppo.kl_coef=0.05``: one syntax on
the command line, in a sweep's ``base`` and axes, and in the trial config) and "did you mean" suggestions. It knows
nothing about trials or sweeps: :mod:`rlhf_ablate.config.schema` and :mod:`rlhf_ablate.config.sweep` declare the
shapes, this module checks values against them and names the dotted key and the file in every error.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, Mapping

from ..errors import ConfigError

# Numbers a config value may hold: every integer ends up in a torch or numpy int64 (counts, seeds, steps) and
# every float in a float32 tensor or optimizer state, so larger ones overflow there, far from the key that caused it.
INT64_MAX = 2**63 - 1
FLOAT32_MAX = 3.4028234663852886e38
# PyYAML follows YAML 1.1, where `1e-4` (no dot, no exponent sign) is a string, not a number; YAML 1.2 and every
# user reads it as 1e-4. A float field accepts such strings.
_SCI = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def help_field(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with help text (shown by ``help_table`` and in the README)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


# Config values that are mappings themselves (a dict field), not sections of dotted keys.
DICT_VALUED = ("data.custom_versions", "data.columns")


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and key not in DICT_VALUED:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every valid dotted key, for "did you mean" suggestions and docs."""
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type if isinstance(f.type, type) else _resolve(cls, f.name)):
            keys.extend(all_keys(_resolve(cls, f.name), f"{prefix}{f.name}."))
        else:
            keys.append(prefix + f.name)
    return keys


_HINTS: dict[tuple, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """``typing.get_type_hints(cls)``, once per class and set of fields (a method registered later grows TrialConfig
    in place, schema.register_method_config). Uncached it was most of the time of expanding a sweep: 9 of 9.5 s for
    the 36 trials of full_grid."""
    key = (cls, tuple(getattr(cls, "__annotations__", {})))
    if key not in _HINTS:
        _HINTS[key] = typing.get_type_hints(cls)
    return _HINTS[key]


def _resolve(cls: type, name: str) -> Any:
    return _hints(cls)[name]


def suggest(key: str, candidates: list[str]) -> str:
    """' Did you mean ...?' for a mistyped dotted key, or '' when nothing is close."""
    tail = key.rsplit(".", 1)[-1]
    same_tail = [c for c in candidates if c.rsplit(".", 1)[-1] == tail and c != key]
    if len(same_tail) > 1:  # 'lora_rank' is a key of several stages: name them all
        return " Did you mean one of " + ", ".join(f"'{c}'" for c in same_tail) + "?"
    m = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not m:  # try matching the last component alone (e.g. 'kl_coeff' -> 'ppo.kl_coef')
        tails = {c.rsplit(".", 1)[-1]: c for c in candidates}
        t = difflib.get_close_matches(tail, list(tails), n=1, cutoff=0.75)
        m = [tails[t[0]]] if t else []
    return f" Did you mean '{m[0]}'?" if m else ""


def apply_overrides(base: dict, overrides: Mapping[str, Any], source: str, cls: type) -> dict:
    """Apply dotted-key overrides to a nested dict (copy) shaped like dataclass ``cls``. Unknown keys raise
    ConfigError with a suggestion."""
    import copy

    out = copy.deepcopy(base)
    valid = all_keys(cls)
    for dotted, value in overrides.items():
        if not isinstance(dotted, str):
            raise ConfigError(f"{source}: key {dotted!r} is not a string; write dotted keys like 'ppo.kl_coef'.")
        if dotted not in valid:
            # allow setting a whole section with a mapping, e.g. data.custom_versions or `ppo: {...}`
            section = dotted in {f.name for f in dataclasses.fields(cls)}
            if section and isinstance(value, Mapping):
                out = apply_overrides(out, {f"{dotted}.{k}": v for k, v in value.items()}, source, cls)
                continue
            raise ConfigError(f"{source}: unknown key '{dotted}'.{suggest(dotted, valid)}")
        node = out
        parts = dotted.split(".")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = value
    return out


class DuplicateKey(ValueError):
    """A YAML mapping with the same key twice (line numbers 1-based)."""

    def __init__(self, key: Any, first: int, again: int):
        super().__init__(f"key {key!r} appears twice in one mapping (lines {first} and {again}); the second would "
                         f"silently replace the first")
        self.line = again


def _yaml_loader() -> type:
    """yaml.SafeLoader that refuses a key written twice in one mapping (PyYAML keeps the last one silently)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        pass

    def mapping(loader: Any, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = loader.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise DuplicateKey(key, seen[key], key_node.start_mark.line + 1)
                seen[key] = key_node.start_mark.line + 1
            except TypeError:  # unhashable key: SafeLoader reports it
                break
        return yaml.SafeLoader.construct_mapping(loader, node, deep)

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return UniqueKeyLoader


def load_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` with duplicate keys refused; errors are one-line ConfigErrors naming ``source``."""
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except DuplicateKey as e:
        raise ConfigError(f"{source}: {e}.") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{source}:{where} not valid YAML ({what}).") from None


def read_yaml_file(path: Path, what: str) -> Any:
    """A YAML config file, read as UTF-8 with :func:`load_yaml`; every failure is a ConfigError naming the file."""
    if not path.exists():
        raise ConfigError(f"{what} {path} does not exist.")
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a directory; give the path of a sweep YAML file.")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be read ({e.strerror or e}).") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as "
                          f"UTF-8.") from None
    return load_yaml(text, str(path))


def parse_cli_overrides(items: list[str]) -> dict[str, Any]:
    """``['ppo.kl_coef=0.05', 'model.quantization=none']`` -> dict, values parsed as YAML scalars."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value, e.g. ppo.kl_coef=0.05")
        k, v = item.split("=", 1)
        if not k.strip():
            raise ConfigError(f"override '{item}' has no key before '='; write key=value, e.g. ppo.kl_coef=0.05")
        out[k.strip()] = load_yaml(v, f"override '{item}'")
    return out


def _check_type(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check (and minimally coerce: int -> float) a value against a type hint."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for a in non_none:
            try:
                return _check_type(value, a, key, source)
            except ConfigError as e:
                errors.append(e)
        for a, e in zip(non_none, errors):  # the branch of the value's own kind says best what is wrong
            if a in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
                raise e
        raise errors[0] if len(non_none) == 1 else ConfigError(
            f"{source}: '{key}' must be one of the types {', '.join(getattr(a, '__name__', str(a)) for a in non_none)}"
            f", got {value!r}.")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{source}: '{key}' must be one of {choices}, got {value!r}.")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r} ({type(value).__name__}).")
        return value
    if tp is int:
        if isinstance(value, str) and _SCI.match(value.strip()):
            raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r} (e-notation is a float; write "
                              f"the integer in full, e.g. 1000).")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r} ({type(value).__name__}).")
        if abs(value) > INT64_MAX:
            raise ConfigError(f"{source}: '{key}' is {value}, beyond the 64-bit integer range of torch and numpy.")
        return value
    if tp is float:
        if isinstance(value, str) and _SCI.match(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{key}' must be a number, got {value!r} ({type(value).__name__}).")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{source}: '{key}' must be a finite number, got {value!r}.")
        if abs(value) > FLOAT32_MAX:
            raise ConfigError(f"{source}: '{key}' is {value!r}, beyond the float32 range (3.4e38) of torch.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{key}' must be a string, got {value!r} ({type(value).__name__}).")
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}.")
        inner = args[0] if args else None
        items = [_check_type(v, inner, f"{key}[{i}]", source) if inner else v for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}.")
        return dict(value)
    return value


def build_dataclass(cls: type, d: Any, source: str, prefix: str = "") -> Any:
    """Mapping -> frozen dataclass `cls`, recursively, refusing unknown keys and checking types.

    Errors name the dotted key (``prefix`` + field) and ``source`` (the file)."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or 'the file'}' must be a mapping, got {d!r}.")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in d.items():
        key = prefix + str(k)
        if k not in names:
            raise ConfigError(f"{source}: unknown key '{key}'.{suggest(key, all_keys(cls, prefix))}")
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = build_dataclass(tp, v, source, key + ".")
        else:
            kwargs[k] = _check_type(v, tp, key, source)
    return cls(**kwargs)


def help_table(cls: type) -> str:
    """Markdown table of every dotted key of dataclass ``cls``, its default and its help text."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    flat = flatten(dataclasses.asdict(cls()))

    def walk(c: type, prefix: str) -> None:
        for f in dataclasses.fields(c):
            tp = _resolve(c, f.name)
            if dataclasses.is_dataclass(tp):
                walk(tp, prefix + f.name + ".")
            else:
                rows.append(f"| `{prefix}{f.name}` | `{flat.get(prefix + f.name)!r}` | {f.metadata.get('help', '')} |")

    walk(cls, "")
    return "\n".join(rows)

