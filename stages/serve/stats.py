"""Triton's statistics extension: per model version, counts and cumulative nanoseconds of its requests.

One ``ModelStats`` per served model version, shared by both transports (HTTP ``/v2/models/.../stats``,
gRPC ``ModelStatistics``) and by the batcher, which alone knows how long a request queued and how long
its batch ran. ``to_dict`` is Triton's document (``model_stats[i]``), which the HTTP route writes as
JSON and the gRPC transport parses into ``inference.ModelStatistics``; Triton's clients and
``perf_analyzer`` read it unchanged.

What each field counts here (Triton's meanings, mapped onto this server):

- ``success`` / ``fail``: requests answered, and their time in the server from the body read (HTTP) or
  the message received (gRPC) to the answer encoded, in ns,
- ``queue``: time in the batcher's queue, until the request's batch started,
- ``compute_input``: decoding the request and checking it against the model,
- ``compute_infer``: the session run of the (merged) batch the request was in,
- ``compute_output``: encoding the answer,
- ``inference_count``: rows (samples) inferred, ``execution_count``: session runs (batches),
- ``batch_stats``: per batch size the session ran, how many runs and their cumulative compute time.

``queue`` and ``compute_*`` count successful requests only, as Triton's do. Counters are exact (a lock
per model; the batcher thread and the event loop both write). With several worker processes, each
process counts what it served.
"""

from __future__ import annotations

import threading
import time


class Timing:
    """What the batcher measured for one request (seconds), handed back through ``Batcher.infer``."""

    __slots__ = ("queue_s", "compute_s")

    def __init__(self) -> None:
        self.queue_s = 0.0
        self.compute_s = 0.0


def _duration(count: int = 0, ns: int = 0) -> dict:
    return {"count": count, "ns": ns}


class ModelStats:
    """Cumulative statistics of one served model version."""

    def __init__(self, name: str, version: str):
        self.name, self.version = name, version
        self._lock = threading.Lock()
        self.success = [0, 0]  # [count, ns]
        self.fail = [0, 0]
        self.queue = [0, 0]
        self.compute_input = [0, 0]
        self.compute_infer = [0, 0]
        self.compute_output = [0, 0]
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self.batches: dict[int, list[int]] = {}  # rows -> [runs, compute ns]

    def succeeded(self, total_ns: int, rows: int, input_ns: int, timing: Timing, output_ns: int) -> None:
        """One request answered: its total time and the parts of it."""
        queue_ns, infer_ns = int(timing.queue_s * 1e9), int(timing.compute_s * 1e9)
        with self._lock:
            for counter, ns in ((self.success, total_ns), (self.queue, queue_ns), (self.compute_input, input_ns),
                                (self.compute_infer, infer_ns), (self.compute_output, output_ns)):
                counter[0] += 1
                counter[1] += ns
            self.inference_count += rows
            self.last_inference_ms = int(time.time() * 1000)

    def failed(self, total_ns: int) -> None:
        """One request refused or failed (any 4xx/5xx once the model was found)."""
        with self._lock:
            self.fail[0] += 1
            self.fail[1] += total_ns
            self.last_inference_ms = int(time.time() * 1000)

    def executed(self, rows: int, compute_s: float) -> None:
        """The batcher ran the session once on ``rows`` rows (a merged batch or a lone request)."""
        with self._lock:
            self.execution_count += 1
            entry = self.batches.setdefault(rows, [0, 0])
            entry[0] += 1
            entry[1] += int(compute_s * 1e9)

    def to_dict(self) -> dict:
        """Triton's ``ModelStatistics`` document (JSON numbers, as Triton's HTTP endpoint writes them)."""
        with self._lock:
            return {
                "name": self.name,
                "version": self.version,
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {
                    "success": _duration(*self.success), "fail": _duration(*self.fail),
                    "queue": _duration(*self.queue), "compute_input": _duration(*self.compute_input),
                    "compute_infer": _duration(*self.compute_infer),
                    "compute_output": _duration(*self.compute_output),
                    "cache_hit": _duration(), "cache_miss": _duration(),  # no response cache here
                },
                # Per run, the batch's whole time is compute_infer (concatenation and split included).
                "batch_stats": [{"batch_size": rows, "compute_input": _duration(runs, 0),
                                 "compute_infer": _duration(runs, ns), "compute_output": _duration(runs, 0)}
                                for rows, (runs, ns) in sorted(self.batches.items())],
                "memory_usage": [],
            }
