"""One generic pipeline stage: a worker thread that maps items from an input iterable through a bounded queue.

    stage = Stage("stage1", work, inputs, maxsize=2, stop=stop_event)
    for out in stage: ...          # every item ``work(item)`` yielded, in order

``work(item)`` returns an iterable of outputs (often one, sometimes none: a stage may hold items back, as Stage II
holds pose frames until a render chunk is complete); when the inputs end, ``work.flush()`` (if it has one) yields
what was held back. The queue bounds how far a stage runs ahead of its consumer
(backpressure); an exception in the worker reaches the consumer, which re-raises it; the shared ``stop`` event ends
every stage of a run promptly (a worker never blocks on a consumer that has gone). Stages chain: a Stage is an
iterable, so it is the next stage's input. ``chain(stages, overlapped=False)`` runs the same chain in the calling
thread, one item at a time (the sequential baseline).

``on_item(stage, output, start, end)`` (optional) is called for every output with the wall-clock span of its
production, so timing lives with the metrics (engine/metrics.py), not in the stage functions.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

_DONE = object()  # end-of-stream marker in a stage's queue

Work = Callable[[object], Iterable]
OnItem = Optional[Callable[[str, object, float, float], None]]


class _Failure:
    """An exception raised in a worker, carried through its queue to the consumer."""

    def __init__(self, error: BaseException):
        self.error = error


class Stage:
    """``work`` applied to every item of ``inputs`` in a worker thread; iterate the stage for the outputs."""

    def __init__(self, name: str, work: Work, inputs: Iterable, maxsize: int, stop: threading.Event,
                 on_item: OnItem = None, setup: Optional[Callable[[], object]] = None):
        """``setup()`` runs first in the worker thread and returns a context manager entered around the work (e.g. a
        CUDA stream for this stage)."""
        self.name, self._work, self._inputs, self._stop, self._on_item = name, work, inputs, stop, on_item
        self._setup = setup
        self._q: "queue.Queue" = queue.Queue(maxsize=max(1, maxsize))
        self._thread = threading.Thread(target=self._run, name=f"mmgt-{name}", daemon=True)

    def start(self) -> "Stage":
        """Start the worker thread (separate from construction, so the stage is in its owner's list to close first)."""
        self._thread.start()
        return self

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            context = self._setup() if self._setup else None
            if context is not None:
                with context:
                    self._loop()
            else:
                self._loop()
            self._put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises
            self._put(_Failure(e))

    def _loop(self) -> None:
        for out in _outputs(self.name, self._work, self._inputs, self._stop, self._on_item):
            if not self._put(out):
                return

    def __iter__(self) -> Iterator:
        while True:
            try:
                item = self._q.get(timeout=0.1)
            except queue.Empty:
                if self._stop.is_set() or not self._thread.is_alive() and self._q.empty():
                    return
                continue
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item

    def close(self, timeout: float = 60.0) -> None:
        """Stop the run's stages (the shared event) and join this worker."""
        self._stop.set()
        if self._thread.ident is not None:  # started (an interruption may land between construction and start)
            self._thread.join(timeout=timeout)


def _outputs(name: str, work: Work, inputs: Iterable, stop: threading.Event, on_item: OnItem) -> Iterator:
    """Every output of ``work`` over ``inputs``, then of ``work.flush()``; stops early when ``stop`` is set."""
    for item in inputs:
        if stop.is_set():
            return
        yield from _timed(name, lambda: work(item), on_item)
    flush = getattr(work, "flush", None)
    if flush is not None and not stop.is_set():
        yield from _timed(name, flush, on_item)


def _timed(name: str, produce: Callable[[], Iterable], on_item: OnItem) -> Iterator:
    """``produce()``'s outputs, one at a time as they are made (a later output is not waited for), each reported
    with the span of its production (not of its consumption)."""
    outputs = iter(produce())
    while True:
        start = time.perf_counter()
        try:
            out = next(outputs)
        except StopIteration:
            return
        if on_item is not None:
            on_item(name, out, start, time.perf_counter())
        yield out


def chain(stages: Sequence[Tuple[str, Work, int]], inputs: Iterable, *, overlapped: bool, stop: threading.Event,
          on_item: OnItem = None, setup: Optional[Callable[[str], object]] = None,
          workers: Optional[List[Stage]] = None) -> Iterable:
    """Connect ``(name, work, queue size)`` stages after ``inputs`` and return the last one. Overlapped: each stage a
    worker thread with a bounded queue, appended to ``workers`` (the caller's list, to close) before its thread starts,
    so an interruption at any moment leaves no worker the caller does not know of; otherwise generators in the
    calling thread (``setup`` then applies to the whole chain: the stages' GPU work shares the caller's stream)."""
    workers = [] if workers is None else workers
    current: Iterable = inputs
    try:
        for name, work, maxsize in stages:
            if overlapped:
                stage = Stage(name, work, current, maxsize, stop, on_item,
                              setup=(lambda n=name: setup(n)) if setup else None)
                workers.append(stage)
                stage.start()
                current = stage
            else:
                current = _outputs(name, work, current, stop, on_item)
    except BaseException:  # interrupted while starting the chain: no worker may outlive it
        stop.set()
        close_all(workers)
        raise
    return current


def close_all(workers: Sequence[Stage]) -> None:
    """Stop and join every worker, even when an interruption (Ctrl-C, SIGTERM) arrives meanwhile: a worker left running
    inside a native call when the interpreter exits aborts the process; the interruption is raised after."""
    pending: Optional[BaseException] = None
    for stage in workers:
        while True:
            try:
                stage.close()
                break
            except BaseException as e:  # noqa: BLE001 - re-raised once every worker is joined
                pending = pending or e
    if pending is not None:
        raise pending


__all__ = ["Stage", "chain", "close_all"]
