"""Dynamic batching: requests queued, merged into one session run, split back per request, in order;
large requests cut into pieces and interleaved with everyone else's; an optional bound on the queue.

One ``Batcher`` per served model owns one worker thread. The HTTP event loop calls
``await batcher.infer(feeds)``: the request's arrays join a FIFO queue (handed to the worker once per
event-loop iteration) and the coroutine waits on an asyncio future; there is no thread-pool hop per
request. The worker forms each batch from the head of the queue, in order:

- same input names, dtypes and per-row shapes (rows are stacked along dim 0),
- at most ``max_batch_size`` rows in all; a request that does not fit whole waits for the next batch,
- waiting at most ``max_queue_delay_ms`` after the oldest request arrived for more rows to come.

Fair under a large request: a request of more than ``max_batch_size`` rows is served in pieces of
at most that many rows, one piece per batch, and after each piece it goes to the back of the queue,
so a 1-row request that arrives while a 32k-row one is being served waits for about one batch's
compute time instead of the whole request's (round robin between requests; a cancelled request's
remaining pieces are dropped). Its outputs are joined back in row order.

Bounded: with ``max_queue_size`` > 0, a request arriving while that many requests wait (not yet
started) is refused at once with ``QueueFull`` (the transport answers 503 with Retry-After), so past
saturation latency stays bounded instead of growing with the queue.

With the default delay of 0 nothing waits on purpose: whatever queued while the previous batch ran
is merged, so a lone client pays no delay and a crowd is served in large batches (the batch grows
with the load, which is what a closed-loop load at concurrency 32 shows). The worker concatenates,
runs the session once, checks that every output has one row per input row, slices each request its
rows (in queue order) and resolves all the futures of the batch with a single hand-over to the event
loop. The fast path: while the worker is idle (and no delay is configured), the requests of one
event-loop iteration are batched and run right on the event loop as long as each batch takes at most
``INLINE_MAX_COMPUTE_S`` warm (measured at warm-up per batch size), since two thread wake-ups and the
GIL passed between threads cost more than a small model's inference (concurrency 1 runs only this way;
a small model under load mostly so; a large request, or a slow model, always goes to the worker). A model without
a free batch dim, or whose outputs turn out not to be row-wise, is never merged nor cut: each request
runs alone. An exception fails only the requests of its batch; the worker never dies.
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

INLINE_MAX_COMPUTE_S = 0.002  # a batch runs on the event loop only if it takes <= 2 ms warm (see _run_inline)


class QueueFull(RuntimeError):
    """The batcher's queue holds ``max_queue_size`` waiting requests: come back later (HTTP 503)."""

    retry_after_s = 1  # whole seconds, as HTTP's Retry-After takes them


class _Item:
    """One request. ``scheduled``: rows handed to a batch so far (the worker's cursor); ``parts``:
    outputs of the pieces already run, by first row, for a request served in pieces."""

    __slots__ = ("feeds", "rows", "key", "future", "loop", "enqueued", "scheduled", "finished", "parts", "closed",
                 "timing")

    def __init__(self, feeds, rows, key, future, loop, timing=None):
        self.feeds, self.rows, self.key, self.future, self.loop = feeds, rows, key, future, loop
        self.enqueued = time.perf_counter()
        self.timing = timing  # optional: gets this request's queue and compute seconds (queue_s, compute_s)
        self.scheduled = self.finished = 0
        self.parts: list | None = None
        self.closed = False  # answered (or failed): its remaining pieces, if any, are dropped


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
        self.stats = stats  # optional: ``executed(rows, seconds)`` per session run
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
        # Requests waiting = admitted - started; each counter has one writer (the event loop, the
        # worker), so no lock: a stale read admits or refuses one request early, nothing worse.
        self._admitted = 0
        self._started = 0  # by the worker
        self._inline_started = 0  # by the event loop's fast path
        # Inline fast path (see _flush): only for models whose batch-1 run is short enough not to
        # hold up the event loop. _idle is written by the worker, read by the loop: a stale read only
        # means one request takes the other path (ONNX Runtime sessions may run concurrently).
        self._inline_ok = bool(getattr(runtime, "batch_seconds", None)) \
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

    @property
    def queued(self) -> int:
        """Requests admitted and not yet started (approximate while both threads move)."""
        return self._admitted - self._started - self._inline_started

    async def infer(self, feeds: Mapping[str, np.ndarray], timing=None) -> dict[str, np.ndarray]:
        """Every model output for these (checked) feeds, rows of this request only. Raises QueueFull
        when ``max_queue_size`` requests already wait. ``timing``, when given, gets this request's queue
        seconds (to its first piece) and compute seconds (of every batch it was part of)."""
        if self._stopping:
            raise RuntimeError("the server is shutting down")
        limit = self.settings.max_queue_size
        if limit and self.queued >= limit:
            raise QueueFull(f"model {self.runtime.name!r} has {limit} requests waiting (max_queue_size); "
                            f"retry in {QueueFull.retry_after_s} s")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        first = next(iter(feeds.values()))
        rows = first.shape[0] if first.ndim else 1
        key = tuple((name, a.dtype.str, a.shape[1:]) for name, a in sorted(feeds.items()))
        if not self._pending:
            loop.call_soon(self._flush)  # after the other requests of this loop iteration joined
        self._pending.append(_Item(feeds, rows, key, future, loop, timing))
        self._admitted += 1
        return await future

    def _flush(self) -> None:
        items, self._pending = self._pending, []
        if self._idle and self._inline_ok:
            items = self._run_inline(items)
            if not items:
                return
        self._idle = False
        self._inbox.put(items)

    def _inline_seconds(self, rows: int) -> float:
        """Warm compute time of a batch of ``rows`` (at the next warmed size up), inf when unknown."""
        known = self.runtime.batch_seconds
        return min((t for n, t in known.items() if n >= rows), default=float("inf"))

    def _run_inline(self, items: list[_Item]) -> list[_Item]:
        """Run the cheap batches of this loop iteration right here on the event loop, in queue order,
        while each takes at most INLINE_MAX_COMPUTE_S warm; -> the requests left for the worker thread.

        Why: on a small model the hand-over to the worker thread and back (a wake-up each way and the
        GIL passed between the threads) cost more than the inference; py-spy showed 15-20% of a
        worker process's CPU there at concurrency 32. Only while the worker is idle (nothing of it
        to overtake) and never for a request larger than a batch (its pieces interleave on the worker)."""
        i, n = 0, len(items)
        limit = self.settings.max_batch_size
        while i < n:
            first = items[i]
            if first.rows > limit and self.merging:
                break
            j, rows = i + 1, first.rows
            if self.merging:
                while j < n and items[j].key == first.key and rows + items[j].rows <= limit:
                    rows += items[j].rows
                    j += 1
            if self._inline_seconds(rows) > INLINE_MAX_COMPUTE_S:
                break
            batch = items[i:j]
            for it in batch:
                it.scheduled = it.rows
            self._inline_started += len(batch)
            try:
                self._execute([(it, 0, it.rows) for it in batch], hand_back=False)
            except Exception as e:
                log.exception("inline inference of %r failed", self.runtime.name)
                _resolve([(it.future, None, e) for it in batch])
            i = j
        return items[i:]

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
                self._hand_back(self._fail([it for it, _, _ in batch], e))

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

    def _next_batch(self) -> list[tuple[_Item, int, int]] | None:
        """The next batch as (request, first row, end row) pieces, in row order; None to stop."""
        s, backlog = self.settings, self._backlog
        while self._take(False):  # newcomers join behind a large request's next piece, not after all of it
            pass
        while True:
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
            first = backlog[0]
            if self._gone(first):
                backlog.popleft()  # failed, or its client went away: drop it (and its remaining pieces)
                continue
            break
        if not self.merging:
            backlog.popleft()
            self._started += first.scheduled == 0
            first.scheduled = first.rows
            return [(first, 0, first.rows)]
        batch: list[tuple[_Item, int, int]] = []
        rows, limit = 0, s.max_batch_size
        deadline = first.enqueued + self._delay_s
        while rows < limit:
            if not backlog:
                if self._take(False):
                    continue
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or self._stopping or not self._take(True, remaining):
                    break
                continue
            it = backlog[0]
            if self._gone(it):
                backlog.popleft()
                continue
            if it.key != first.key:
                break
            left = it.rows - it.scheduled
            if left <= limit - rows:  # the (rest of the) request fits whole
                backlog.popleft()
                take = left
            elif it.rows > limit:  # a large request: one piece now, then to the back of the queue
                backlog.popleft()
                take = min(left, limit - rows)
                if take < left:
                    backlog.append(it)
            else:
                break  # a request that fits a batch whole waits for the next one rather than be cut
            self._started += it.scheduled == 0
            batch.append((it, it.scheduled, it.scheduled + take))
            it.scheduled += take
            rows += take
        return batch

    def _gone(self, it: _Item) -> bool:
        """True (and counted as started) for a request not worth running: failed already, or its
        client went away (the future was cancelled; read across threads, a stale answer costs one run)."""
        if not (it.closed or it.future.done()):
            return False
        self._started += it.scheduled == 0
        it.closed = True
        return True

    def _execute(self, batch: list[tuple[_Item, int, int]], hand_back: bool = True) -> None:
        start = time.perf_counter()
        m = self.metrics
        if m is not None:
            for it, a, _ in batch:
                if a == 0:
                    m.queue_seconds.observe(start - it.enqueued)
        rows = sum(b - a for _, a, b in batch)
        if len(batch) == 1 and batch[0][1] == 0 and batch[0][2] == batch[0][0].rows:
            item = batch[0][0]
            try:
                results = [(item, self.runtime.run(item.feeds), None)]
            except Exception as e:
                results = [(item, None, e)]
            item.closed = True
        else:
            feeds = {name: _rows(batch, name) for name in batch[0][0].feeds}
            try:
                outputs = self.runtime.run(feeds)
            except Exception as e:
                results = self._fail([it for it, _, _ in batch], e)
            else:
                bad = [n for n, a in outputs.items() if a.ndim == 0 or a.shape[0] != rows]
                if bad:
                    results = self._not_row_wise(batch, bad)
                else:
                    results, offset = [], 0
                    for it, a, b in batch:
                        part = {n: o[offset:offset + b - a] for n, o in outputs.items()}
                        offset += b - a
                        done = _collect(it, a, b, part)
                        if done is not None:
                            results.append((it, done, None))
        compute_s = time.perf_counter() - start
        if m is not None:
            m.compute_seconds.observe(compute_s)
            m.batch_size.observe(rows)
        if self.stats is not None:
            self.stats.executed(rows, compute_s)
        for it, a, _ in batch:
            if it.timing is not None:
                if a == 0:
                    it.timing.queue_s, it.timing.compute_s = start - it.enqueued, compute_s
                else:  # a later piece of a large request
                    it.timing.compute_s += compute_s
        if hand_back:
            self._hand_back(results)
        else:  # already on the event loop
            _resolve([(it.future, value, error) for it, value, error in results])

    def _not_row_wise(self, batch, bad: list[str]) -> list:
        """The graph is not row-wise after all (say, it reduces over the batch): never mix nor cut
        requests for it again, and answer these whole, one at a time."""
        log.warning("model %r output(s) %s do not have one row per input row; dynamic batching turned off for it",
                    self.runtime.name, bad)
        self.merging = False
        results = []
        for it in dict.fromkeys(it for it, _, _ in batch):  # each request once, in order
            try:
                results.append((it, self.runtime.run(it.feeds), None))
            except Exception as e:
                results.append((it, None, e))
            it.closed = True
        return results

    @staticmethod
    def _fail(items: list[_Item], error: BaseException) -> list:
        """Every request of a failed batch fails, once, with its error (its other pieces are dropped)."""
        out = []
        for it in dict.fromkeys(items):
            if not it.closed:
                it.closed = True
                out.append((it, None, error))
        return out

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


def _rows(batch: list[tuple[_Item, int, int]], name: str) -> np.ndarray:
    """Input ``name`` of the batch: each piece's rows, stacked in order (views where a piece is a whole request)."""
    arrays = [it.feeds[name] if a == 0 and b == it.rows else it.feeds[name][a:b] for it, a, b in batch]
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def _collect(item: _Item, a: int, b: int, part: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """Record the outputs of rows a..b of ``item``; its whole outputs once every row has run, else None."""
    if a == 0 and b == item.rows:
        item.closed = True
        return part
    if item.parts is None:
        item.parts = []
    item.parts.append((a, part))
    item.finished += b - a
    if item.finished < item.rows:
        return None
    item.closed = True
    pieces = [p for _, p in sorted(item.parts, key=lambda x: x[0])]
    item.parts = None
    return {n: np.concatenate([p[n] for p in pieces]) for n in pieces[0]}
