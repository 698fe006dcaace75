"""One ``predict(array) -> array`` interface over PyTorch and ONNX Runtime.

Evaluate, quantize, benchmark and serve share these, so every number compares like with like.
``OrtPredictor`` records the execution providers the session actually got: ONNX Runtime falls back
to CPU silently when CUDA libraries are missing, so we check ``get_providers()`` and say so.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

log = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]
CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"


def cuda_available() -> bool:
    """True when a CUDA GPU is usable. Importing torch first also loads the CUDA/cuDNN libraries
    that onnxruntime-gpu needs (they ship inside torch's CUDA wheels)."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def torch_device(device: Device) -> str:
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device == "cuda" and not cuda_available():
        from stages.common import StageError

        raise StageError("device 'cuda' was requested but torch sees no CUDA GPU; use --device cpu or auto")
    return device


def ort_providers(device: Device) -> list[str]:
    """Providers to request: CUDA (with CPU behind it) when asked for or available, else CPU."""
    import onnxruntime as ort

    if device == "cpu":
        return [CPU_EP]
    has_cuda_ep = CUDA_EP in ort.get_available_providers()
    if device == "cuda":
        return [CUDA_EP, CPU_EP]
    # auto: onnxruntime-gpu lists the CUDA EP even on machines without a GPU; ask torch too.
    return [CUDA_EP, CPU_EP] if has_cuda_ep and cuda_available() else [CPU_EP]


# ORT's CUDA EP runs an exhaustive cuDNN algorithm search for every new input shape (its default). A
# server whose batcher merges requests into batches of any size meets many shapes: on an H100 that
# made serving at concurrency 8 fall to 96 req/s at p50 86 ms while c=1 did 1,470 req/s. The
# heuristic choice costs nothing per shape; set here so benchmark and server run the same way.
CUDA_PROVIDER_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC"}


def provider_options(providers: Sequence[str]) -> list[dict]:
    """Per-provider options, in the order of ``providers`` (ONNX Runtime's provider_options)."""
    return [dict(CUDA_PROVIDER_OPTIONS) if p == CUDA_EP else {} for p in providers]


def default_intra_op_threads() -> int:
    # ORT's default spins one thread per core; on a 2-core box that starves the HTTP server and
    # the benchmark harness. Leave a core free on small machines.
    cores = os.cpu_count() or 1
    return max(1, cores - 1) if cores <= 4 else min(cores, 8)


class OrtPredictor:
    """An ONNX Runtime session over one .onnx file."""

    def __init__(self, path: Path | str, device: Device = "auto", intra_op_threads: int = 0,
                 providers: Sequence[str] | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        self.requested_providers = list(providers) if providers else ort_providers(device)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads or default_intra_op_threads()
        opts.log_severity_level = 3  # errors only: the provider fallback is reported below, plainly
        self.session = ort.InferenceSession(str(self.path), opts, providers=self.requested_providers,
                                            provider_options=provider_options(self.requested_providers))
        self.providers = self.session.get_providers()
        self.provider = self.providers[0]
        if CUDA_EP in self.requested_providers and CUDA_EP not in self.providers:
            log.warning("CUDA was requested for %s but ONNX Runtime is running on %s "
                        "(CUDA/cuDNN libraries not found); numbers below are CPU numbers",
                        self.path.name, self.provider)
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


def predict_batched(predictor, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    return np.concatenate([predictor.predict(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
