"""``GET /metrics``: the server's state in Prometheus text format (prometheus-client), read at scrape time.

    mmgt_sessions, mmgt_max_sessions                       sessions running and the admission limit
    mmgt_session_fps{session, avatar}                      frames per second the viewer is sent
    mmgt_session_output_latency_ms{session, avatar}        audio in -> its frame out
    mmgt_session_engine_lag_ms{session, avatar}            how far the engine is behind its input (a lagging session)
    mmgt_session_frames_dropped_total{session, avatar}     frames a slow client lost (drop-oldest queue)
    mmgt_batch_calls_total{network, size}                  batched calls by rows per call (engine/backends/batching)
    mmgt_avatars, mmgt_avatars_prepared                    avatars registered, prepared and cached
    mmgt_gpu_memory_allocated_bytes                        torch's CUDA allocation (on a GPU)
    process_*                                              the process collector: resident memory, CPU, open files

Nothing is recorded in between: every scrape asks the sessions and the batchers for their numbers, so there is no
second bookkeeping to drift from ``/stats``.
"""
from __future__ import annotations

import sys
from typing import Tuple


def render_metrics(server) -> Tuple[bytes, str]:
    """(body, content type) of one scrape of ``server`` (an AvatarServer)."""
    from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
    from prometheus_client.exposition import CONTENT_TYPE_LATEST

    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    registry.register(_ServerCollector(server))
    return generate_latest(registry), CONTENT_TYPE_LATEST


class _ServerCollector:
    """The server's own families, computed when collected."""

    def __init__(self, server):
        self.server = server

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from engine.backends.batching import batchers

        s = self.server
        yield GaugeMetricFamily("mmgt_sessions", "Live sessions running", value=len(s.sessions))
        yield GaugeMetricFamily("mmgt_max_sessions", "Sessions admitted at most", value=s.config.max_sessions)
        families = {
            "fps": GaugeMetricFamily("mmgt_session_fps", "Frames per second sent to the viewer",
                                     labels=["session", "avatar"]),
            "output_latency_ms": GaugeMetricFamily("mmgt_session_output_latency_ms",
                                                   "Audio sample in -> its frame out (ms)", labels=["session", "avatar"]),
            "engine_lag_ms": GaugeMetricFamily("mmgt_session_engine_lag_ms",
                                               "How far the engine is behind the session's input (ms)",
                                               labels=["session", "avatar"]),
            "frames_dropped": CounterMetricFamily("mmgt_session_frames_dropped",
                                                  "Frames a slow client lost (drop-oldest queue)",
                                                  labels=["session", "avatar"]),
        }
        for sid, session in list(s.sessions.items()):
            stats = session.stats()
            labels = [sid, s.session_avatars.get(sid, "")]
            for key, family in families.items():
                value = stats.get(key)
                if value is not None:
                    family.add_metric(labels, float(value))
        yield from families.values()
        batch = CounterMetricFamily("mmgt_batch_calls", "Batched network calls by rows per call",
                                    labels=["network", "size"])
        for network, batcher in batchers(s.models).items():
            for size, calls in sorted(batcher.sizes.items()):
                batch.add_metric([network, str(size)], float(calls))
        yield batch
        yield GaugeMetricFamily("mmgt_avatars", "Avatars registered", value=len(s.avatars.list()))
        yield GaugeMetricFamily("mmgt_avatars_prepared", "Avatars prepared and cached",
                                value=len(s.avatars.cached_ids()))
        torch = sys.modules.get("torch")  # loaded by the engine; never imported just for a scrape
        if torch is not None and torch.cuda.is_available():
            yield GaugeMetricFamily("mmgt_gpu_memory_allocated_bytes", "torch CUDA memory allocated",
                                    value=float(torch.cuda.memory_allocated()))


__all__ = ["render_metrics"]
