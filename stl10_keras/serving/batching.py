"""Server-side batching, as TF Serving's `--enable_batching`: the requests that
wait at the same time are merged into one call of the signature.

The parameters are TF Serving's `BatchingParameters` message, read from its
protobuf text format (`--batching-parameters-file`, the same file TF Serving's
`--batching_parameters_file` takes), with the defaults of the scheduler under
TF Serving's `BatchingSession` (TensorFlow's `SharedBatchScheduler`):

    max_batch_size 1000, batch_timeout_micros 0, max_enqueued_batches 10,
    num_batch_threads = the CPUs this process may use, thread_pool_name "batch_threads",
    allowed_batch_sizes none, pad_variable_length_inputs false,
    enable_large_batch_splitting false (max_execution_batch_size = max_batch_size)

`Batcher` is that scheduler: one queue per signature of a loaded version (and
per input shape), each a list of batches of at most `max_batch_size` examples,
of which only the last is open; `num_batch_threads` threads take the oldest
batch that is full, or whose first request has waited `batch_timeout_micros`.
A request that finds its queue holding `max_enqueued_batches` batches is
refused at once (UNAVAILABLE, HTTP 503), so memory stays bounded under any
load; one whose deadline has passed when its batch is taken is not computed
(DEADLINE_EXCEEDED, HTTP 504). `DirectRunner` runs each request alone (batching
off) with the same deadline rule.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from stl10_keras.errors import UsageError
from stl10_keras.serving.codec import batch_size, run_signature
from stl10_keras.serving.errors import RequestError
from stl10_keras.serving.protos import (
    BATCHING_FIELDS,
    batching_parameters_class,
    read_text_proto,
)

@dataclass(frozen=True)
class BatchingOptions:
    """The batching parameters in force (TF Serving's defaults where unset).

    Args:
        max_batch_size: the most examples in one request, and in one batch
            (without large batch splitting).
        batch_timeout_micros: how long a batch that is not full may wait for
            more requests while a thread is free (0: none).
        max_enqueued_batches: batches a queue holds before it refuses requests.
        num_batch_threads: batches computed at the same time.
        thread_pool_name: the `thread_pool_name` label of the queuing metric.
        allowed_batch_sizes: a batch is padded up to the next of these sizes.
        pad_variable_length_inputs: requests whose inputs differ in a dimension
            other than the first are padded to the largest (with their first
            element) and merged; without it they go to separate batches.
        enable_large_batch_splitting: a request larger than the room left in the
            open batch is split across batches.
        max_execution_batch_size: the most examples in one batch when splitting.
    """

    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = dataclasses.field(default_factory=lambda: _cpus())
    thread_pool_name: str = "batch_threads"
    allowed_batch_sizes: tuple[int, ...] = ()
    pad_variable_length_inputs: bool = False
    enable_large_batch_splitting: bool = False
    max_execution_batch_size: int | None = None

    @property
    def batch_limit(self) -> int:
        """The most examples in one batch."""
        if self.enable_large_batch_splitting and self.max_execution_batch_size:
            return self.max_execution_batch_size
        return self.max_batch_size


def _cpus() -> int:
    """The CPUs this process may run on (TF's `port::MaxParallelism()`)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def options_from_message(message: Any, where: str = "the batching parameters"
                         ) -> BatchingOptions:
    """A `BatchingParameters` message -> `BatchingOptions`, checked as TF Serving
    checks them (positive sizes and threads, increasing allowed sizes ending at
    `max_batch_size`).

    Raises:
        UsageError: a value TF Serving would refuse, in one sentence.
    """
    values: dict[str, Any] = {}
    for name, _, kind in BATCHING_FIELDS:
        if kind == "repeated int64":
            values[name] = tuple(getattr(message, name))
        elif kind == "bool":
            values[name] = getattr(message, name)
        elif message.HasField(name):
            values[name] = getattr(message, name).value
    options = BatchingOptions(**values)
    positive = ("max_batch_size", "max_enqueued_batches", "num_batch_threads")
    for name in positive:
        if getattr(options, name) < 1:
            raise UsageError(f"{where}: {name} must be positive; it is "
                             f"{getattr(options, name)}.")
    if options.batch_timeout_micros < 0:
        raise UsageError(f"{where}: batch_timeout_micros must be 0 or more; it is "
                         f"{options.batch_timeout_micros}.")
    if options.num_batch_threads > 1024:
        raise UsageError(f"{where}: num_batch_threads is {options.num_batch_threads}"
                         "; give at most 1024.")
    sizes = options.allowed_batch_sizes
    if sizes:
        if any(b <= a for a, b in zip(sizes, sizes[1:])) or sizes[0] < 1:
            raise UsageError(f"{where}: allowed_batch_sizes must be positive and "
                             f"increasing; they are {list(sizes)}.")
        if sizes[-1] != options.max_batch_size:
            raise UsageError(
                f"{where}: the last entry of allowed_batch_sizes must match "
                f"max_batch_size; last entry was {sizes[-1]}, expected "
                f"{options.max_batch_size}.")
    if options.enable_large_batch_splitting:
        limit = options.max_execution_batch_size or options.max_batch_size
        if not 1 <= limit <= options.max_batch_size:
            raise UsageError(f"{where}: max_execution_batch_size must be 1.."
                             f"max_batch_size ({options.max_batch_size}); it is "
                             f"{limit}.")
        options = dataclasses.replace(options, max_execution_batch_size=limit)
    return options


def read_batching_parameters(path: str | os.PathLike) -> BatchingOptions:
    """`--batching-parameters-file`: TF Serving's text-format `BatchingParameters`.

    Raises:
        UsageError: the file cannot be read, does not parse (the line and the
            field are named), or holds a value TF Serving would refuse.
    """
    flag = "--batching-parameters-file"
    message = read_text_proto(path, batching_parameters_class(), flag)
    return options_from_message(message, f"{flag} {path}")


# --------------------------------------------------------------------------------------
# Deadlines and the unbatched runner
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Deadline:
    """When a request stops being worth computing, and what it is told then.

    Args:
        at: a `time.monotonic()` time.
        message: the sentence of the DEADLINE_EXCEEDED (HTTP 504) error.
    """

    at: float
    message: str

    def remaining(self) -> float:
        """Seconds left (negative once passed)."""
        return self.at - time.monotonic()

    def error(self) -> RequestError:
        """The 504 / DEADLINE_EXCEEDED answer of a late request."""
        return RequestError(504, self.message)


class Runner(Protocol):
    """What the front ends call to compute a request: alone or batched."""

    def run(self, signature: str, fn: Any, inputs: dict[str, np.ndarray],
            row: bool = True, deadline: Deadline | None = None
            ) -> dict[str, np.ndarray]:
        """The signature's outputs for `inputs` (numpy arrays, one batch)."""


class DirectRunner:
    """Each request computed alone, in its own thread (batching off)."""

    def run(self, signature: str, fn: Any, inputs: dict[str, np.ndarray],
            row: bool = True, deadline: Deadline | None = None
            ) -> dict[str, np.ndarray]:
        """`run_signature`, unless the deadline has passed (then 504, not computed).

        A computation cannot be interrupted, so one that ends past the deadline
        is answered 504 too: the client has stopped waiting for it.
        """
        if deadline is not None and deadline.remaining() <= 0:
            raise deadline.error()
        outputs = run_signature(signature, fn, inputs, row)
        if deadline is not None and deadline.remaining() <= 0:
            raise deadline.error()
        return outputs

    def stop(self) -> None:
        """Nothing to stop."""


# --------------------------------------------------------------------------------------
# The batcher
# --------------------------------------------------------------------------------------


class _Task:
    """One request: its inputs, and where its outputs (or its error) go."""

    __slots__ = ("inputs", "size", "row", "deadline", "enqueued", "done",
                 "outputs", "error", "parts", "pieces_left")

    def __init__(self, inputs: dict[str, np.ndarray], size: int, row: bool,
                 deadline: Deadline | None):
        self.inputs, self.size, self.row, self.deadline = inputs, size, row, deadline
        self.enqueued = time.monotonic()
        self.done = threading.Event()
        self.outputs: dict[str, np.ndarray] | None = None
        self.error: BaseException | None = None
        self.parts: list[tuple[int, dict[str, np.ndarray]]] = []
        self.pieces_left = 0


@dataclass
class _Piece:
    """Rows `start:stop` of a task (the whole task unless it was split)."""

    task: _Task
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    def inputs(self) -> dict[str, np.ndarray]:
        task = self.task
        if self.start == 0 and self.stop == task.size:
            return task.inputs
        return {k: v[self.start:self.stop] for k, v in task.inputs.items()}


@dataclass
class _Batch:
    pieces: list[_Piece] = dataclasses.field(default_factory=list)
    size: int = 0
    opened: float = 0.0  # when its first request was enqueued
    closed: bool = False  # full, or a later batch was opened behind it


@dataclass
class _Queue:
    """The batches of one signature of one loaded version (and input shapes)."""

    signature: str
    fn: Any
    batches: deque = dataclasses.field(default_factory=deque)


class Batcher:
    """TF Serving's batch scheduler for every signature of a repository.

    `run()` blocks its caller (a REST or gRPC thread) until the batch holding
    its request has been computed; `num_batch_threads` threads compute batches.

    Args:
        options: the batching parameters.
        metrics: where batch sizes, queuing latency and queue depth go
            (`ServingMetrics`), or None.
    """

    def __init__(self, options: BatchingOptions, metrics: Any = None):
        self.options = options
        self._metrics = metrics
        self._cond = threading.Condition()
        self._queues: dict[tuple, _Queue] = {}
        self._order = itertools.count()  # round-robin start among the queues
        self._depth = 0
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._work, daemon=True,
                             name=f"{options.thread_pool_name}-{i}")
            for i in range(options.num_batch_threads)]
        for thread in self._threads:
            thread.start()

    # -- the callers' side ------------------------------------------------------

    def run(self, signature: str, fn: Any, inputs: dict[str, np.ndarray],
            row: bool = True, deadline: Deadline | None = None
            ) -> dict[str, np.ndarray]:
        """Enqueue one request and wait for its outputs.

        Raises:
            RequestError: 400 for more examples than `max_batch_size` or a bad
                input (the signature's own error), 503 when the queue is full
                or the server stops, 504 when the deadline passes first.
        """
        size = batch_size(inputs)
        if deadline is not None and deadline.remaining() <= 0:
            raise deadline.error()
        limit = self.options.max_batch_size
        if size > limit:
            raise RequestError(400, f"The request holds {size} examples, more than "
                               f"this server's max_batch_size of {limit}; send at "
                               f"most {limit} per request.")
        task = _Task(inputs, size, row, deadline)
        if self._metrics is not None:
            self._metrics.input_batch_size.observe(size)
        with self._cond:
            self._enqueue(self._queue_for(signature, fn, inputs), task)
        wait = None if deadline is None else max(deadline.remaining(), 0.0)
        if not task.done.wait(wait):
            with self._cond:
                if not task.done.is_set():  # still queued, or being computed
                    self._finish(task, error=deadline.error())
        if task.error is not None:
            raise task.error
        return task.outputs

    def _queue_for(self, signature: str, fn: Any, inputs: dict[str, np.ndarray]
                   ) -> _Queue:
        # Requests whose inputs differ beyond the first dimension cannot be
        # concatenated, unless they are padded.
        pad = self.options.pad_variable_length_inputs
        shapes = tuple((k, v.dtype.str, v.ndim if pad else v.shape[1:])
                       for k, v in sorted(inputs.items()))
        key = (id(fn), signature, shapes)
        queue = self._queues.get(key)
        if queue is None:
            # The queue holds `fn`, so its id cannot be reused while it exists.
            queue = self._queues[key] = _Queue(signature, fn)
        return queue

    def _enqueue(self, queue: _Queue, task: _Task) -> None:
        """Add `task` to the open batch of `queue` (or to new ones), or refuse it."""
        if self._stopping:
            raise RequestError(503, "The server is stopping; send the request "
                               "again.")
        limit, batches = self.options.batch_limit, queue.batches
        open_batch = batches[-1] if batches and not batches[-1].closed else None
        room = limit - open_batch.size if open_batch is not None else 0
        most = self.options.max_enqueued_batches
        if self.options.enable_large_batch_splitting:
            capacity = room + (most - len(batches)) * limit
            fits = task.size <= capacity
        else:
            fits = task.size <= room or len(batches) < most
        if not fits:
            raise RequestError(
                503, f"The batching queue is full ({len(batches)} batches enqueued, "
                f"max_enqueued_batches is {most}); send the request again later.")
        pieces = []
        if self.options.enable_large_batch_splitting:
            start = min(room, task.size)
            if start:
                pieces.append((open_batch, _Piece(task, 0, start)))
            for begin in range(start, task.size, limit):
                pieces.append((None, _Piece(task, begin, min(begin + limit,
                                                               task.size))))
        else:
            pieces.append((open_batch if task.size <= room else None,
                           _Piece(task, 0, task.size)))
        task.pieces_left = len(pieces)
        for batch, piece in pieces:
            if batch is None:
                if batches and not batches[-1].closed:
                    batches[-1].closed = True
                batch = _Batch(opened=task.enqueued)
                batches.append(batch)
            batch.pieces.append(piece)
            batch.size += piece.size
            batch.closed = batch.closed or batch.size >= limit
        self._depth += len(pieces)
        self._gauge()
        self._cond.notify()

    def _finish(self, task: _Task, outputs: dict[str, np.ndarray] | None = None,
                error: BaseException | None = None) -> None:
        """Answer `task` once (the first answer wins; call with the lock held)."""
        if task.done.is_set():
            return
        task.outputs, task.error = outputs, error
        task.done.set()

    # -- the batch threads' side ------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                while True:
                    picked, wait = self._pick()
                    if picked is not None or (self._stopping and wait is None):
                        break
                    self._cond.wait(wait)
            if picked is None:
                return
            try:
                self._process(*picked)
            except BaseException as e:  # a bug: its requests get INTERNAL
                with self._cond:
                    for piece in picked[1].pieces:
                        self._finish(piece.task, error=e)

    def _pick(self) -> tuple[tuple[_Queue, _Batch] | None, float | None]:
        """The next batch to compute, or how long until one may be (None: work
        arrives with a notify)."""
        now = time.monotonic()
        timeout = self.options.batch_timeout_micros / 1e6
        keys = list(self._queues)
        if not keys:
            return None, None
        first = next(self._order) % len(keys)
        soonest = None
        for key in keys[first:] + keys[:first]:
            queue = self._queues[key]
            batch = queue.batches[0]
            ready_at = batch.opened + timeout
            if (batch.closed or len(queue.batches) > 1 or now >= ready_at
                    or self._stopping):
                queue.batches.popleft()
                if not queue.batches:
                    del self._queues[key]
                self._depth -= len(batch.pieces)
                self._gauge()
                return (queue, batch), None
            soonest = ready_at if soonest is None else min(soonest, ready_at)
        return None, max(soonest - now, 0.0)

    def _gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.labels(self.options.thread_pool_name).set(
                self._depth)

    def _process(self, queue: _Queue, batch: _Batch) -> None:
        """Compute one batch and hand each request its rows of the outputs."""
        now = time.monotonic()
        live = []
        with self._cond:
            for piece in batch.pieces:
                task = piece.task
                if self._metrics is not None:
                    self._metrics.queuing_latency.labels(
                        self.options.thread_pool_name).observe(
                            (now - task.enqueued) * 1e6)
                if task.done.is_set():  # timed out, or another piece failed
                    continue
                if self._stopping:
                    self._finish(task, error=RequestError(
                        503, "The server is stopping; send the request again."))
                elif task.deadline is not None and task.deadline.at <= now:
                    self._finish(task, error=task.deadline.error())
                else:
                    live.append(piece)
        if live:
            self._compute(queue, live)

    def _compute(self, queue: _Queue, pieces: list[_Piece]) -> None:
        size = sum(p.size for p in pieces)
        padded = self._padded_size(size)
        inputs = self._merge(pieces, padded - size)
        if self._metrics is not None:
            self._metrics.processed_batch_size.observe(padded)
            self._metrics.padding_size.labels(str(padded)).observe(padded - size)
        try:
            outputs = run_signature(queue.signature, queue.fn, inputs,
                                    pieces[0].task.row)
        except RequestError as e:
            if len(pieces) == 1:
                with self._cond:
                    self._finish(pieces[0].task, error=e)
                return
            # One request's input failed the merged call (an image that does
            # not decode): each request is computed alone, so only it fails.
            for piece in pieces:
                self._compute(queue, [piece])
            return
        offset = 0
        with self._cond:
            for piece in pieces:
                rows = {k: v[offset:offset + piece.size] for k, v in outputs.items()}
                offset += piece.size
                self._deliver(piece, rows)

    def _padded_size(self, size: int) -> int:
        allowed = self.options.allowed_batch_sizes
        i = bisect.bisect_left(allowed, size)
        return allowed[i] if i < len(allowed) else size

    def _merge(self, pieces: list[_Piece], padding: int) -> dict[str, np.ndarray]:
        """The pieces' inputs concatenated, padded to the allowed size with copies
        of the last request's first row (a valid input), as TF Serving pads."""
        parts = [p.inputs() for p in pieces]
        merged = {}
        for name in parts[0]:
            arrays = [part[name] for part in parts]
            if self.options.pad_variable_length_inputs:
                arrays = _pad_to_common_shape(arrays)
            if padding:
                arrays.append(np.repeat(arrays[-1][:1], padding, axis=0))
            merged[name] = (arrays[0] if len(arrays) == 1
                            else np.concatenate(arrays))
        return merged

    def _deliver(self, piece: _Piece, rows: dict[str, np.ndarray]) -> None:
        task = piece.task
        if task.done.is_set():
            return
        if piece.size == task.size:
            self._finish(task, outputs=rows)
            return
        task.parts.append((piece.start, rows))
        task.pieces_left -= 1
        if task.pieces_left == 0:
            task.parts.sort(key=lambda part: part[0])
            self._finish(task, outputs={
                k: np.concatenate([p[1][k] for p in task.parts])
                for k in task.parts[0][1]})

    def stop(self) -> None:
        """Refuse new requests, answer the queued ones 503, end the threads."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=10.0)


def _pad_to_common_shape(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Each array padded to the largest size of every dimension but the first,
    with its own first element (TF Serving's `AddPadding`)."""
    target = np.max([a.shape for a in arrays], axis=0)
    out = []
    for array in arrays:
        widths = [(0, 0)] + [(0, int(t - d)) for t, d in
                             zip(target[1:], array.shape[1:])]
        if any(w for _, w in widths):
            array = np.pad(array, widths, constant_values=array.flat[0])
        out.append(array)
    return out

