"""Prometheus metrics of the server, served at ``/metrics``.

One registry per server (tests run several servers in one process), every series labelled by
model, version and execution provider:

- ``onnx_pipeline_inference_requests_total{outcome="success"|"failure"|"rejected"}``: infer requests
  answered (failure: any 4xx/5xx for a served model except rejected: refused with 503 because the
  batcher's queue was full, ``serve.batching.max_queue_size``; unknown model names are not counted,
  to keep the label set bounded),
- ``onnx_pipeline_request_duration_seconds``: from the body read to the response written,
- ``onnx_pipeline_queue_duration_seconds``: from entering the batcher's queue to its batch starting,
- ``onnx_pipeline_compute_duration_seconds``: one session run of a (merged) batch,
- ``onnx_pipeline_batch_size``: rows per session run; above a request's own rows it proves merging.

Children are bound once per model, so a request costs a few lock-protected additions.

Several worker processes (``stages.serve.workers``) share one ``/metrics``: the supervisor sets
``PROMETHEUS_MULTIPROC_DIR`` for them (before prometheus-client is imported there), every process
writes its values into its own memory-mapped files in that directory, and whichever worker answers
``/metrics`` sums all of them (prometheus-client's multiprocess mode; a restarted worker's old files
stay, so counters never go backwards).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LABELS = ("model", "version", "provider")
# Seconds: 50 us .. 10 s, dense where a small model on CPU lives (sub-millisecond to tens of ms).
LATENCY_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CONTENT_TYPE = CONTENT_TYPE_LATEST
MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's own name for it


@dataclass(frozen=True)
class ModelMetrics:
    """The series of one served model, already bound to its labels."""

    success: object
    failure: object
    rejected: object
    request_seconds: object
    queue_seconds: object
    compute_seconds: object
    batch_size: object


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("onnx_pipeline_inference_requests", "Infer requests answered, by outcome.",
                                (*LABELS, "outcome"), registry=self.registry)
        self.request_seconds = Histogram("onnx_pipeline_request_duration_seconds",
                                         "Infer request time in the server, body read to response written.",
                                         LABELS, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_seconds = Histogram("onnx_pipeline_queue_duration_seconds",
                                       "Time a request waited in the batcher's queue.",
                                       LABELS, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.compute_seconds = Histogram("onnx_pipeline_compute_duration_seconds",
                                         "ONNX Runtime time per (merged) batch.",
                                         LABELS, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("onnx_pipeline_batch_size", "Rows per ONNX Runtime run (merged batch size).",
                                    LABELS, buckets=BATCH_BUCKETS, registry=self.registry)

    def for_model(self, model: str, version: str, provider: str) -> ModelMetrics:
        labels = (model, version, provider)
        return ModelMetrics(
            success=self.requests.labels(*labels, "success"),
            failure=self.requests.labels(*labels, "failure"),
            rejected=self.requests.labels(*labels, "rejected"),
            request_seconds=self.request_seconds.labels(*labels),
            queue_seconds=self.queue_seconds.labels(*labels),
            compute_seconds=self.compute_seconds.labels(*labels),
            batch_size=self.batch_size.labels(*labels),
        )

    def render(self) -> bytes:
        """The exposition text: this server's registry, or with several workers every worker's values summed."""
        if MULTIPROCESS_DIR_ENV in os.environ:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
