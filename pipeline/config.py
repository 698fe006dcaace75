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
from pipeline.recipe_file import (ConfigError, apply_override, check_name, merge_overlay,  # noqa: F401 (re-exported)
                                  read_recipe)
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
    tune: "TuneConfig" = field(default_factory=lambda: TuneConfig())  # `pipeline tune`'s search (no stage reads it)

    def to_dict(self) -> dict:
        """Plain, YAML-able form (the model section flattened back to ``family`` + its keys)."""
        out = {"name": self.name, "model": {"family": self.model.family, **_plain(self.model.config)}}
        for f in dataclasses.fields(self):
            if f.name not in ("name", "model"):
                if self.model.family == IMPORTED and f.name in NOT_FOR_IMPORTED:
                    continue  # an imported file is not trained or exported: those sections do not apply
                out[f.name] = _plain(getattr(self, f.name))
        return out


STAGE_SECTIONS = [f.name for f in dataclasses.fields(Recipe) if f.name not in ("name", "model", "tune")]


def _plain(obj: Any) -> Any:
    if hasattr(obj, "to_plain"):  # a section with a YAML form of its own (tune)
        return obj.to_plain()
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, enum.Enum):
        return obj.value
    return obj


# ---------------------------------------------------------------- loading

def load_recipe(path: str | Path, overrides: typing.Sequence[str] = (),
                overlays: typing.Sequence[str | Path] = ()) -> Recipe:
    """Read a recipe file, merge ``overlays`` (partial recipes, e.g. `pipeline tune --best`'s best.yaml) in
    order, apply ``key.path=value`` overrides, validate. Raises ConfigError. (Reading, overlays and
    overrides: ``pipeline.recipe_file``, which a server uses alone, without torch.)"""
    try:
        return recipe_from_dict(read_recipe(path, overrides, overlays))
    except ConfigError as e:
        if overlays:  # say which file holds the mistake when the recipe is fine without the overlays
            try:
                load_recipe(path, overrides)
            except ConfigError:
                raise e from None
            raise ConfigError(f"recipe overlay {', '.join(map(str, overlays))}: {e}") from None
        raise


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
    if data.get("tune"):  # last: its search space is checked against the recipe built so far
        kwargs["tune"] = TuneConfig.from_dict(data["tune"], Recipe(**kwargs))
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
    if data.get("tune"):  # last: its search space is checked against the recipe built so far
        kwargs["tune"] = TuneConfig.from_dict(data["tune"], Recipe(**kwargs))
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


# ---------------------------------------------------------------- the tune section (`pipeline tune`)

# Objectives beside the validation metric: measured on the trial's exported (and optionally quantized)
# ONNX file. name -> (direction, what it is).
SPEED_OBJECTIVES = {
    "latency_ms": ("minimize", "median latency at batch 1 (ms), ONNX Runtime with the server's session settings"),
    "samples_per_s": ("maximize", "samples/s at the serving batch size (tune.batch_size, else serve.batching.max_batch_size)"),
    "size_kb": ("minimize", "size of the ONNX file (KiB)"),
}
RANGE_KEYS, CHOICE_KEYS = ("low", "high", "log", "step"), ("choices",)


@dataclass(frozen=True)
class SearchParam:
    """One dimension of ``tune.space``: a recipe key and its range (``low``..``high``, on a log scale or
    in steps) or its ``choices``. ``kind`` (float, int or categorical) follows the key's type in the recipe."""

    key: str  # a recipe key, e.g. train.lr or model.channels
    kind: Literal["float", "int", "categorical"]
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def to_plain(self) -> dict:
        if self.kind == "categorical":
            return {"choices": [_listify(c) for c in self.choices]}
        out: dict[str, Any] = {"low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out


def _listify(value: Any) -> Any:
    return [_listify(v) for v in value] if isinstance(value, (list, tuple)) else value


def _tuplify(value: Any) -> Any:
    return tuple(_tuplify(v) for v in value) if isinstance(value, (list, tuple)) else value


@dataclass(frozen=True)
class TuneConfig:
    """The recipe's ``tune:`` section: what `pipeline tune` searches, for what, and how."""

    # The task's validation metric ("auto": its primary one, e.g. val_accuracy), optionally followed by one
    # of SPEED_OBJECTIVES: then the search is multi-objective and returns a Pareto front.
    objectives: tuple[str, ...] = ("auto",)
    space: tuple[SearchParam, ...] = ()
    trials: int = 20  # the study's size: `pipeline tune` runs trials until the study holds this many
    timeout_s: float = 0.0  # stop starting trials after this many seconds (0: no limit)
    sampler: Literal["auto", "tpe", "random", "nsga2"] = "auto"  # auto: TPE (multivariate; multi-objective too)
    pruner: Literal["auto", "median", "hyperband", "none"] = "auto"  # auto: median for one objective, none for several
    pruner_startup_trials: int = 3  # median: trials that run to the end before any is pruned
    pruner_warmup_epochs: int = 3  # epochs every trial trains before it may be pruned (hyperband: its minimum)
    seed: int = 0  # the sampler's seed (worker i of a study uses seed + i)
    variant: str = "fp32"  # speed objectives: the exported file (fp32) or a quantize variant (int8-dynamic, ...)
    batch_size: int = 0  # samples_per_s: the batch it is measured at; 0: serve.batching.max_batch_size
    timing_seconds: float = 1.0  # speed objectives: minimum timed seconds per trial (median of the calls)
    pick_within: float = 0.005  # several objectives: the chosen trial is the best on the speed objective among
    # the Pareto front's trials whose validation metric is within this (metric units: 0.005 = 0.5 points) of the best
    storage: str = ""  # Optuna storage URI; "": sqlite optuna.db beside a sqlite MLflow store (mlruns/optuna.db)
    study: str = ""  # the study's name; "": the recipe's name
    heartbeat_s: int = 30  # a trial's worker beats this often; silent for twice that: failed (and retried)
    retry_stale: int = 1  # a trial whose worker died is run again this many times at most

    def __post_init__(self) -> None:
        if not self.objectives or len(self.objectives) > 2:
            raise ValueError(f"`objectives` must be the validation metric, optionally followed by one of "
                             f"{', '.join(SPEED_OBJECTIVES)}; got {list(self.objectives)}")
        first, rest = self.objectives[0], self.objectives[1:]
        if first != "auto" and not first.startswith("val_"):
            raise ValueError(f"`objectives` must start with the validation metric (auto, or a val_* metric such as "
                             f"val_accuracy); got {first!r}")
        bad = [o for o in rest if o not in SPEED_OBJECTIVES]
        if bad:
            raise ValueError(f"`objectives`: {bad[0]!r} is not a second objective; choose one of "
                             f"{', '.join(SPEED_OBJECTIVES)}")
        if self.trials < 1:
            raise ValueError(f"`trials` must be >= 1, got {self.trials}")
        if self.timeout_s < 0:
            raise ValueError(f"`timeout_s` must be >= 0 (0: no limit), got {self.timeout_s}")
        if len(self.objectives) > 1 and self.pruner not in ("auto", "none"):
            raise ValueError(f"`pruner` {self.pruner} needs a single objective (Optuna cannot prune multi-objective "
                             "trials); set tune.pruner to none or auto, or drop the second objective")
        if self.pruner_startup_trials < 0 or self.pruner_warmup_epochs < 0:
            raise ValueError(f"`pruner_startup_trials` and `pruner_warmup_epochs` must be >= 0, got "
                             f"{self.pruner_startup_trials}, {self.pruner_warmup_epochs}")
        if self.batch_size < 0:
            raise ValueError(f"`batch_size` must be >= 0 (0: serve.batching.max_batch_size), got {self.batch_size}")
        if not self.timing_seconds > 0:
            raise ValueError(f"`timing_seconds` must be > 0, got {self.timing_seconds}")
        if self.pick_within < 0:
            raise ValueError(f"`pick_within` must be >= 0, got {self.pick_within}")
        if self.heartbeat_s < 1:
            raise ValueError(f"`heartbeat_s` must be >= 1 (seconds), got {self.heartbeat_s}")
        if self.retry_stale < 0:
            raise ValueError(f"`retry_stale` must be >= 0, got {self.retry_stale}")
        if self.variant != "fp32":
            from stages.quantize.variants import VARIANTS

            if self.variant not in VARIANTS:
                raise ValueError(f"`variant` must be fp32 or a quantize variant ({', '.join(VARIANTS)}), got {self.variant!r}")
        if self.study and not self.study.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ValueError(f"`study` must be a short name (letters, digits, - _ .), got {self.study!r}")

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def to_plain(self) -> dict:
        out = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "space"}
        out["space"] = {p.key: p.to_plain() for p in self.space}
        return out

    @classmethod
    def from_dict(cls, data: Any, recipe: Recipe, path: str = "tune") -> "TuneConfig":
        """Validate the ``tune`` mapping; every ``space`` key must name a value of ``recipe`` and every bound
        and choice must make a valid recipe on its own (so a typo or an impossible range fails before a trial)."""
        if not isinstance(data, dict):
            raise ConfigError(f"`{path}` must be a mapping of keys, got {data!r}")
        data = dict(data)
        space = data.pop("space", None) or {}
        if not isinstance(space, dict):
            raise ConfigError(f"`{path}.space` must map recipe keys to a range or choices, e.g. "
                              "`train.lr: {low: 1e-4, high: 1e-2, log: true}`; got {space!r}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        _reject_unknown(data, set(known), path)
        hints = typing.get_type_hints(cls)
        kwargs = {k: _convert(hints[k], v, f"{path}.{k}") for k, v in data.items()}
        kwargs["space"] = tuple(_search_param(recipe, key, spec, f"{path}.space.{key}")
                                for key, spec in _flat_space(space).items())
        try:
            return cls(**kwargs)
        except ValueError as e:
            msg = str(e)
            raise ConfigError(msg.replace("`", f"`{path}.", 1) if msg.startswith("`") else f"`{path}`: {msg}") from None


def _flat_space(space: dict, prefix: str = "") -> dict:
    """``{train.lr: {...}}`` as written in YAML, or nested ``{train: {lr: {...}}}`` as `--set tune.space.train.lr=...`
    makes it: both become dotted keys."""
    flat: dict = {}
    for key, spec in space.items():
        dotted = f"{prefix}{key}"
        if isinstance(spec, dict) and spec and all(isinstance(v, dict) for v in spec.values()):
            flat.update(_flat_space(spec, dotted + "."))
        else:
            flat[dotted] = spec
    return flat


def recipe_key_type(recipe: Recipe, dotted: str, where: str) -> Any:
    """The declared type of the recipe value ``dotted`` (e.g. train.lr -> float). ConfigError if it names none."""
    parts = dotted.split(".")
    sections = ["model", *STAGE_SECTIONS]
    if parts[0] not in sections or len(parts) < 2:
        raise ConfigError(f"`{where}`: `{dotted}` is not a recipe key; name a key of one of the sections "
                          f"{', '.join(sections)}, e.g. train.lr")
    cls: Any = type(recipe.model.config) if parts[0] == "model" else type(getattr(recipe, parts[0]))
    for i, part in enumerate(parts[1:], start=1):
        fields = {f.name for f in dataclasses.fields(cls) if f.init}
        if part not in fields:
            here = ".".join(parts[:i])
            raise ConfigError(f"`{where}`: `{dotted}` is not a recipe key; valid keys in `{here}`: {', '.join(sorted(fields))}")
        tp = typing.get_type_hints(cls)[part]
        last = i == len(parts) - 1
        if dataclasses.is_dataclass(tp):
            if last:
                raise ConfigError(f"`{where}`: `{dotted}` is a section; name one of its keys: "
                                  f"{', '.join(f.name for f in dataclasses.fields(tp))}")
            cls = tp
        elif not last:
            raise ConfigError(f"`{where}`: `{'.'.join(parts[:i + 1])}` is a value, not a section")
        else:
            return tp
    raise AssertionError("unreachable")


def _kind(tp: Any) -> str:
    """float, int or categorical: how a key of type ``tp`` is searched."""
    origin = get_origin(tp)
    if origin is Union or origin is types.UnionType:
        args = [a for a in get_args(tp) if a is not type(None)]
        return _kind(args[0]) if len(args) == 1 else "categorical"
    if tp is float:
        return "float"
    if tp is int:
        return "int"
    return "categorical"


def _search_param(recipe: Recipe, key: str, spec: Any, where: str) -> SearchParam:
    kind = _kind(recipe_key_type(recipe, key, where))
    if not isinstance(spec, dict):
        raise ConfigError(f"`{where}` must be a range `{{low: L, high: H}}` (with `log: true` or `step: S`) or "
                          f"`{{choices: [A, B, ...]}}`; got {spec!r}")
    unknown = [k for k in spec if k not in RANGE_KEYS + CHOICE_KEYS]
    if unknown:
        raise ConfigError(f"unknown key `{where}.{unknown[0]}`; valid keys: {', '.join(RANGE_KEYS + CHOICE_KEYS)}")
    if "choices" in spec:
        if any(k in spec for k in RANGE_KEYS):
            raise ConfigError(f"`{where}` gives both choices and a range; keep one")
        choices = spec["choices"]
        if not isinstance(choices, list):
            raise ConfigError(f"`{where}.choices` must be a list, got {choices!r}")
        distinct = []
        for c in choices:
            if c not in distinct:
                distinct.append(c)
        if len(distinct) < 2:
            raise ConfigError(f"`{where}.choices` must hold at least two different values (one value is not a "
                              f"search: set `{key}` in the recipe instead); got {choices!r}")
        if len(distinct) < len(choices):
            raise ConfigError(f"`{where}.choices` lists a value twice: {choices!r}")
        for c in distinct:
            _check_value(recipe, key, c, where, f"choice {c!r}")
        return SearchParam(key, "categorical", choices=tuple(_tuplify(c) for c in distinct))
    if kind == "categorical":
        raise ConfigError(f"`{where}`: `{key}` is not a number, so it takes `choices: [...]`, not a range")
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"`{where}` needs both `low` and `high` (or `choices`)")
    low, high = (_bound(spec[k], kind, f"{where}.{k}") for k in ("low", "high"))
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"`{where}.log` must be true or false, got {log!r}")
    step = _bound(spec["step"], kind, f"{where}.step") if spec.get("step") is not None else None
    if low == high:
        raise ConfigError(f"`{where}` is an empty range (low = high = {low}); widen it, or set `{key}` in the recipe")
    if low > high:
        raise ConfigError(f"`{where}` is inverted (low {low} > high {high}); swap them")
    if log and low <= 0:
        raise ConfigError(f"`{where}`: a log-scale range must have low > 0, got {low}")
    if log and step is not None:
        raise ConfigError(f"`{where}`: `log` and `step` exclude each other (Optuna samples one or the other); drop one")
    if step is not None and not 0 < step <= high - low:
        raise ConfigError(f"`{where}.step` must be > 0 and at most high - low ({high - low}), got {step}")
    for name, value in (("low", low), ("high", high)):
        _check_value(recipe, key, value, where, f"{name} {value}")
    return SearchParam(key, kind, low=low, high=high, log=log, step=step)


def _bound(value: Any, kind: str, where: str) -> float | int:
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"`{where}` must be an integer (the key is an integer), got {value!r}")
        return value
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        raise ConfigError(f"`{where}` must be a finite number, got {value!r}")
    return float(value)


def _check_value(recipe: Recipe, key: str, value: Any, where: str, what: str) -> None:
    """The recipe with ``key`` set to ``value`` must be valid: an impossible bound fails now, not in a trial."""
    data = recipe.to_dict()
    data.pop("tune", None)
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = _listify(value)
    try:
        recipe_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"`{where}`: {what} makes an invalid recipe: {e}") from None
