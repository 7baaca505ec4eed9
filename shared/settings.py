"""Settings that check themselves: a dataclass field carries its help text and the values it
accepts (PEFT's `LoraConfig` style), so that a config object, Flower's run config and the
command line refuse the same bad values, each naming the setting as its user wrote it
(`run config alpha`, `--alpha`).

    alpha: float = setting(0.1, "weight of L_p", minimum=0.0)

A float must be finite (NaN and infinities are refused everywhere), a whole number at most
`INT_LIMIT` in size, whatever the field's own bounds; `minimum` / `maximum` are inclusive bounds,
`above` an exclusive lower one; `choices` lists the allowed values; `pattern` is a regular
expression the whole value must match, described by `pattern_help`. A tuple is checked item by
item, and may not repeat an item (`--seeds 0 0` would count one seed twice).

Another view of the same setting (a study's budget, say) is derived with
`like(TrainConfig, "learning_rate")`: the same help and rules, written once.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any


class SettingError(ValueError):
    """A setting holds a value it does not accept; `name` is how the user wrote the setting."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name} {problem}")
        self.name = name
        self.problem = problem

    def renamed(self, name: str) -> SettingError:
        return SettingError(name, self.problem)


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",  # noqa: A002  (PEFT's name for it)
    *,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    choices: tuple | list | None = None,
    pattern: str | None = None,
    pattern_help: str = "",
    in_run_config: bool = True,
) -> Any:
    """A dataclass field with its help text and the values it accepts. `in_run_config`: whether
    a group of Flower's run config (`shared.run_config`) gives it a key."""
    metadata = {"help": help, "minimum": minimum, "maximum": maximum, "above": above,
                "choices": tuple(choices) if choices is not None else None,
                "pattern": pattern, "pattern_help": pattern_help, "in_run_config": in_run_config}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def like(config_class: type, name: str, default: Any = dataclasses.MISSING, help: str | None = None) -> Any:  # noqa: A002
    """A field with the help and rules of field `name` of `config_class`, and its default
    unless `default` is given (`help` replaces the help text where the view means more)."""
    source = next((spec for spec in dataclasses.fields(config_class) if spec.name == name), None)
    if source is None:
        raise KeyError(f"{config_class.__name__} has no field {name!r}")
    metadata = dict(source.metadata)
    if help is not None:
        metadata["help"] = help
    if default is dataclasses.MISSING:
        return dataclasses.field(default=source.default, default_factory=source.default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# The largest whole number any setting takes: what a C int (a step count, a seed, a size in
# torch and numpy) holds, far above any count that finishes.
INT_LIMIT = 2**31 - 1


def value_problem(value: Any, rules: Mapping[str, Any]) -> str | None:
    """Why `value` breaks `rules` (a field's metadata), as 'must ...'; None when it does not."""
    if value is None:
        return None
    if isinstance(value, tuple | list):
        repeated = next((item for k, item in enumerate(value) if item in value[:k]), None)
        if repeated is not None:
            return f"must not repeat a value, got {repeated!r} twice"
        for item in value:
            problem = value_problem(item, rules)
            if problem:
                return problem.replace("must be one of", "must hold only", 1)
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT_LIMIT:
        return f"must be at most {INT_LIMIT:,} in size, got {value}"
    choices = rules.get("choices")
    if choices is not None and value not in choices:
        return f"must be one of {list(choices)}, got {value!r}"
    pattern = rules.get("pattern")
    if pattern is not None and not re.fullmatch(pattern, str(value)):
        return f"must be {rules.get('pattern_help') or f'of the form {pattern}'}, got {value!r}"
    if isinstance(value, int | float) and not isinstance(value, bool):
        if rules.get("minimum") is not None and value < rules["minimum"]:
            return f"must be at least {rules['minimum']}, got {value}"
        if rules.get("above") is not None and value <= rules["above"]:
            return f"must be greater than {rules['above']}, got {value}"
        if rules.get("maximum") is not None and value > rules["maximum"]:
            return f"must be at most {rules['maximum']}, got {value}"
    return None


def check_settings(config: Any, label: Callable[[str], str] = lambda name: name) -> None:
    """Raise SettingError for the first field of the dataclass `config` whose value breaks its
    rules; `label` turns a field name into the name its user knows (a key, a flag)."""
    for spec in dataclasses.fields(config):
        problem = value_problem(getattr(config, spec.name), spec.metadata)
        if problem:
            raise SettingError(label(spec.name), problem)


def field_rules(config_class: type, name: str) -> Mapping[str, Any]:
    """The metadata (help and rules) of field `name` of the dataclass `config_class`."""
    for spec in dataclasses.fields(config_class):
        if spec.name == name:
            return spec.metadata
    raise KeyError(f"{config_class.__name__} has no field {name!r}")
