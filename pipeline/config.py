"""Recipes: a YAML file validated into a tree of frozen, typed stage configs.

Each stage owns its ``Config`` (beside the code that uses it); a recipe is the tree of them plus the
model family's config. ``--set a.b=c`` overrides are applied to the YAML before validation, so they
are checked exactly like the file. Every problem is a ``ConfigError`` whose message names the key and
the fix; unknown keys are errors, never silently ignored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import models
from pipeline.recipe_file import ConfigError, apply_override, check_name, read_recipe  # noqa: F401 (re-exported)
from stages import benchmark, evaluate, export, import_onnx, prepare, quantize, register, train
from stages.serve.config import ServeConfig


@dataclass(frozen=True)
class ModelSection:
    family: str
    config: Any  # the family's own frozen Config


@dataclass(frozen=True)
class Recipe:
    name: str
    model: ModelSection
    prepare: prepare.Config = field(default_factory=prepare.Config)
    train: train.Config = field(default_factory=train.Config)
    evaluate: evaluate.Config = field(default_factory=evaluate.Config)
    export: export.Config = field(default_factory=export.Config)
    quantize: quantize.Config = field(default_factory=quantize.Config)
    benchmark: benchmark.Config = field(default_factory=benchmark.Config)
    register: register.Config = field(default_factory=register.Config)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def to_dict(self) -> dict:
        """Plain, YAML-able form (the model section flattened back to ``family`` + its keys)."""
        out = {"name": self.name, "model": {"family": self.model.family, **_plain(self.model.config)}}
        for f in dataclasses.fields(self):
            if f.name not in ("name", "model"):
                if self.model.family == IMPORTED and f.name in NOT_FOR_IMPORTED:
                    continue  # an imported file is not trained or exported: those sections do not apply
                out[f.name] = _plain(getattr(self, f.name))
        return out


STAGE_SECTIONS = [f.name for f in dataclasses.fields(Recipe) if f.name not in ("name", "model")]


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, enum.Enum):
        return obj.value
    return obj


# ---------------------------------------------------------------- loading

def load_recipe(path: str | Path, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read a recipe file, apply ``key.path=value`` overrides, validate. Raises ConfigError.
    (Reading and overrides: ``pipeline.recipe_file``, which a server uses alone, without torch.)"""
    return recipe_from_dict(read_recipe(path, overrides))


def recipe_from_dict(data: dict) -> Recipe:
    data = dict(data)
    known = {f.name for f in dataclasses.fields(Recipe)}
    _reject_unknown(data, known, "")
    name = check_name(data.get("name"))
    model_data = data.get("model")
    if not isinstance(model_data, dict) or "family" not in model_data:
        raise ConfigError(f"`model.family` is required; choose one of {sorted(models.FAMILIES)}")
    model_data = dict(model_data)
    fam_name = model_data.pop("family")
    if fam_name == IMPORTED:
        return _imported_recipe(data, name, model_data)
    if fam_name not in models.FAMILIES:
        raise ConfigError(f"`model.family` must be one of {sorted(models.FAMILIES)} or {IMPORTED} (an existing "
                          f".onnx file), got {fam_name!r}")
    model_cfg = build_config(models.FAMILIES[fam_name].config_class, model_data, "model")
    kwargs: dict[str, Any] = {"name": name, "model": ModelSection(fam_name, model_cfg)}
    hints = typing.get_type_hints(Recipe)
    for section in STAGE_SECTIONS:
        if section in data:
            kwargs[section] = build_config(hints[section], data[section] or {}, section)
    data_cfg = kwargs.get("prepare")
    if data_cfg is not None and (data_cfg.dataset == "none" or data_cfg.task == "unlabeled"):
        what = "`prepare.dataset: none`" if data_cfg.dataset == "none" else "`prepare.task: unlabeled`"
        raise ConfigError(f"{what} gives no targets to train on; it is for `model.family: {IMPORTED}` (an existing "
                          "ONNX file); give labels to train this recipe's model")
    return Recipe(**kwargs)


IMPORTED = "onnx"  # model.family of a recipe that starts from an existing .onnx file (stages/import_onnx.py)
NOT_FOR_IMPORTED = ("train", "evaluate", "export")  # stages an imported file skips: it is already a model


def _imported_recipe(data: dict, name: str, model_data: dict) -> Recipe:
    """``model: {family: onnx, path: FILE, ...}``: the file is imported instead of trained and exported.
    Without a ``prepare`` section there is no data: the file is imported only (quantize, benchmark and
    register need samples to calibrate, judge and time it)."""
    given = [s for s in NOT_FOR_IMPORTED if s in data]
    if given:
        raise ConfigError(f"`{given[0]}` does not apply to model.family {IMPORTED}: the file is imported, not "
                          f"trained or exported; remove the {', '.join(f'`{s}`' for s in given)} section(s)")
    kwargs: dict[str, Any] = {"name": name, "model": ModelSection(IMPORTED, build_config(import_onnx.Config, model_data, "model"))}
    hints = typing.get_type_hints(Recipe)
    for section in STAGE_SECTIONS:
        if section in data:
            kwargs[section] = build_config(hints[section], data[section] or {}, section)
    if "prepare" not in data:
        kwargs["prepare"] = prepare.Config(dataset="none")
    return Recipe(**kwargs)


def _reject_unknown(data: dict, known: set[str], path: str) -> None:
    for key in data:
        if key not in known:
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(f"unknown key `{where}`; valid keys{' in `' + path + '`' if path else ''}: {', '.join(sorted(known))}")


def build_config(cls: type, data: Any, path: str) -> Any:
    """Build the frozen dataclass ``cls`` from a mapping, converting and checking every field.

    A config that validates mappings itself (``from_dict``, e.g. the serve section, which a server
    reads without this module) is built by it: one validator per config."""
    if hasattr(cls, "from_dict"):
        try:
            return cls.from_dict(data, path)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"`{path}` must be a mapping of keys, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    _reject_unknown(data, set(fields), path)
    hints = typing.get_type_hints(cls)
    kwargs = {k: _convert(hints[k], v, f"{path}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        msg = str(e)
        # Configs phrase checks as "`field` must ..."; prefix the section so the message names the full key.
        raise ConfigError(msg.replace("`", f"`{path}.", 1) if msg.startswith("`") else f"`{path}`: {msg}") from None


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if origin is Union or origin is types.UnionType:
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"`{path}` must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin in (tuple, list):
        args = get_args(tp)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]  # `--set benchmark.batch_sizes=1` means [1]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"`{path}` must be a list, got {value!r}")
        item_tp = args[0] if args else Any
        return tuple(_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return build_config(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"`{path}` must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"`{path}` must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"`{path}` must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"`{path}` must be a string, got {value!r}")
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(f"`{path}` must be one of {', '.join(m.value for m in tp)}; got {value!r}") from None
    return value
