"""Settings: a command's config dataclass is the one place each of its settings is written.

A field declared with `setting(...)` carries its flag's help text, argparse group and, where the field's type and
name do not say it, the flag's aliases, choices and how a flag's value becomes the field's. `add_settings` turns the
fields of one or more config classes into a parser's flags: `--field-name` (plus the aliases), the field's default
and type, and a help text that ends in the default. `settings_from_args` builds the config from the parsed flags.
The field's name is also its key in the run's `config.json` and in a `--config FILE` (YAML or JSON): the file sets
the parser's defaults, the flags given on the command line override them.

Shared groups (the model, data, optimisation, compute and run settings) are dataclasses of their own that the
commands' configs inherit; `inherit` copies one field of a group with another default or help where a command
needs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from reports.run_format import KIND_KEY

SETTING = "spvit.setting"  # the key of a field's `Flag` in its metadata
CONFIG_FLAG = "--config"


class SettingsFileError(ValueError):
    """A `--config` file that cannot be read, or that names or sets a setting wrongly."""


@dataclass(frozen=True)
class Flag:
    """How a config field shows on the command line."""

    help: str
    group: str  # the title of the argparse group it is listed under
    aliases: tuple[str, ...] = ()  # other spellings, e.g. timm's and DeiT's
    choices: tuple[Any, ...] | None = None
    metavar: str | None = None
    nargs: str | None = None  # default: "+" for a list field
    const: Any = None  # the value of a flag given without one (nargs "?")
    parse: Callable[[Any], Any] | None = None  # the field's value from the flag's (idempotent on field values)
    default_text: str | None = None  # the default in words, where the field's value alone does not say it
    # The command line (or a --config file) must give it although the dataclass has a default for Python callers:
    # a run directory or a budget is never guessed on the command line. Of an `exclusive` set: one of them.
    required: bool = False
    exclusive: str | None = None  # the name of a set of flags in the group of which at most one may be given
    shortcuts: tuple[tuple[str, Any], ...] = ()  # flags that store a constant, e.g. (("--bf16", "bf16"),)
    positional: bool = False

    def option_strings(self, name: str) -> list[str]:
        return [f"--{name.replace('_', '-')}", *self.aliases]


def setting(default: Any = MISSING, *, factory: Any = MISSING, **flag: Any) -> Any:
    """A config field that is also a flag; `flag` are `Flag`'s fields."""
    return dataclasses.field(default=default, default_factory=factory, metadata={SETTING: Flag(**flag)})


def group(title: str) -> Callable[..., Any]:
    """`setting` for the fields of one argparse group."""
    return functools.partial(setting, group=title)


def inherit(owner: type, name: str, default: Any = MISSING, factory: Any = MISSING, **changes: Any) -> Any:
    """Field `name` of the dataclass `owner` with another default (or factory) and `changes` to its `Flag`."""
    source = owner.__dataclass_fields__[name]
    flag = dataclasses.replace(source.metadata[SETTING], **changes)
    if default is MISSING and factory is MISSING:
        default, factory = source.default, source.default_factory
    return dataclasses.field(default=default, default_factory=factory, metadata={SETTING: flag})


def matches_type(value: Any, hint: Any) -> bool:
    """Whether parsed JSON or YAML `value` has the type `hint` (the config fields' types: scalars, optionals,
    containers)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches_type(value, arm) for arm in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if origin is not None:  # dict[str, Any], list[float]: the container, and the items of a list
        if not isinstance(value, origin):
            return False
        args = typing.get_args(hint)
        return origin is not list or all(matches_type(v, args[0]) for v in value)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def describe_type(hint: Any) -> str:
    plain = typing.get_origin(hint) is None and getattr(hint, "__name__", None)
    return plain or str(hint).replace("typing.", "")


def _scalar_type(hint: Any) -> Any:
    """The type one command-line word is read as: `int | None` -> int, `list[float]` -> float."""
    arms = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(arms) == 1:
        return _scalar_type(arms[0])
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0]
    return hint


def format_value(value: Any) -> str:
    """A value as the command line writes it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "none"
    if isinstance(value, list | tuple):
        return " ".join(format_value(v) for v in value) or "none"
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items()) or "none"
    return str(value)


class SettingsHelpFormatter(argparse.HelpFormatter):
    """Ends every setting's help in its default, as it stands after a `--config` file set it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        flag = getattr(action, "setting", None)
        text = action.help or ""
        if flag is None:
            return text
        if action.required:
            shown = "required"
        elif unless := getattr(action, "required_unless", None):
            shown = f"required unless {' or '.join(unless)} is given"
        elif action.default is None and flag.default_text is not None:
            shown = f"default: {flag.default_text}"
        else:
            shown = f"default: {format_value(action.default)}"
        return f"{text} ({shown})".replace("%", "%%").lstrip()


class SettingsParser(argparse.ArgumentParser):
    """A parser whose defaults a `--config FILE` of settings replaces before the command line is read."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", SettingsHelpFormatter)
        super().__init__(*args, **kwargs)
        self.settings: dict[str, argparse.Action] = {}  # field name -> its flag
        self.setting_types: dict[str, Any] = {}  # field name -> its type hint
        self.kinds: list[str] = []  # the kinds of run the parser's configs are

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        if CONFIG_FLAG in self._option_string_actions:
            path = _config_path(args)
            if path is not None:
                self.apply_settings_file(Path(path))
        return super().parse_known_args(args, namespace)

    def apply_settings_file(self, path: Path) -> None:
        """Make the settings `path` holds the parser's defaults; required flags it gives are no longer required."""
        values = read_settings_file(path)
        kind = values.pop(KIND_KEY, None)  # a run's config.json names its kind: it must be one this command runs
        if kind is not None and kind not in self.kinds:
            raise SettingsFileError(
                f"{path} holds the settings of a {kind!r} run, not of a {' or '.join(map(repr, self.kinds))} run"
            )
        values = {key: self._file_value(path, key, value) for key, value in values.items()}
        self.set_defaults(**values)
        for name in values:
            self.settings[name].required = False
        for exclusive in self._mutually_exclusive_groups:
            if any(action.dest in values for action in exclusive._group_actions):
                exclusive.required = False

    def _file_value(self, path: Path, key: str, value: Any) -> Any:
        action = self.settings.get(key)
        if action is None:
            raise SettingsFileError(f"{path}: unknown setting '{key}'{self._suggestion(key)}")
        try:
            if action.type is not None:  # YAML reads 1e-3 as a string; the flag's reader turns it into 0.001
                value = [_read(action, v) for v in value] if isinstance(value, list) else _read(action, value)
            if action.setting.parse is not None:
                value = action.setting.parse(value)
        except (TypeError, ValueError) as e:
            raise SettingsFileError(f"{path}: {key}: {e}") from None
        hint = self.setting_types[key]
        if not matches_type(value, hint):
            raise SettingsFileError(
                f"{path}: {key}: expected {describe_type(hint)}, got {type(value).__name__} {value!r:.40}"
            )
        choices = action.choices
        if choices is not None and any(v not in choices for v in (value if isinstance(value, list) else [value])):
            raise SettingsFileError(f"{path}: {key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value

    def _suggestion(self, key: str) -> str:
        aliases = {
            option.lstrip("-").replace("-", "_"): name
            for name, action in self.settings.items()
            for option in action.option_strings
        }
        if key.replace("-", "_") in aliases:
            return f"; did you mean {aliases[key.replace('-', '_')]}"
        close = difflib.get_close_matches(key, self.settings, n=1)
        return f"; did you mean {close[0]}" if close else "; the settings are the keys of a run's config.json"


def _read(action: argparse.Action, value: Any) -> Any:
    return action.type(value) if isinstance(value, str) else value


def _config_path(args: Sequence[str] | None) -> str | None:
    """The FILE of `--config FILE` (or `--config=FILE`) among `args`, before the parser reads them."""
    scanner = argparse.ArgumentParser(add_help=False)  # abbreviations (`--conf`) as the parser itself takes them
    scanner.add_argument(CONFIG_FLAG)
    known, _ = scanner.parse_known_args(args)
    return known.config


def read_settings_file(path: Path) -> dict[str, Any]:
    """The mapping of settings a YAML or JSON file holds."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise SettingsFileError(f"cannot read --config {path}: {reason}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise SettingsFileError(f"--config {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                                f"{' '.join(str(e).split())}") from None  # fmt: skip
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsFileError(f"--config {path} holds a {type(data).__name__}, not a mapping of settings")
    return data


def add_settings(parser: SettingsParser, *configs: type, settings_file: bool = True) -> None:
    """The flags of the `setting` fields of `configs` (a field several of them share is one flag, the first's), and
    `--config FILE` unless not `settings_file`."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    exclusive: dict[tuple[str, str], argparse._MutuallyExclusiveGroup] = {}
    for config in configs:
        if hasattr(config, "kind"):
            parser.kinds.append(config.kind)
        hints = typing.get_type_hints(config)
        for field in fields(config):
            flag = field.metadata.get(SETTING)
            if flag is None or field.name in parser.settings:
                continue
            container = groups.get(flag.group) or groups.setdefault(flag.group, parser.add_argument_group(flag.group))
            if flag.exclusive is not None:
                key = (flag.group, flag.exclusive)
                container = exclusive.get(key) or exclusive.setdefault(key, container.add_mutually_exclusive_group())
                container.required |= flag.required
            action = _add_flag(container, field, flag, hints[field.name])
            parser.settings[field.name] = action
            parser.setting_types[field.name] = hints[field.name]
    for one_of in exclusive.values():
        if one_of.required:
            for action in one_of._group_actions:
                action.required_unless = [a.option_strings[0] for a in one_of._group_actions if a is not action]
    if settings_file:
        parser.add_argument(
            CONFIG_FLAG, metavar="FILE", default=None,
            help="YAML or JSON file of settings, keyed like a run's config.json; the flags given override it",
        )  # fmt: skip


def _add_flag(container: Any, field: dataclasses.Field, flag: Flag, hint: Any) -> argparse.Action:
    default = field.default_factory() if field.default_factory is not MISSING else field.default
    required = (flag.required or default is MISSING) and flag.exclusive is None  # a set's one-of is the set's
    kwargs: dict[str, Any] = {"default": None if default is MISSING else default, "help": flag.help}
    if flag.choices is not None:
        kwargs["choices"] = flag.choices
    if flag.metavar is not None:
        kwargs["metavar"] = flag.metavar
    if hint is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        scalar = _scalar_type(hint)
        if scalar in (int, float):
            kwargs["type"] = scalar
        nargs = flag.nargs or ("+" if typing.get_origin(hint) is list else None)
        if nargs is not None:
            kwargs["nargs"] = nargs
        if nargs == "?":
            kwargs["const"] = flag.const
    if flag.positional:
        action = container.add_argument(field.name, **kwargs)
    else:
        action = container.add_argument(*flag.option_strings(field.name), dest=field.name, required=required, **kwargs)
    action.help = flag.help  # BooleanOptionalAction appends its own default; the formatter writes every one
    action.setting = flag
    for option, value in flag.shortcuts:
        same = f"the same as {action.option_strings[0]} {format_value(value)} (default: off)"
        container.add_argument(option, dest=field.name, action="store_const", const=value, help=same)
    return action


def settings_from_args(config: type, args: argparse.Namespace, **values: Any) -> Any:
    """An instance of the config dataclass `config` from the parsed flags (and `values` for fields no flag sets)."""
    for field in fields(config):
        flag = field.metadata.get(SETTING)
        if flag is None or field.name in values:
            continue
        value = getattr(args, field.name)
        values[field.name] = flag.parse(value) if flag.parse is not None else value
    return config(**values)
