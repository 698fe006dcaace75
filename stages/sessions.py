"""ONNX Runtime sessions: one frozen ``SessionSettings`` record and one ``create_session`` factory.

Every ONNX Runtime session the project runs is built here: the predictors (evaluate, quantize,
benchmark, register) and the server. So "measured with the settings the server uses" means the
same providers, provider options, threads and spinning, not a second copy that differs a little.

Importing this module is cheap (no onnxruntime, no torch, no numpy): the slim serve path imports it.
onnxruntime is imported when a session is made; torch never (a GPU is found through the CUDA driver).

Providers: CUDA (with CPU behind it) when asked for or, with ``device: auto``, when a GPU is usable;
CPU otherwise. ONNX Runtime falls back to CPU silently when the CUDA libraries are missing, so
``create_session`` compares what it asked for with ``get_providers()`` and warns.

Threads: the defaults leave a core free on small machines (the server's event loop, the benchmark
harness) and do not spin-wait there: ORT's spinning intra-op workers take that core (on 2 cores ORT's
defaults made `mlflow models serve` burn 1.8 cores at concurrency 1).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Sequence, get_args

log = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]
CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"
AUTO = "auto"

# ORT's CUDA EP runs an exhaustive cuDNN algorithm search for every new input shape (its default). A
# server whose batcher merges requests into batches of any size meets many shapes: on an H100 that
# made serving at concurrency 8 fall to 96 req/s at p50 86 ms while c=1 did 1,470 req/s. The
# heuristic choice costs nothing per shape; set here so benchmark, register and server run the same way.
CUDA_PROVIDER_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC"}
SMALL_MACHINE_CORES = 4  # at or below this many cores: leave one free, and do not spin-wait


def cuda_devices() -> int:
    """CUDA GPUs the driver shows this process (CUDA_VISIBLE_DEVICES applies), asked through the
    driver library itself (libcuda, with ctypes): no torch, so a slim serving install can tell too.
    0 when there is no driver or no device."""
    import ctypes
    import ctypes.util

    for name in ("libcuda.so.1", "libcuda.so", ctypes.util.find_library("cuda"), "nvcuda.dll"):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    return 0


def cuda_available() -> bool:
    """True when a CUDA GPU is usable: the driver shows one (``cuda_devices``). Never imports torch
    (the serving path must not), so onnxruntime-gpu's CUDA/cuDNN libraries are preloaded by
    ``create_session`` instead (``onnxruntime.preload_dlls``: from torch's or the nvidia-* wheels)."""
    return cuda_devices() > 0


def cuda_problem() -> str | None:
    """Why the CUDA provider cannot be used here, or None when it can (as far as we can tell before a session)."""
    import onnxruntime as ort

    if CUDA_EP not in ort.get_available_providers():
        return (f"this onnxruntime build ({ort.__version__}) has no CUDA execution provider; "
                "install onnxruntime-gpu (never beside onnxruntime)")
    if not cuda_available():
        return ("no CUDA GPU is visible (the CUDA driver, libcuda, shows none: no GPU, no driver, or "
                "CUDA_VISIBLE_DEVICES hides it)")
    return None


def ort_providers(device: Device) -> list[str]:
    """Providers to request: CUDA (with CPU behind it) when asked for or available, else CPU."""
    import onnxruntime as ort

    if device == "cpu":
        return [CPU_EP]
    if device == "cuda":
        return [CUDA_EP, CPU_EP]
    # auto: onnxruntime-gpu lists the CUDA EP even on machines without a GPU; ask torch too.
    return [CUDA_EP, CPU_EP] if CUDA_EP in ort.get_available_providers() and cuda_available() else [CPU_EP]


def provider_options(providers: Sequence[str]) -> list[dict]:
    """Per-provider options, in the order of ``providers`` (ONNX Runtime's provider_options)."""
    return [dict(CUDA_PROVIDER_OPTIONS) if p == CUDA_EP else {} for p in providers]


def cpu_cores() -> int:
    """Cores this process may run on: its CPU affinity where the OS tells it (a container or
    ``taskset`` limits it), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # macOS has no sched_getaffinity
        return os.cpu_count() or 1


def default_intra_op_threads(cores: int | None = None) -> int:
    """cores - 1 on small machines (a core stays free for the event loop or the harness), at most 8
    elsewhere (a small model gains nothing from more)."""
    cores = cores or cpu_cores()
    return max(1, cores - 1) if cores <= SMALL_MACHINE_CORES else min(cores - 1, 8)


def default_allow_spinning(cores: int | None = None) -> bool:
    """Spin-waiting intra-op workers take the core the event loop needs on small machines: off there,
    ONNX Runtime's default (on) elsewhere."""
    cores = cores or cpu_cores()
    return cores > SMALL_MACHINE_CORES


def _bad(key: str, rule: str, value: Any) -> ValueError:
    return ValueError(f"`{key}` must be {rule}, got {value!r}")


@dataclass(frozen=True)
class SessionSettings:
    """How one ONNX Runtime session is built. ``0`` / ``"auto"`` mean "chosen for this machine"
    (``resolved()`` says what was chosen)."""

    device: Device = "auto"  # auto: CUDA when onnxruntime has it and a GPU is visible, else CPU
    intra_op_threads: int = 0  # threads one run may use; 0: default_intra_op_threads()
    # Threads running independent graph branches at once; only used in ORT's parallel execution mode,
    # which we never enable (a small classifier has no parallel branches worth a pool).
    inter_op_threads: int = 1
    allow_spinning: bool | Literal["auto"] = AUTO  # intra-op workers spin-wait between runs; auto: default_allow_spinning()

    def __post_init__(self) -> None:
        if self.device not in get_args(Device):
            raise _bad("device", f"one of {', '.join(get_args(Device))}", self.device)
        for key in ("intra_op_threads", "inter_op_threads"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise _bad(key, "an integer >= 0 (0: chosen for this machine)", v)
        if not isinstance(self.allow_spinning, bool) and self.allow_spinning != AUTO:
            raise _bad("allow_spinning", "true, false or auto", self.allow_spinning)

    def resolved(self) -> "SessionSettings":
        """The same settings with every automatic choice made for this machine (the device stays as
        asked: which provider a session really got is read back from the session)."""
        return SessionSettings(
            device=self.device,
            intra_op_threads=self.intra_op_threads or default_intra_op_threads(),
            inter_op_threads=self.inter_op_threads,
            allow_spinning=default_allow_spinning() if self.allow_spinning == AUTO else self.allow_spinning)

    def divided(self, workers: int, cores: int | None = None) -> "SessionSettings":
        """The settings of one of ``workers`` server processes sharing this machine's cores: the
        automatic choices made for its share (cores // workers, at least one), so that
        workers x intra-op threads <= cores. An explicit thread count that breaks that is refused
        (ValueError naming the fix), never quietly lowered."""
        cores = cores or cpu_cores()
        share = max(1, cores // max(1, workers))
        if self.intra_op_threads and workers * self.intra_op_threads > cores:
            raise ValueError(f"`intra_op_threads` is {self.intra_op_threads} per worker: {workers} workers x "
                             f"{self.intra_op_threads} threads exceed the {cores} cores; set it to at most "
                             f"{max(1, cores // workers)} or 0 (chosen per worker), or run fewer workers")
        return SessionSettings(
            device=self.device,
            intra_op_threads=self.intra_op_threads or default_intra_op_threads(share),
            inter_op_threads=self.inter_op_threads,
            allow_spinning=default_allow_spinning(share) if self.allow_spinning == AUTO else self.allow_spinning)

    def describe(self) -> dict[str, Any]:
        """What a report writes beside its numbers: the resolved values."""
        return asdict(self.resolved())

    def providers(self) -> list[str]:
        """The providers a session with these settings asks for, in order of preference."""
        return ort_providers(self.device)

    def session_options(self):
        """ONNX Runtime's SessionOptions for these settings."""
        import onnxruntime as ort

        r = self.resolved()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = r.intra_op_threads
        opts.inter_op_num_threads = r.inter_op_threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if r.allow_spinning else "0")
        opts.log_severity_level = 3  # errors only: a provider fallback is reported by create_session, plainly
        return opts


def create_session(path: Path | str, settings: SessionSettings = SessionSettings()):
    """An ``onnxruntime.InferenceSession`` over ``path`` built with ``settings``.

    ``session.get_providers()`` says which providers it really runs on; when CUDA was asked for and
    ONNX Runtime fell back to CPU (CUDA/cuDNN libraries not found), a warning says so. A file ONNX
    Runtime cannot load (truncated, corrupt, not ONNX, an invalid graph) is one ``stages.common.BadFile``
    naming it, so every command that opens a model answers it in one line (a missing one, a StageError).
    """
    import onnxruntime as ort

    from stages.common import BadFile, StageError, one_line  # imported here: importing this module stays cheap

    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path} not found")
    providers = settings.providers()
    if CUDA_EP in providers and "torch" not in sys.modules and hasattr(ort, "preload_dlls"):
        # Without torch imported first (the slim serving path), load CUDA/cuDNN from the nvidia-* wheels
        # or the system, as importing torch used to; a missing library shows as the fallback warned about below.
        try:
            ort.preload_dlls()
        except Exception as e:  # pragma: no cover - depends on the CUDA install
            log.debug("onnxruntime.preload_dlls failed: %s", e)
    try:
        session = ort.InferenceSession(str(path), settings.session_options(), providers=providers,
                                       provider_options=provider_options(providers))
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:
        if type(e).__name__ == "EPFail":  # a provider that would not start: not the file's fault
            raise
        why = one_line(str(e), 300).replace(f"Load model from {path} failed:", "")
        raise BadFile(path, f"is not a valid ONNX model that ONNX Runtime can load ({type(e).__name__}: {why}): it "
                      "is truncated, corrupt or not ONNX", "replace it with a complete copy (re-export it)") from None
    if CUDA_EP in providers and CUDA_EP not in session.get_providers():
        log.warning("CUDA was requested for %s but ONNX Runtime runs it on %s (%s); what it measures or serves "
                    "is CPU work", path.name, session.get_providers()[0],
                    cuda_problem() or "the CUDA provider did not start: CUDA/cuDNN libraries not found?")
    return session
