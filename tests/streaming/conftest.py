"""Fixtures of the streaming tests: live settings that keep up on a 2-core CPU, a warmed-up shared model set, and an
in-process server started on the test's own event loop."""
import logging
import sys
from pathlib import Path

import pytest

# the helper module beside the tests (also run as a subprocess and used by benchmarks/bench_stream.py)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from stream_client import QUEUE_FRAMES, TEST_SETTINGS  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Stage I and Stage II run in two threads beside the event loop: one torch thread each on 2 cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def warm_models(tiny_models, tiny_avatar, one_thread):
    """The shared tiny models and avatar, after one warm-up render (first calls JIT-compile librosa's numba code and
    allocate; that belongs to server start-up, not to the first viewer's latency)."""
    from streaming.server import AvatarServer, ServerConfig
    from streaming.session import SessionOptions

    AvatarServer(tiny_models, tiny_avatar,
                 ServerConfig(session=SessionOptions(settings=TEST_SETTINGS, queue_frames=QUEUE_FRAMES))).warmup()
    return tiny_models, tiny_avatar


@pytest.fixture
def loopback_ice():
    """aioice skips 127.0.0.1 when gathering; pin both peers (same process) to loopback for the test."""
    import aioice.ice

    original = aioice.ice.get_host_addresses
    aioice.ice.get_host_addresses = lambda use_ipv4=True, use_ipv6=True: ["127.0.0.1"]
    yield
    aioice.ice.get_host_addresses = original


@pytest.fixture(autouse=True)
def quiet_media_logs():
    for name in ("aioice", "aiortc"):
        logging.getLogger(name).setLevel(logging.WARNING)
    yield
