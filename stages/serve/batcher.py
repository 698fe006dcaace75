"""Dynamic batching: requests queued, merged into one session run, split back per request, in order.

One ``Batcher`` per served model owns one worker thread. The HTTP event loop calls
``await batcher.infer(feeds)``: the request's arrays join a FIFO queue (handed to the worker once per
event-loop iteration) and the coroutine waits on an asyncio future; there is no thread-pool hop per
request. The worker takes the oldest request and
merges the requests behind it while they fit:

- same input names, dtypes and per-row shapes (rows are stacked along dim 0),
- at most ``max_batch_size`` rows in all (a single larger request runs alone, never split),
- waiting at most ``max_queue_delay_ms`` after the oldest request arrived for more rows to come.

With the default delay of 0 nothing waits on purpose: whatever queued while the previous batch ran
is merged, so a lone client pays no delay and a crowd is served in large batches (the batch grows
with the load, which is what a closed-loop load at concurrency 32 shows). The worker concatenates,
runs the session once, checks that every output has one row per input row, slices each request its
rows (in queue order) and resolves all the futures of the batch with a single hand-over to the event
loop. One fast path: a lone small request that finds the worker idle (and no delay configured) runs
right on the event loop when the model's warm batch-1 run takes under a millisecond, since two
thread wake-ups would cost more than the inference (this is what concurrency 1 sees). A model without a free batch dim, or a request that merges badly, runs alone. An exception
fails only the requests of its batch; the worker never dies.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from typing import Mapping, Sequence

import numpy as np

from stages.serve.config import BatchSettings

log = logging.getLogger(__name__)

INLINE_MAX_COMPUTE_S = 0.001  # run a lone request on the event loop only if batch 1 takes <= 1 ms warm
INLINE_MAX_ROWS = 4


class _Item:
    __slots__ = ("feeds", "rows", "key", "future", "loop", "enqueued", "timing")

    def __init__(self, feeds, rows, key, future, loop, timing=None):
        self.feeds, self.rows, self.key, self.future, self.loop = feeds, rows, key, future, loop
        self.enqueued = time.perf_counter()
        self.timing = timing  # stats.Timing: this request's queue and compute time, written back


def _resolve(results: list) -> None:
    """Runs on the event loop: hand each waiting request its rows (or its error)."""
    for future, value, error in results:
        if future.done():  # the client went away and the request was cancelled
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)


class Batcher:
    """Queue + worker thread wrapping ``runtime.run`` for one model."""

    def __init__(self, runtime, settings: BatchSettings, metrics=None, stats=None):
        self.runtime = runtime
        self.settings = settings
        self.metrics = metrics
        self.stats = stats  # stats.ModelStats: each session run and its rows (Triton's batch_stats)
        self.merging = settings.enabled and runtime.batchable and settings.max_batch_size > 1
        self._delay_s = settings.max_queue_delay_ms / 1000.0
        # Hand-over to the worker: a C-implemented SimpleQueue of *lists* of requests. The event loop
        # collects the requests of one loop iteration and hands them over in one put (one wake-up
        # of the worker per iteration, not per request: a threading.Condition per request cost the
        # event loop 15% of its time in GIL hand-offs at concurrency 32, measured with py-spy).
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: list[_Item] = []
        self._backlog: collections.deque[_Item] = collections.deque()  # worker-side only
        self._stopping = False
        # Inline fast path (see _flush): only for models whose batch-1 run is short enough not to
        # hold up the event loop. _idle is written by the worker, read by the loop: a stale read only
        # means one request takes the other path (ONNX Runtime sessions may run concurrently).
        self._inline_ok = getattr(runtime, "batch1_seconds", float("inf")) <= INLINE_MAX_COMPUTE_S \
            and settings.max_queue_delay_ms == 0  # a configured delay means: wait for company
        self._idle = True
        self._thread = threading.Thread(target=self._work, name=f"batcher-{runtime.name}-{runtime.version}",
                                        daemon=True)

    def start(self) -> "Batcher":
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued, then end the worker."""
        self._stopping = True
        self._inbox.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    async def infer(self, feeds: Mapping[str, np.ndarray], timing=None) -> dict[str, np.ndarray]:
        """Every model output for these (checked) feeds, rows of this request only. ``timing`` (a
        ``stats.Timing``), when given, gets this request's queue and batch compute seconds."""
        if self._stopping:
            raise RuntimeError("the server is shutting down")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        first = next(iter(feeds.values()))
        rows = first.shape[0] if first.ndim else 1
        key = tuple((name, a.dtype.str, a.shape[1:]) for name, a in sorted(feeds.items()))
        if not self._pending:
            loop.call_soon(self._flush)  # after the other requests of this loop iteration joined
        self._pending.append(_Item(feeds, rows, key, future, loop, timing))
        return await future

    def _flush(self) -> None:
        items, self._pending = self._pending, []
        if len(items) == 1 and self._idle and self._inline_ok and items[0].rows <= INLINE_MAX_ROWS:
            # A lone small request and an idle worker: nothing to merge with, so run it here on the
            # event loop (tens of microseconds for a small model) instead of paying two thread
            # wake-ups, which cost more than the inference itself at concurrency 1.
            try:
                self._execute(items, hand_back=False)
            except Exception as e:
                log.exception("inline inference of %r failed", self.runtime.name)
                _resolve([(items[0].future, None, e)])
            return
        self._idle = False
        self._inbox.put(items)

    # --- the worker thread -----------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._execute(batch)
            except BaseException as e:  # never let the worker die: fail this batch, keep serving
                log.exception("batcher of %r crashed on a batch", self.runtime.name)
                self._hand_back([(it, None, e) for it in batch])

    def _take(self, block: bool, timeout: float | None = None) -> bool:
        """Move what the event loop handed over into the backlog; False on the stop sentinel or timeout."""
        try:
            items = self._inbox.get(block, timeout)
        except queue.Empty:
            return False
        if items is None:
            self._stopping = True
            return False
        self._backlog.extend(items)
        return True

    def _next_batch(self) -> list[_Item] | None:
        s, backlog = self.settings, self._backlog
        while not backlog:
            if self._inbox.empty():
                self._idle = True
            if self._stopping:
                while self._take(False):  # drain anything handed over before the sentinel
                    pass
                if not backlog:
                    return None
                break
            self._take(True)
        self._idle = False
        first = backlog.popleft()
        batch, rows = [first], first.rows
        if not self.merging or rows >= s.max_batch_size:
            return batch
        deadline = first.enqueued + self._delay_s
        while rows < s.max_batch_size:
            if not backlog:
                if self._take(False):
                    continue
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or self._stopping or not self._take(True, remaining):
                    break
                continue
            nxt = backlog[0]
            if nxt.key != first.key or rows + nxt.rows > s.max_batch_size:
                break
            batch.append(backlog.popleft())
            rows += nxt.rows
        return batch

    def _execute(self, batch: list[_Item], hand_back: bool = True) -> None:
        start = time.perf_counter()
        m = self.metrics
        if m is not None:
            for it in batch:
                m.queue_seconds.observe(start - it.enqueued)
        rows = sum(it.rows for it in batch)
        if len(batch) == 1:
            results = self._run_alone(batch[0])
        else:
            first = batch[0]
            feeds = {name: np.concatenate([it.feeds[name] for it in batch]) for name in first.feeds}
            try:
                outputs = self.runtime.run(feeds)
            except Exception as e:
                results = [(it, None, e) for it in batch]
            else:
                bad = [n for n, a in outputs.items() if a.ndim == 0 or a.shape[0] != rows]
                if bad:
                    # The graph is not row-wise after all (say, it reduces over the batch): never
                    # mix requests for it again, and answer these one at a time.
                    log.warning("model %r output(s) %s do not have one row per input row; dynamic batching "
                                "turned off for it", self.runtime.name, bad)
                    self.merging = False
                    results = [r for it in batch for r in self._run_alone(it)]
                else:
                    results, offset = [], 0
                    for it in batch:
                        results.append((it, {n: a[offset:offset + it.rows] for n, a in outputs.items()}, None))
                        offset += it.rows
        compute_s = time.perf_counter() - start
        if m is not None:
            m.compute_seconds.observe(compute_s)
            m.batch_size.observe(rows)
        if self.stats is not None:
            self.stats.executed(rows, compute_s)
        for it in batch:
            if it.timing is not None:
                it.timing.queue_s, it.timing.compute_s = start - it.enqueued, compute_s
        if hand_back:
            self._hand_back(results)
        else:  # already on the event loop
            _resolve([(it.future, value, error) for it, value, error in results])

    def _run_alone(self, item: _Item) -> list:
        try:
            return [(item, self.runtime.run(item.feeds), None)]
        except Exception as e:
            return [(item, None, e)]

    @staticmethod
    def _hand_back(results: Sequence) -> None:
        # One call_soon_threadsafe per event loop per batch (a wake-up each), not one per request.
        by_loop: dict = {}
        for it, value, error in results:
            by_loop.setdefault(it.loop, []).append((it.future, value, error))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, items)
            except RuntimeError:  # the loop closed under us (server stopped): nobody is waiting
                pass
