"""The server's scheduler: one thread owns the decoder and steps every active row; requests join and leave.

    scheduler = Scheduler(model, max_batch=8, max_queue=64)
    scheduler.start()
    row = scheduler.submit(args, stop=["\\n\\n"], loop=asyncio.get_running_loop())   # QueueFull when full
    async for event in row: ...        # ("text", piece) events, then ("done", RowResult)
    row.cancel()                       # the client went away: the row leaves at the next step

Each loop iteration: admit waiting requests while there are free rows (they join the running batch at this
step), run one step of the core (a prefill for new rows, a decode or draft/verify round for the others), turn each
row's new tokens into text (stopping.TextStream: stop strings, whole characters) and hand it to the row's
asyncio queue, then remove the rows that finished, stopped or were cancelled, which frees their slot at once.

The core is the only part that touches the engine (add / step / remove): BatchedCore drives the batched
Engine's row interface (add_row / step / remove_row) on an Engine of its own, so offline generate() calls on
the same model do not wait for the server. Tests plug scripted cores in behind the same three methods.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
from dataclasses import dataclass

import torch

from .. import ops
from ..generation import GenerationArgs, GenerationStats
from ..stopping import TextStream


class QueueFull(Exception):
    """The waiting queue is at its bound: answer 429."""


@dataclass
class RowResult:
    """What a finished request returns."""
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) | "length" (max_tokens or the context is full) | "cancelled"
    stats: GenerationStats
    queue_time_s: float = 0.0
    first_token_time_s: float | None = None  # seconds from submission to the first text


@dataclass
class CoreStep:
    """One row's outcome of a core step."""
    tokens: list[int]
    finish_reason: str | None  # set when the core ended the row (EOS, max_new_tokens, context)


# ----------------------------------------------------------------------------------------------
# cores: the engine behind add / step / remove


class BatchedCore:
    """The batched Engine's row interface: rows join at the next step and leave at once, up to `max_rows`."""

    def __init__(self, model, max_rows: int = 8, weight_dtype=None):
        from ..engine import Engine, default_weight_dtype
        self.max_rows = max_rows
        # its own engine, not the model's cached one: offline generate() on the same model stays usable
        self._engine = Engine(model, weight_dtype or default_weight_dtype(model), max_rows=max_rows)
        if not ops.work_pool_enabled():
            # OpenMP teams (the work pool switched off) wait at every parallel region for a worker that the event
            # loop has descheduled: leave that loop a core (the work pool's caller never waits for such a worker)
            self._engine.leave_cores(1)
        self._rows: dict = {}  # key -> (engine row id, args)

    def add(self, key, args: GenerationArgs) -> None:
        self._rows[key] = (self._engine.add_row(args), args)

    def step(self) -> dict:
        """{key: CoreStep} for every active row (a row that produced nothing this step has no tokens)."""
        new = dict(self._engine.step())  # engine row id -> tokens
        out = {}
        for key, (row, _) in self._rows.items():
            out[key] = CoreStep(new.get(row, []), self._engine.finish_reason(row))
        return out

    def remove(self, key) -> GenerationStats:
        row, args = self._rows.pop(key)
        try:
            return self._engine.result(row, args).stats
        finally:
            self._engine.remove_row(row)


# ----------------------------------------------------------------------------------------------
# rows and the scheduler


class Row:
    """A submitted request: an async iterator of ("text", piece) events ending with ("done", RowResult)."""

    def __init__(self, key, args: GenerationArgs, text: TextStream, loop: asyncio.AbstractEventLoop):
        self.key, self.args, self.text, self.loop = key, args, text, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()
        self.admitted: float | None = None
        self.first_token: float | None = None
        self._held = None  # an event take_text took off the queue that is not text: the next one __anext__ gives

    def take_text(self) -> str:
        """The texts of the text events already waiting, joined (a client reading slower than the engine steps
        gets them in one piece); a waiting event of another kind stays next."""
        texts = []
        while self._held is None and not self.events.empty():
            kind, value = self.events.get_nowait()
            if kind == "text":
                texts.append(value)
            else:
                self._held = (kind, value)
        return "".join(texts)

    def cancel(self) -> None:
        """Ends the row at the next step (a disconnected client)."""
        self.cancelled.set()

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._held is not None:
            (kind, value), self._held = self._held, None
        else:
            kind, value = await self.events.get()
        if kind == "end":
            raise StopAsyncIteration
        if kind == "done":
            self.events.put_nowait(("end", None))
        if kind == "error":
            raise value
        return kind, value

    async def result(self) -> RowResult:
        """Waits for the end of the row; returns its RowResult (the text events are skipped)."""
        async for kind, value in self:
            if kind == "done":
                return value
        raise RuntimeError("row ended without a result")


def _deliver(items) -> None:
    """On the event loop: puts each (row, kind, value) event on its row's queue."""
    for row, kind, value in items:
        row.events.put_nowait((kind, value))


class Metrics:
    """Counters the scheduler keeps for /metrics (read from other threads; ints and floats only)."""

    def __init__(self):
        self.requests_total = 0
        self.requests_finished = collections.Counter()  # finish_reason -> count
        self.requests_rejected = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.drafted_total = 0
        self.accepted_total = 0
        self.steps_total = 0
        self.busy_time_s = 0.0
        self._recent = collections.deque()  # (time, tokens) over the last window

    def add_tokens(self, n: int, now: float, window_s: float = 10.0) -> None:
        self.generation_tokens_total += n
        self._recent.append((now, n))
        while self._recent and self._recent[0][0] < now - window_s:
            self._recent.popleft()

    def tokens_per_second(self, window_s: float = 10.0) -> float:
        """Generated tokens per second over the last `window_s` seconds."""
        now = time.perf_counter()
        return sum(n for t, n in list(self._recent) if t >= now - window_s) / window_s


class Scheduler:
    """Owns the core in one thread; async handlers submit rows and read their events."""

    def __init__(self, model, max_batch: int = 8, max_queue: int = 64, core=None):
        self.model = model
        self.core = core if core is not None else BatchedCore(model, max_batch)
        self.max_batch = max(1, min(max_batch, self.core.max_rows))
        self.max_queue = max_queue
        self.metrics = Metrics()
        self._waiting: collections.deque[Row] = collections.deque()
        self._active: dict[object, Row] = {}
        self._lock = threading.Condition()
        self._keys = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._outbox: list = []  # (row, kind, value) events of this step, for _flush

    # ---- called from the server's event loop

    def submit(self, args: GenerationArgs, stop=(), loop: asyncio.AbstractEventLoop | None = None) -> Row:
        """Queues a request (already validated); raises QueueFull when `max_queue` requests are waiting."""
        loop = loop or asyncio.get_running_loop()
        row = Row(next(self._keys), args, TextStream(self.model.decode, stop), loop)
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                self.metrics.requests_rejected += 1
                raise QueueFull(f"{len(self._waiting)} requests are waiting (the bound is {self.max_queue})")
            self._waiting.append(row)
            self.metrics.requests_total += 1
            self._lock.notify()
        return row

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active_rows(self) -> int:
        return len(self._active)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="layerskip-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- the scheduler thread

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._lock:
                while not self._stopping and not self._waiting and not self._active:
                    self._lock.wait()
                if self._stopping:
                    break
                admitted = []
                while self._waiting and len(self._active) + len(admitted) < self.max_batch:
                    admitted.append(self._waiting.popleft())
            for row in admitted:
                self._admit(row)
            for row in [r for r in self._active.values() if r.cancelled.is_set()]:
                self._finish(row, "cancelled")
            if self._active:
                self._step()
            self._flush()
        for row in list(self._active.values()) + list(self._waiting):
            self._send(row, "error", RuntimeError("the server is shutting down"))
        self._flush()

    def _send(self, row: Row, kind: str, value) -> None:
        """Queues one event for the row's event loop; _flush hands them over."""
        self._outbox.append((row, kind, value))

    def _flush(self) -> None:
        """Hands the queued events to their event loops: one wake-up per loop per step, not one per event."""
        by_loop: dict = {}
        for item in self._outbox:
            by_loop.setdefault(item[0].loop, []).append(item)
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the event loop is closed (the server is shutting down)
                pass

    def _admit(self, row: Row) -> None:
        if row.cancelled.is_set():
            self._send(row, "done", RowResult("", [], "cancelled", GenerationStats(row.args.strategy, None, None)))
            self.metrics.requests_finished["cancelled"] += 1
            return
        try:
            self.core.add(row.key, row.args)
        except Exception as e:  # a request the engine refuses: that row fails, the server goes on
            self._send(row, "error", e)
            return
        row.admitted = time.perf_counter()
        self._active[row.key] = row
        self.metrics.prompt_tokens_total += len(row.args.prompt_ids)

    def _step(self) -> None:
        t0 = time.perf_counter()
        try:
            outcome = self.core.step()
        except Exception as e:  # an engine failure ends the active rows with an error, not the server
            for row in list(self._active.values()):
                self._active.pop(row.key)
                self.core.remove(row.key)
                self._send(row, "error", e)
            return
        now = time.perf_counter()
        self.metrics.steps_total += 1
        self.metrics.busy_time_s += now - t0
        for key, out in outcome.items():
            row = self._active[key]
            if out.finish_reason == "error":  # the engine gave up on this row (non-finite logits)
                del self._active[key]
                self.core.remove(key)
                self.metrics.requests_finished["error"] += 1
                self._send(row, "error", RuntimeError("the model produced NaN or infinite logits for this request"))
                continue
            kept, text = 0, ""  # one text event per row per step
            for token in out.tokens:
                kept += 1
                text += row.text.push(token)
                if row.text.stopped:
                    break
            self.metrics.add_tokens(kept, now)
            if not row.text.stopped and out.finish_reason is not None:
                text += row.text.finish()
            if text:
                row.first_token = row.first_token or now
                self._send(row, "text", text)
            if row.text.stopped:
                self._finish(row, "stop")
            elif out.finish_reason is not None:
                self._finish(row, "length" if out.finish_reason == "context" else out.finish_reason)

    def _finish(self, row: Row, finish_reason: str) -> None:
        del self._active[row.key]
        stats = self.core.remove(row.key)
        stats.new_tokens = len(row.text.tokens)
        self.metrics.drafted_total += stats.drafted
        self.metrics.accepted_total += stats.accepted
        self.metrics.requests_finished[finish_reason] += 1
        ttft = None if row.first_token is None else row.first_token - row.submitted
        self._send(row, "done", RowResult(row.text.text, list(row.text.tokens), finish_reason, stats,
                                   (row.admitted or row.submitted) - row.submitted, ttft))
