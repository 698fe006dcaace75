"""Models the pipeline did not define: the user's own factory, and torchvision's or timm's image models by name.

``family: custom`` builds ``model.factory`` (``package.module:function``) with ``model.kwargs`` from the
recipe, plus the dataset's facts that the function names as parameters (``FACTS``): the pipeline then
trains, checkpoints, exports and serves the module it returns like any built-in family. A checkpoint
records the factory and its keyword arguments, so rebuilding it imports the factory's module again:
loading a checkpoint of a custom model runs that (the user's own) code.

``family: torchvision`` / ``family: timm`` build an architecture by name (``model.arch``) with random
weights: ``weights=None`` / ``pretrained=False``, so nothing is downloaded; the input channels and the
number of classes come from the dataset (torchvision's first convolution is rebuilt for inputs that are
not RGB; timm takes ``in_chans``). Both packages are optional and imported only when used.

Everything that can go wrong with a factory is one ``FactoryError`` naming it and what to fix.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

# Facts about the dataset a factory may take, by parameter name (only those its signature names; a
# ``**kwargs`` catch-all receives none of them):
FACTS = {
    "input_shape": "one sample's shape without the batch axis, e.g. (1, 8, 8)",
    "in_channels": "channels of an image or signal (input_shape[0]); absent for feature vectors",
    "in_features": "values per sample: the product of input_shape",
    "image_size": "(height, width) of an image input",
    "num_outputs": "classes (classification) or targets (regression): the width of the output",
    "num_classes": "classes (classification runs only)",
    "num_targets": "regression targets (regression runs only)",
    "task": "classification or regression",
}
TASKS = ("classification", "regression")


class FactoryError(ValueError):
    """A model factory that cannot give a usable model; the message names the factory and the fix."""


# ---------------------------------------------------------------- configs

def _check_kwargs(kwargs: Any) -> None:
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ValueError(f"`kwargs` must be a mapping of argument names to values, got {kwargs!r}")
    clash = sorted(set(kwargs) & set(FACTS))
    if clash:
        raise ValueError(f"`kwargs` must not set {', '.join(clash)}: the pipeline passes "
                         f"{'it' if len(clash) == 1 else 'them'} from the dataset; remove {'it' if len(clash) == 1 else 'them'}")


@dataclass(frozen=True)
class Config:
    factory: str = ""  # package.module:function returning an nn.Module, importable from the current directory
    kwargs: dict = field(default_factory=dict)  # keyword arguments for the factory

    def __post_init__(self) -> None:
        module, sep, function = self.factory.partition(":")
        if not sep or not module or not function.isidentifier() or not all(p.isidentifier() for p in module.split(".")):
            raise ValueError(f"`factory` must be `package.module:function`, e.g. examples.custom_model.resnet:build; "
                             f"got {self.factory!r}")
        _check_kwargs(self.kwargs)


@dataclass(frozen=True)
class ArchConfig:
    arch: str = ""  # the architecture's name in the library, e.g. resnet18
    kwargs: dict = field(default_factory=dict)  # more keyword arguments for the library's constructor

    def __post_init__(self) -> None:
        if not self.arch:
            raise ValueError("`arch` is required: the architecture's name, e.g. resnet18")
        _check_kwargs(self.kwargs)


# ---------------------------------------------------------------- the user's factory

def module_name(factory: str) -> str:
    return factory.partition(":")[0]


def importable_here() -> None:
    """Factories import as under ``python -m``, from the current directory: the ``pipeline`` script's
    own directory is on sys.path, the working directory is not."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())


def resolve(factory: str) -> Callable[..., Any]:
    """The function ``factory`` names, imported; a FactoryError says why it cannot be."""
    importable_here()
    name, _, attr = factory.partition(":")
    where = f"model.factory `{factory}`"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        raise FactoryError(f"{where}: module `{name}` does not import ({e}); make it importable from the "
                           "directory you run in (or install its package)") from None
    except Exception as e:  # the module's own code failed while importing
        raise FactoryError(f"{where}: importing `{name}` failed ({type(e).__name__}: {e})") from None
    fn = getattr(module, attr, None)
    if fn is None:
        public = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                        and getattr(v, "__module__", None) == module.__name__)
        raise FactoryError(f"{where}: `{name}` has no `{attr}`; its functions: {', '.join(public) or 'none'}")
    if not callable(fn):
        raise FactoryError(f"{where}: `{attr}` is a {type(fn).__name__}, not a function")
    return fn


def facts(input_shape: tuple[int, ...], num_outputs: int, task: str) -> dict[str, Any]:
    """The dataset's facts for a factory (see FACTS)."""
    out: dict[str, Any] = {"input_shape": tuple(input_shape), "in_features": math.prod(input_shape),
                           "num_outputs": int(num_outputs), "task": task}
    if len(input_shape) >= 2:
        out["in_channels"] = int(input_shape[0])
    if len(input_shape) == 3:
        out["image_size"] = tuple(input_shape[1:])
    out["num_classes" if task == "classification" else "num_targets"] = int(num_outputs)
    return out


def call_factory(fn: Callable[..., Any], where: str, kwargs: dict, available: dict[str, Any]) -> nn.Module:
    """Call ``fn`` with the recipe's ``kwargs`` plus the facts it names; check it returns an nn.Module."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or C function without a signature: give it the recipe's only
        params = {}
    named = {k for k, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    args = {**{k: v for k, v in available.items() if k in named}, **kwargs}
    if params:
        try:
            inspect.signature(fn).bind(**args)
        except TypeError as e:
            missing = [k for k, p in params.items() if p.default is p.empty and k not in args
                       and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            unusable = [k for k in missing if k in FACTS]
            if unusable:
                hint = (f"it needs {', '.join(unusable)}, which this {available['task']} dataset does not give "
                        f"(it gives {', '.join(sorted(available))})")
            elif missing:
                hint = f"add {', '.join(missing)} under model.kwargs"
            else:
                hint = f"its parameters are ({', '.join(params)}); fix model.kwargs"
            raise FactoryError(f"{where}: cannot be called with {sorted(args)} ({e}): {hint}") from None
    try:
        model = fn(**args)
    except Exception as e:
        raise FactoryError(f"{where}: raised {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise FactoryError(f"{where}: returned {type(model).__name__}, not a torch.nn.Module; return the model itself")
    return model


def build(config: Config, input_shape: tuple[int, ...], num_outputs: int, task: str = "classification") -> nn.Module:
    fn = resolve(config.factory)
    return call_factory(fn, f"model.factory `{config.factory}`", dict(config.kwargs),
                        facts(input_shape, num_outputs, task))


# ---------------------------------------------------------------- torchvision and timm by name

def _import_optional(name: str, arch: str) -> Any:
    import torch

    try:
        return importlib.import_module(name)
    except Exception as e:  # ImportError, or torchvision's RuntimeError beside a torch it was not built for
        raise FactoryError(
            f"model.family {name} (arch `{arch}`) needs the {name} package, which does not import here "
            f"({type(e).__name__}: {str(e)[:160]}); install the {name} release built for torch "
            f"{torch.__version__.split('+')[0]} (torchvision's must match torch's exactly), or write a factory "
            "for `family: custom`") from None


def _unknown_arch(library: str, arch: str, names: list[str]) -> FactoryError:
    close = difflib.get_close_matches(arch, names, n=5)
    return FactoryError(f"model.arch `{arch}` is not a {library} model{'; did you mean ' + ', '.join(close) if close else ''}"
                        f" ({len(names)} names: `{library}` lists them)")


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    return None


def _set_in_channels(model: nn.Module, channels: int, arch: str) -> None:
    """torchvision's image models take RGB: rebuild the first convolution for ``channels`` inputs
    (same kernel, stride and padding, fresh weights)."""
    found = _first_conv(model)
    if found is None or found[1].in_channels == channels:
        return
    name, conv = found
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode))


def build_torchvision(config: ArchConfig, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    if len(input_shape) != 3:
        raise FactoryError(f"torchvision `{config.arch}` needs (C, H, W) images, got inputs of shape {input_shape}")
    tv_models = _import_optional("torchvision", config.arch).models
    names = tv_models.list_models(module=tv_models)  # classification models only (not detection, video)
    if config.arch not in names:
        raise _unknown_arch("torchvision.models", config.arch, names)
    kwargs = dict(config.kwargs)
    if config.arch.startswith("vit_") and input_shape[1] == input_shape[2]:
        kwargs.setdefault("image_size", int(input_shape[1]))  # its position embeddings are sized for the input
    try:  # weights=None: random initialization, nothing is downloaded
        model = tv_models.get_model(config.arch, weights=None, num_classes=int(num_outputs), **kwargs)
    except Exception as e:
        raise FactoryError(f"torchvision `{config.arch}` cannot be built with {config.kwargs} ({type(e).__name__}: {e})") from None
    _set_in_channels(model, int(input_shape[0]), config.arch)
    return model


def build_timm(config: ArchConfig, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    if len(input_shape) != 3:
        raise FactoryError(f"timm `{config.arch}` needs (C, H, W) images, got inputs of shape {input_shape}")
    timm = _import_optional("timm", config.arch)
    if not timm.is_model(config.arch):
        raise _unknown_arch("timm", config.arch, timm.list_models())
    args = dict(num_classes=int(num_outputs), in_chans=int(input_shape[0]), **config.kwargs)
    try:  # pretrained=False: random initialization, nothing is downloaded
        try:  # vision transformers size their position embeddings by img_size; convnets take no such argument
            return timm.create_model(config.arch, pretrained=False, **{"img_size": tuple(input_shape[1:]), **args})
        except TypeError as e:
            if "img_size" not in str(e):
                raise
            return timm.create_model(config.arch, pretrained=False, **args)
    except Exception as e:
        raise FactoryError(f"timm `{config.arch}` cannot be built with {config.kwargs} ({type(e).__name__}: {e})") from None
