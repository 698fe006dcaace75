"""Reading a recipe file: YAML, ``--set`` overrides, and the serve section on its own.

``read_recipe`` turns a file plus ``key.path=value`` overrides into the plain mapping that
``pipeline.config.recipe_from_dict`` validates into the typed ``Recipe`` (every stage's config).
``load_serve_recipe`` reads the same file for what a server needs and nothing else: the recipe's
name, its registered model name and the ``serve:`` section, validated by ``ServeConfig.from_dict``
(the one validator of that section).

Light on purpose: PyYAML and ``stages.serve.config`` only. ``pipeline.config`` imports every stage
module and the model families (hence torch: 1.8 s of a 2.1 s server start, and a 2 GB install), so
the serving commands read recipes through this module and never import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from stages.serve.config import ServeConfig


class ConfigError(ValueError):
    """A recipe problem a user can fix; the message says what and how."""


def read_recipe(path: str | Path, overrides: Sequence[str] = (),
                overlays: Sequence[str | Path] = ()) -> dict[str, Any]:
    """The recipe file as a mapping (``name`` defaulting to the file's stem), ``overlays`` (partial
    recipes, e.g. `pipeline tune --best`'s best.yaml) merged in order, then overrides applied;
    ConfigError when a file is missing, not YAML or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file {str(path)!r} not found; pass --recipe with a path such as configs/digits-cnn.yaml")
    data = _read_mapping(path, "recipe file")
    data.setdefault("name", path.stem)
    for overlay in overlays:
        if not Path(overlay).is_file():
            raise ConfigError(f"recipe overlay {str(overlay)!r} not found; pass --recipe-overlay with the file "
                              "`pipeline tune --best` wrote (or any partial recipe)")
        merge_overlay(data, _read_mapping(Path(overlay), "recipe overlay"))
    for item in overrides:
        apply_override(data, item)
    return data


def _read_mapping(path: Path, what: str) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {str(path)!r} must hold a mapping of sections, got {type(data).__name__}")
    return data


def merge_overlay(data: dict, overlay: dict) -> None:
    """Merge a partial recipe into ``data`` in place: mappings merge key by key, anything else (a value,
    a list) replaces what was there."""
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            merge_overlay(data[key], value)
        else:
            data[key] = value


def apply_override(data: dict, item: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML (so 3, 0.1, [1, 2], true)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.epochs=3")
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: `{'.'.join(parts[:i + 1])}` is a value, not a section")
        node = child
    node[parts[-1]] = value


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"`name` must be a short identifier such as digits-cnn, got {name!r}")
    return name


@dataclass(frozen=True)
class ServeRecipe:
    """What a server reads from a recipe: its name, the registered model name, the serve section."""

    name: str
    model_name: str  # register.model_name, else the recipe's name
    serve: ServeConfig

    @property
    def champion_uri(self) -> str:
        return f"models:/{self.model_name}@champion"


# Keys outside `serve.` that a serving command's --set may change (they name the registered model).
SERVE_READS = ("name", "register.model_name")


def load_serve_recipe(path: str | Path | None, overrides: Sequence[str] = ()) -> tuple[ServeConfig, ServeRecipe | None]:
    """(serve settings, ServeRecipe) of recipe ``path``, or without a recipe (None) the built-in
    settings and None; overrides may only touch ``serve.*`` (and, with a recipe, the model's name).
    The rest of the recipe is not read: its stages are validated by the commands that run them."""
    allowed = ("serve.", *SERVE_READS) if path is not None else ("serve.",)
    for item in overrides:
        key = item.partition("=")[0].strip()
        if not any(key == a or key.startswith(a) for a in allowed):
            raise ConfigError(f"--set {item}: a server reads only the recipe's serve section "
                              f"({'and its model name' if path is not None else 'no recipe is given'}); "
                              "set serve.* keys")
    if path is None:
        data: dict = {}
        for item in overrides:
            apply_override(data, item)
        return _serve_config(data.get("serve")), None
    data = read_recipe(path, overrides)
    name = check_name(data.get("name"))
    register = data.get("register") or {}
    model_name = register.get("model_name") if isinstance(register, dict) else None
    if model_name is not None and not isinstance(model_name, str):
        raise ConfigError(f"`register.model_name` must be a string, got {model_name!r}")
    serve = _serve_config(data.get("serve"))
    return serve, ServeRecipe(name=name, model_name=model_name or name, serve=serve)


def _serve_config(data: Any) -> ServeConfig:
    try:
        return ServeConfig.from_dict(data or {}, "serve")
    except ValueError as e:
        raise ConfigError(str(e)) from None
