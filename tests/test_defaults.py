"""One source of defaults: ``mlflow run .`` and ``geopose-ml`` with the same options run the same thing.

MLproject is YAML and cannot import the package, so its parameter defaults are checked here against the
click option each one is passed to (found by walking ``geopose_mlops.cli.main`` with click's API, from the
entry point's ``command``), and the training options' click defaults against the ``TrainConfig`` and
``ModelConfig`` field defaults. MLproject conventions: ``0`` and ``""`` mean "not set" (the option's
default is None), a flag parameter names the flag (``amp: amp`` is ``--amp``).
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from geopose_mlops.cli import main
from geopose_mlops.config import ModelConfig, TrainConfig, default_of

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINTS: dict[str, Any] = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]
TRAIN_ENTRY_POINTS = ("main", "fold")
CONFIG_FIELDS = {f.name: TrainConfig for f in dataclasses.fields(TrainConfig)} | {
    f.name: ModelConfig for f in dataclasses.fields(ModelConfig)
}
# MLproject defaults that differ from the command's on purpose, with the reason.
MLPROJECT_ONLY = {("evaluate", "output_json"): "`mlflow run -e evaluate` keeps the scores as a file"}
# Train options that are TrainConfig fields but not MLproject parameters, with the reason (none at present).
DELIBERATELY_LOCAL: dict[str, str] = {}
NOT_SET = (0, 0.0, "")  # what an MLproject parameter holds for an option whose default is None


def is_not_set(value: Any) -> bool:
    """MLproject's "not set" for an option whose default is None: 0 or an empty string (a flag is never)."""
    return not isinstance(value, bool) and value in NOT_SET


def command_of(entry: str) -> tuple[click.Command, list[str]]:
    """The click command an entry point runs and its command line after the command's name."""
    tokens = shlex.split(ENTRY_POINTS[entry]["command"])
    rest = tokens[tokens.index("geopose_mlops.cli") + 1 :]
    command: click.Command = main
    while isinstance(command, click.Group):
        name = rest.pop(0)
        assert name in command.commands, f"MLproject {entry}: {name!r} is not a command of {command.name}"
        command = command.commands[name]
    return command, rest


def parameter_map(entry: str) -> dict[str, click.Parameter]:
    """Each MLproject parameter of ``entry`` -> the click option or argument it is passed to."""
    command, tokens = command_of(entry)
    defaults = ENTRY_POINTS[entry]["parameters"]
    options = {opt: p for p in command.params if isinstance(p, click.Option) for opt in (*p.opts, *p.secondary_opts)}
    arguments = iter(p for p in command.params if isinstance(p, click.Argument))
    mapping: dict[str, click.Parameter] = {}
    tokens = list(tokens)
    while tokens:
        token = tokens.pop(0)
        if flag := re.fullmatch(r"--\{(\w+)\}", token):  # --{amp}: the parameter names the flag
            name = flag[1]
            mapping[name] = options[f"--{defaults[name]['default']}"]
            assert mapping[name].secondary_opts, f"MLproject {entry}: --{{{name}}} needs an on/off flag"
        elif token.startswith("--"):
            assert token in options, f"MLproject {entry}: {token} is not an option of {command.name}"
            name = re.fullmatch(r"\{(\w+)\}", tokens.pop(0))[1]
            mapping[name] = options[token]
        else:
            mapping[re.fullmatch(r"\{(\w+)\}", token)[1]] = next(arguments)
    return mapping


def mlproject_values(entry: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what the command receives from ``mlflow run`` with every default, what it receives with no options)."""
    command, tokens = command_of(entry)
    defaults = ENTRY_POINTS[entry]["parameters"]
    args = [re.sub(r"\{(\w+)\}", lambda m: str(defaults[m[1]]["default"]), token) for token in tokens]
    given = command.make_context(command.name, args).params
    unset = command.make_context(command.name, [], resilient_parsing=True).params
    return given, unset


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_every_mlproject_parameter_is_passed_to_an_option(entry: str) -> None:
    declared = set(ENTRY_POINTS[entry]["parameters"])
    used = set(re.findall(r"\{(\w+)\}", ENTRY_POINTS[entry]["command"]))
    assert declared == used, f"MLproject {entry}: declared but unused {declared - used}, used but undeclared "
    assert set(parameter_map(entry)) == declared


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_mlproject_defaults_are_the_commands_defaults(entry: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # tune's study file must exist
    given, unset = mlproject_values(entry)
    for name, param in parameter_map(entry).items():
        if param.required or (entry, name) in MLPROJECT_ONLY:
            continue  # no default of the command to agree with (a required option or argument)
        value, default = given[param.name], unset[param.name]
        if default is None:
            assert is_not_set(value), f"MLproject {entry}.{name}: {value!r}, but the option is unset by default"
        else:
            assert value == default, f"MLproject {entry}.{name}: {value!r}, the command's default: {default!r}"


@pytest.mark.parametrize("entry", TRAIN_ENTRY_POINTS)
def test_mlproject_training_defaults_are_the_config_fields(entry: str) -> None:
    given, unset = mlproject_values(entry)
    for name, param in parameter_map(entry).items():
        if param.name not in CONFIG_FIELDS:
            continue
        value = given[param.name]
        not_set = unset[param.name] is None and is_not_set(value)
        value = None if not_set or (param.name == "folds" and value == "all") else value
        value = str(value) if isinstance(value, Path) else value
        expected = default_of(CONFIG_FIELDS[param.name], param.name)
        assert value == expected, f"MLproject {entry}.{name}: {value!r}, {param.name} defaults to {expected!r}"


@pytest.mark.parametrize("path", [("train",), ("fold",), ("cv", "start")])
def test_train_option_defaults_are_the_config_fields(path: tuple[str, ...]) -> None:
    command: click.Command = main
    for name in path:
        command = command.commands[name]
    unset = command.make_context(command.name, [], resilient_parsing=True).params
    fields = [p for p in command.params if p.name in CONFIG_FIELDS and not p.required]
    assert {p.name for p in fields} >= {"lr", "image_size", "effective_batch_size", "num_workers", "encoder", "amp"}
    for param in fields:
        expected = default_of(CONFIG_FIELDS[param.name], param.name)
        value = None if param.name == "folds" and unset[param.name] == "all" else unset[param.name]
        assert value == expected, f"{' '.join(path)} --{param.name}: {value!r}, {param.name} defaults to {expected!r}"


@pytest.mark.parametrize("entry", TRAIN_ENTRY_POINTS)
def test_every_training_field_option_is_an_mlproject_parameter(entry: str) -> None:
    command, _ = command_of(entry)
    mapped = {p.name for p in parameter_map(entry).values()}
    missing = [p.name for p in command.params if p.name in CONFIG_FIELDS and p.name not in mapped]
    assert not [name for name in missing if name not in DELIBERATELY_LOCAL], f"MLproject {entry} lacks {missing}"


def test_the_chosen_training_defaults() -> None:
    config = TrainConfig()
    assert (config.lr, config.image_size, config.effective_batch_size, config.num_workers) == (1e-4, 1024, None, 0)
