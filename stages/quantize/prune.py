"""Structured channel pruning of the PyTorch model: L1-norm filter pruning, a short fine-tune, re-export.

For a model whose forward pass is a plain chain of layers (what ``torch.fx`` traces to a line: the
cnn, cnn1d and mlp families), every Conv1d/Conv2d/Linear that feeds another such layer through only
per-channel operations (BatchNorm, activations, pooling, dropout, flatten) loses the ``prune_ratio``
share of its output channels with the smallest L1 norm. The channels are removed physically: the
layer, its BatchNorm and the next layer's matching input columns are rebuilt smaller, so the ONNX file
really has fewer parameters and multiply-adds. The last layer (the model's outputs) is never pruned.
Models with branches (residuals, attention, recurrences) are not a chain and are "not applicable".
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stages.losses import compute_loss

if TYPE_CHECKING:
    from stages.quantize.variants import Context

log = logging.getLogger(__name__)


def _kinds():
    from torch import nn

    prunable = (nn.Conv1d, nn.Conv2d, nn.Linear)
    norms = (nn.BatchNorm1d, nn.BatchNorm2d)
    per_channel = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Hardswish,
                   nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d,
                   nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
    return prunable, norms, per_channel, (nn.Flatten,)


@dataclass
class Cut:
    """One pruned layer: its name, the norm after it, the consumer and the channels kept."""

    layer: str
    norm: str | None
    consumer: str
    keep: list[int]
    before: int
    features_per_channel: int  # consumer inputs per pruned channel (>1 when a Flatten keeps spatial positions)


def chain(model) -> list[tuple[str, object]]:
    """The model's modules in execution order, if its forward is one straight line; else raises ValueError."""
    import torch.fx

    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception as e:
        raise ValueError(f"torch.fx cannot trace the model ({type(e).__name__})") from None
    modules = dict(traced.named_modules())
    order: list[tuple[str, object]] = []
    for node in traced.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if len(node.users) > 1 or len([a for a in node.all_input_nodes]) != 1:
            raise ValueError(f"the forward pass branches at `{node.name}` (not a plain chain of layers)")
        if node.op != "call_module":
            raise ValueError(f"the forward pass calls `{node.target}` outside a module (not a plain chain of layers)")
        order.append((str(node.target), modules[str(node.target)]))
    return order


def plan(model, ratio: float) -> list[Cut]:
    """Which channels each prunable layer keeps (highest L1 norm), without changing the model."""
    from torch import nn

    prunable, norms, per_channel, flatten = _kinds()
    order = chain(model)
    cuts: list[Cut] = []
    for i, (name, mod) in enumerate(order):
        if not isinstance(mod, prunable) or (isinstance(mod, (nn.Conv1d, nn.Conv2d)) and mod.groups != 1):
            continue
        norm, consumer = None, None
        for nxt_name, nxt in order[i + 1:]:
            if isinstance(nxt, norms) and norm is None:
                norm = nxt_name
            elif isinstance(nxt, prunable):
                consumer = (nxt_name, nxt)
                break
            elif not isinstance(nxt, per_channel + flatten):
                break
        if consumer is None:
            continue  # the model's output layer, or something we cannot see through
        out = mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels
        c_mod = consumer[1]
        c_in = c_mod.in_features if isinstance(c_mod, nn.Linear) else c_mod.in_channels
        if (isinstance(c_mod, (nn.Conv1d, nn.Conv2d)) and c_mod.groups != 1) or c_in % out:
            continue
        n_keep = max(1, math.ceil(out * (1.0 - ratio)))
        if n_keep >= out:
            continue
        w = mod.weight.detach().abs().reshape(out, -1).sum(dim=1)
        keep = sorted(int(k) for k in w.argsort(descending=True)[:n_keep])
        cuts.append(Cut(name, norm, consumer[0], keep, out, c_in // out))
    return cuts


def why_not(model, ratio: float) -> str | None:
    try:
        cuts = plan(model, ratio)
    except ValueError as e:
        return f"structured pruning needs a plain chain of layers: {e}"
    if not cuts:
        return f"no Conv/Linear layer feeds another one through per-channel ops, or prune_ratio {ratio} removes nothing"
    return None


def _set(model, name: str, module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def apply(model, cuts: list[Cut]):
    """A copy of ``model`` with the planned channels physically removed."""
    import torch
    from torch import nn

    model = copy.deepcopy(model)
    for cut in cuts:
        keep = torch.tensor(cut.keep)
        mod = model.get_submodule(cut.layer)
        if isinstance(mod, nn.Linear):
            new = nn.Linear(mod.in_features, len(cut.keep), bias=mod.bias is not None)
        else:
            cls = type(mod)
            new = cls(mod.in_channels, len(cut.keep), mod.kernel_size, stride=mod.stride, padding=mod.padding,
                      dilation=mod.dilation, groups=1, bias=mod.bias is not None, padding_mode=mod.padding_mode)
        with torch.no_grad():
            new.weight.copy_(mod.weight[keep])
            if mod.bias is not None:
                new.bias.copy_(mod.bias[keep])
        _set(model, cut.layer, new)
        if cut.norm:
            bn = model.get_submodule(cut.norm)
            nb = type(bn)(len(cut.keep), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                          track_running_stats=bn.track_running_stats)
            with torch.no_grad():
                if bn.affine:
                    nb.weight.copy_(bn.weight[keep])
                    nb.bias.copy_(bn.bias[keep])
                if bn.track_running_stats:
                    nb.running_mean.copy_(bn.running_mean[keep])
                    nb.running_var.copy_(bn.running_var[keep])
                    nb.num_batches_tracked.copy_(bn.num_batches_tracked)
            _set(model, cut.norm, nb)
        # The consumer's input columns of the removed channels (each channel may span several inputs
        # after a Flatten that keeps spatial positions: channel c owns inputs c*f .. c*f+f-1).
        cons = model.get_submodule(cut.consumer)
        f = cut.features_per_channel
        cols = torch.tensor([c * f + j for c in cut.keep for j in range(f)])
        if isinstance(cons, nn.Linear):
            nc = nn.Linear(len(cols), cons.out_features, bias=cons.bias is not None)
        else:
            nc = type(cons)(len(cols), cons.out_channels, cons.kernel_size, stride=cons.stride, padding=cons.padding,
                            dilation=cons.dilation, groups=1, bias=cons.bias is not None, padding_mode=cons.padding_mode)
        with torch.no_grad():
            nc.weight.copy_(cons.weight[:, cols])
            if cons.bias is not None:
                nc.bias.copy_(cons.bias)
        _set(model, cut.consumer, nc)
    return model


def fine_tune(model, x: np.ndarray, y: np.ndarray, task: str, epochs: int, lr: float, seed: int = 0) -> list[float]:
    """A few epochs of AdamW on the training split (seeded), with the train stage's loss
    (``stages.losses.compute_loss``, no label smoothing); returns the mean loss per epoch."""
    import torch

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(epochs):
        model.train()
        order, total = torch.randperm(len(xt), generator=gen), 0.0
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            loss, _ = compute_loss(task, model(xt[idx]), yt[idx], sync=False)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / len(order))
    return losses


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def make(src: Path, dst: Path, ctx: "Context") -> dict:
    """Prune the checkpoint's model, fine-tune it, export it with the exporter that made ``src`` and
    validate the file against the pruned PyTorch model (names, shapes, values)."""
    import models
    from stages import checkpoint, conversion
    from stages.onnx_model import ModelMeta

    cfg = ctx.config
    if ctx.task not in ("classification", "regression"):
        raise RuntimeError(f"pruning fine-tunes classification and regression models, not {ctx.task!r}")
    model, meta = checkpoint.load(ctx.checkpoint)
    cuts = plan(model, cfg.prune_ratio)
    pruned = apply(model, cuts)
    x_train, y_train = ctx.data.split("train")
    losses = fine_tune(pruned, x_train, y_train, ctx.task, cfg.prune_finetune_epochs, cfg.prune_lr)
    pruned.eval()

    fp32 = ModelMeta.read(src)
    # The pruned file takes what the fp32 file takes: the same preprocessing (in the graph or not) and
    # the same outputs (a softmax beside the logits), so fp32's metadata stays true of it.
    outputs = tuple(fp32.output_names)
    spec = models.export_spec(meta["model"]["family"], ctx.task)
    spec = dataclasses.replace(spec, input_name=fp32.input.name, output_names=outputs)
    module = conversion.InGraph(pruned, fp32.preprocessing, "probabilities" in outputs,
                                len(meta["model"]["input_shape"]) + 1).eval()
    exporter = fp32.props.get("export.exporter", "dynamo")
    opset = int(fp32.props.get("export.opset", 18))
    x_val = fp32.feed(ctx.data.split("val", normalized=False)[0])[fp32.input.name]
    conversion.export_onnx(module, conversion.torch_example(x_val), dst, spec, opset, exporter)
    problems, report = conversion.validate(dst, module, x_val, spec)
    if problems:
        raise RuntimeError("pruned export does not reproduce the pruned PyTorch model: " + "; ".join(problems))
    layers = {c.layer: f"{c.before}->{len(c.keep)}" for c in cuts}
    log.info("pruned %s: %d -> %d parameters (%s), fine-tuned %d epochs (loss %.4f -> %.4f)", meta["model"]["family"],
             parameters(model), parameters(pruned), ", ".join(f"{k} {v}" for k, v in layers.items()),
             len(losses), losses[0] if losses else float("nan"), losses[-1] if losses else float("nan"))
    return {"prune_ratio": cfg.prune_ratio, "channels": layers, "parameters_before": parameters(model),
            "parameters_after": parameters(pruned), "finetune_epochs": cfg.prune_finetune_epochs,
            "finetune_losses": losses, "exporter": exporter,
            "max_abs_diff_vs_pruned_torch": max((b["max_abs_diff"] for b in report.values()), default=0.0)}
