"""One ``predict(array) -> array`` interface over PyTorch and ONNX Runtime.

Evaluate, quantize, benchmark and serve share these, so every number compares like with like.
``OrtPredictor`` opens its session through ``stages.sessions.create_session`` (the settings the
server uses, unless told otherwise) and records the execution providers the session actually got:
ONNX Runtime falls back to CPU silently when CUDA libraries are missing, and the factory says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

# Sessions are built by the one factory in stages.sessions; its names are re-exported for older imports.
from stages.sessions import (CPU_EP, CUDA_EP, Device, SessionSettings, create_session,  # noqa: F401
                             cuda_available, ort_providers)


def torch_device(device: Device) -> str:
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device == "cuda" and not cuda_available():
        from stages.common import StageError

        raise StageError("device 'cuda' was requested but torch sees no CUDA GPU; use --device cpu or auto")
    return device


class OrtPredictor:
    """An ONNX Runtime session over one .onnx file."""

    def __init__(self, path: Path | str, device: Device = "auto", intra_op_threads: int = 0, *,
                 settings: SessionSettings | None = None):
        """``settings`` (the one session factory's record) wins; ``device`` / ``intra_op_threads`` are
        the shorthand for the common case (everything else automatic)."""
        self.path = Path(path)
        self.settings = settings or SessionSettings(device=device, intra_op_threads=intra_op_threads)
        self.requested_providers = self.settings.providers()
        self.session = create_session(self.path, self.settings)  # warns when CUDA fell back to CPU
        self.providers = self.session.get_providers()
        self.provider = self.providers[0]
        self.inputs = self.session.get_inputs()
        self.outputs = self.session.get_outputs()
        self.input_name = self.inputs[0].name
        self.output_names = [o.name for o in self.outputs]

    @property
    def cuda_fell_back(self) -> bool:
        return CUDA_EP in self.requested_providers and CUDA_EP not in self.providers

    def run(self, feeds: dict[str, np.ndarray], output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        names = list(output_names) if output_names else self.output_names
        return dict(zip(names, self.session.run(names, feeds)))

    @property
    def metadata(self) -> dict[str, str]:
        """The file's ``metadata_props`` (what the input is, labels, lineage, ...)."""
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """First output (the logits) for a batch."""
        return self.session.run(self.output_names[:1], {self.input_name: x})[0]


class IoBindingPredictor:
    """``predict`` through ONNX Runtime's I/O binding: the input is copied to the device once per call
    and the output allocated on the device, then copied back (host in, host out, like ``predict``, so
    the numbers compare). On CUDA this skips the per-run device allocations of ``session.run``."""

    def __init__(self, predictor: OrtPredictor, device: str = "cuda"):
        self.predictor = predictor
        self.provider = predictor.provider
        self.device = device

    def predict(self, x: np.ndarray) -> np.ndarray:
        p = self.predictor
        binding = p.session.io_binding()
        binding.bind_cpu_input(p.input_name, np.ascontiguousarray(x))
        binding.bind_output(p.output_names[0], self.device)
        p.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]  # the copy back synchronizes the device


class TorchPredictor:
    """A PyTorch module in eval mode, fed and answering numpy arrays."""

    def __init__(self, model, device: Device = "cpu"):
        import torch

        self.device = torch_device(device)
        self.model = model.to(self.device).eval()
        self.provider = f"torch-{self.device}"
        self._torch = torch

    def predict(self, x: np.ndarray) -> np.ndarray:
        """First output (logits, predictions, or a VAE's reconstruction) for a batch."""
        return self.outputs(x)[0]

    def outputs(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        """Every output of the model's forward, in order (a VAE: reconstruction, mu, logvar)."""
        torch = self._torch
        with torch.inference_mode():
            out = self.model(torch.from_numpy(np.ascontiguousarray(x)).to(self.device))
        out = out if isinstance(out, (tuple, list)) else (out,)
        return tuple(o.float().cpu().numpy() for o in out)  # .cpu() synchronizes a CUDA stream
