"""The training loss of each task, in one place (train and its tests call ``compute_loss``).

- classification: cross-entropy over logits (optional label smoothing).
- regression: mean squared error over all targets.
- vae: the negative ELBO, per sample then averaged over the batch:
  reconstruction = sum over input elements of squared error (a unit-variance Gaussian likelihood,
  dropping constants; MSE rather than BCE because inputs are normalized, not in [0, 1]) plus
  ``kl_weight`` x KL(q(z|x) || N(0, I)) summed over latent dimensions. For a VAE, ``targets`` is
  the input batch itself.
"""

from __future__ import annotations

from typing import Any


def compute_loss(task: str, outputs: Any, targets, *, label_smoothing: float = 0.0,
                 kl_weight: float = 1.0, sync: bool = True):
    """-> (scalar loss tensor to backpropagate, dict of float parts for logging).

    ``sync=False`` gives the parts as detached 0-d tensors instead of floats: reading a float is a
    host-device synchronization, which the train loop avoids per step (it sums parts on the device).
    """
    import torch.nn.functional as F

    part = (lambda t: t.item()) if sync else (lambda t: t.detach())
    if task == "classification":
        loss = F.cross_entropy(outputs, targets, label_smoothing=label_smoothing)
        return loss, {"cross_entropy": part(loss)}
    if task == "regression":
        if outputs.shape != targets.shape:
            raise ValueError(f"regression outputs have shape {tuple(outputs.shape)} but targets "
                             f"{tuple(targets.shape)}; targets must be (N, T) float")
        loss = F.mse_loss(outputs, targets)
        return loss, {"mse": part(loss)}
    if task == "vae":
        reconstruction, mu, logvar = outputs
        n = targets.shape[0]
        rec = F.mse_loss(reconstruction, targets, reduction="sum") / n
        kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum()) / n
        loss = rec + kl_weight * kl
        return loss, {"reconstruction": part(rec), "kl": part(kl), "neg_elbo": part(rec + kl)}
    raise ValueError(f"unknown task {task!r}; expected classification, regression or vae")
