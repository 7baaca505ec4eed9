"""Command-line options generated from settings dataclasses (`shared.settings`): one option per
field, with the field's type, rules, help and default, and the settings rebuilt from the
parsed options; and the one place where the errors a user can cause end as one line. Used by
`nextquill`, the study and the benchmarks."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, get_args, get_origin, get_type_hints

from shared.errors import USER_ERRORS, one_line
from shared.settings import INT_LIMIT, SettingError, field_rules, value_problem

log = logging.getLogger("nextquill")


def checked(config_class: type, name: str) -> Callable[[str], Any]:
    """An argparse `type` for field `name` of a settings dataclass: the field's own type and
    rules (`shared.settings`), so that `--alpha nan` is refused by argparse, naming the flag."""
    rules = field_rules(config_class, name)
    kind = _value_type(get_type_hints(config_class)[name])

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be {'a whole number' if kind is int else 'a number'}, got {text!r}") from None
        problem = value_problem(value, rules)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = kind.__name__
    return parse


def whole_number(minimum: int = 0, maximum: int = INT_LIMIT) -> Callable[[str], int]:
    """An argparse `type` for a plain count option: a whole number within [minimum, maximum]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        problem = value_problem(value, {"minimum": minimum, "maximum": maximum})
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = "int"
    return parse


def _value_type(hint: Any) -> type:
    """int for `int | None`, str for `tuple[str, ...]`: the type one command-line word becomes."""
    args = [arg for arg in get_args(hint) if arg is not type(None) and arg is not Ellipsis]
    if get_origin(hint) is tuple:
        return args[0]
    return args[0] if args else hint


def add_settings(parser: argparse.ArgumentParser, settings: Any, skip: tuple[str, ...] = (),
                 only: tuple[str, ...] | None = None, help: str | None = None) -> None:  # noqa: A002
    """One option per field of the settings dataclass `settings` (nested settings flattened):
    `--field-name`, with the field's type, rules and help, and its value in `settings` as the
    default. The command line is generated from the settings, never written beside them.
    `skip`: fields (at any depth) that get no option; `only`: the fields that do; `help`
    replaces the field's help where the command means more by it."""
    hints = get_type_hints(type(settings))
    for spec in _optional_fields(settings, skip, only):
        value = getattr(settings, spec.name)
        if dataclasses.is_dataclass(value):
            add_settings(parser, value, skip, only, help)
            continue
        flag = "--" + spec.name.replace("_", "-")
        help_text = f"{help or spec.metadata.get('help', '')} (default: %(default)s)"
        choices = spec.metadata.get("choices")
        if hints[spec.name] is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=help_text)
        elif get_origin(hints[spec.name]) is tuple:
            kind = _value_type(hints[spec.name])
            parser.add_argument(flag, nargs="+", default=value, choices=choices, help=help_text,
                                type=checked(type(settings), spec.name) if kind in (int, float) else kind)
        elif choices is not None:
            parser.add_argument(flag, default=value, choices=choices, help=help_text)
        else:
            parser.add_argument(flag, default=value, type=checked(type(settings), spec.name), help=help_text)


def settings_from(args: argparse.Namespace, settings: Any, skip: tuple[str, ...] = (),
                  only: tuple[str, ...] | None = None, **fixed: Any) -> Any:
    """`settings` with every field that `add_settings(parser, settings, skip, only)` made an
    option for taken from `args` (nested settings too); `fixed` sets fields by name."""
    values = {name: value for name, value in fixed.items() if name in {f.name for f in dataclasses.fields(settings)}}
    for spec in _optional_fields(settings, skip, only):
        value = getattr(settings, spec.name)
        if spec.name in fixed:
            continue
        if dataclasses.is_dataclass(value):
            values[spec.name] = settings_from(args, value, skip, only, **fixed)
        elif hasattr(args, spec.name):
            option = getattr(args, spec.name)
            values[spec.name] = tuple(option) if isinstance(option, list) else option
    try:
        return dataclasses.replace(settings, **values)
    except SettingError as error:  # named as the user wrote it: the flag
        name = error.name.replace("-", "_")
        if name in values:
            raise error.renamed("--" + name.replace("_", "-")) from None
        raise


def _optional_fields(settings: Any, skip: tuple[str, ...], only: tuple[str, ...] | None) -> list:
    """The fields of `settings` that options are made for: nested settings, and the fields
    named in `only` (all when None), less those in `skip`."""
    return [spec for spec in dataclasses.fields(settings) if spec.name not in skip and (
        only is None or spec.name in only or dataclasses.is_dataclass(getattr(settings, spec.name)))]


def run_command(prog: str, command: Callable[[], int]) -> int:
    """The one place where the errors a user can cause (`shared.errors.USER_ERRORS`: paths,
    values, data and model files) end as one line on stderr and exit status 2; the traceback
    is logged at debug level (`-v`). Any other exception is a bug and keeps its traceback.
    `kill` (SIGTERM) ends a command as Ctrl-C does: what it was writing is cleaned up first."""
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        return command()
    except USER_ERRORS as error:
        log.debug("details", exc_info=True)
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
