"""engine/workers.py: the overlapped chain's workers are always the caller's to close, whenever an interruption lands
(a worker thread left inside a native call when the interpreter exits aborts the process)."""
import threading
import time

import pytest

from engine import workers as W


def _slow(item):
    time.sleep(0.01)
    yield item


def test_chain_hands_every_worker_to_the_caller_before_it_starts():
    stop, started = threading.Event(), []
    seen_in_list = []
    real_start = W.Stage.start

    def start(stage):
        seen_in_list.append(stage in started)  # the caller's list holds the stage before its thread runs
        return real_start(stage)

    W.Stage.start = start
    try:
        out = W.chain([("a", _slow, 2), ("b", _slow, 2)], range(5), overlapped=True, stop=stop, workers=started)
        assert list(out) == list(range(5))
    finally:
        W.Stage.start = real_start
        W.close_all(started)
    assert seen_in_list == [True, True] and len(started) == 2
    assert not any(s._thread.is_alive() for s in started)


def test_an_interruption_while_the_chain_starts_leaves_no_thread_running():
    stop, started, calls = threading.Event(), [], []
    real_start = W.Stage.start

    def start(stage):
        calls.append(stage)
        if len(calls) == 2:  # Ctrl-C / SIGTERM lands as the second worker starts
            raise KeyboardInterrupt
        return real_start(stage)

    W.Stage.start = start
    try:
        with pytest.raises(KeyboardInterrupt):
            W.chain([("a", _slow, 2), ("b", _slow, 2), ("c", _slow, 2)], iter(range(1000)), overlapped=True,
                    stop=stop, workers=started)
    finally:
        W.Stage.start = real_start
    assert stop.is_set()
    assert [s.name for s in started] == ["a", "b"]  # the one that started and the one being started
    assert not any(s._thread.is_alive() for s in started)
    assert not [t for t in threading.enumerate() if t.name.startswith("mmgt-")]
