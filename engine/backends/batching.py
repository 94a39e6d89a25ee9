"""Continuous batching across sessions: the calls several sessions make of one network at the same time run as one.

``batched(models)`` gives a model set whose per-chunk and per-step networks (the denoiser step, the SMGA step, the
pose guider, the audio projection, the frame decoder) are ``Batcher`` executors: a caller hands its named inputs
over and waits; one worker per network takes every request that is waiting when it becomes free (up to
``max_batch``, requests of the same shapes together), runs them as one call with a row per request and hands each
caller its rows back. Sessions join and leave between calls. A caller alone never waits. When several callers have
been active in the last ``active_window`` seconds, the worker gives the ones missing from a batch a moment to hand
their request in -- half the duration of its last call, at most ``max_gather`` seconds: a session's next request
follows its last result after a little host work, and without that moment two busy sessions would take turns forever
(each call finds only the other's request waiting) instead of meeting in one call.

Each row keeps its own inputs -- bank, masks, audio tokens, timestep, guidance -- and the networks compute every row
independently (per-sample norms, attention within a sample), so batching is invisible: a session's results equal its
solo run up to float summation order. The CFG layouts are regrouped for the batch: the denoiser takes every session's
unconditional row first, then every conditional row (its ``uncond_rows`` is the number of sessions); the SMGA step takes
every audio-condition row, then every null-condition row.

Batching applies to the torch calls of a model set (an exported or compiled executor has fixed shapes; it keeps running
call by call). The other networks (speech encoders, SMGA condition, the avatar's encoders) run per call as before.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from typing import Callable, Deque, Dict, Hashable, List, Mapping, Optional, Sequence

import torch

log = logging.getLogger(__name__)

Feeds = Mapping[str, torch.Tensor]
Outputs = Dict[str, torch.Tensor]
RunBatch = Callable[[Sequence[Feeds]], List[Outputs]]
DEFAULT_MAX_BATCH = 8


class _Request:
    """One caller's inputs, and where its outputs (or error) come back."""

    __slots__ = ("feeds", "key", "done", "outputs", "error", "ready", "caller")

    def __init__(self, feeds: Feeds, key: Hashable, ready: Optional["torch.cuda.Event"], caller: int):
        self.feeds, self.key, self.ready, self.caller = feeds, key, ready, caller
        self.done = threading.Event()
        self.outputs: Optional[Outputs] = None
        self.error: Optional[BaseException] = None


class Batcher:
    """An executor that runs the waiting calls of many threads as one batched call (see the module doc)."""

    def __init__(self, name: str, run_batch: RunBatch, key: Callable[[Feeds], Hashable],
                 max_batch: int = DEFAULT_MAX_BATCH, kind: str = "torch", max_gather: float = 0.05,
                 active_window: float = 1.0):
        self.name, self.run_batch, self.key, self.max_batch = name, run_batch, key, max(1, int(max_batch))
        self.max_gather, self.active_window = max_gather, active_window
        self._last_call = 0.0  # seconds the last batched call took
        self._seen: Dict[int, float] = {}  # caller thread -> when it last handed in a request
        self.kind = f"{kind}+batched"
        self.sizes: Counter = Counter()  # batch size -> calls made with it (for /metrics and the tests)
        self._queue: Deque[_Request] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=f"batch-{name}", daemon=True)
        self._thread.start()

    # -- the caller's side ---------------------------------------------------------------------------------------
    def __call__(self, feeds: Feeds) -> Outputs:
        cuda = any(t.is_cuda for t in feeds.values())
        ready = torch.cuda.Event() if cuda else None  # the inputs exist on the caller's stream at this point
        if ready is not None:
            ready.record()
        request = _Request(feeds, self.key(feeds), ready, threading.get_ident())
        with self._cond:
            if self._closed:
                raise RuntimeError(f"batcher {self.name}: closed")
            self._queue.append(request)
            self._cond.notify()
        request.done.wait()
        if request.error is not None:
            raise request.error
        if cuda:  # the outputs come from the batcher's stream: this stream waits for them and keeps them alive
            stream = torch.cuda.current_stream()
            stream.wait_event(request.ready)
            for t in request.outputs.values():
                t.record_stream(stream)
        return request.outputs

    # -- the worker ----------------------------------------------------------------------------------------------
    def _take(self) -> List[_Request]:
        """The oldest waiting request and every other waiting request of the same key, up to max_batch; when other
        callers have been active lately and are not in yet, they get a moment to hand theirs in (see the module doc)."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed and not self._queue:
                return []
            now = time.monotonic()
            for caller in [c for c, t in self._seen.items() if now - t > self.active_window]:
                del self._seen[caller]
            for request in self._queue:
                self._seen[request.caller] = now
            key = self._queue[0].key
            deadline = now + min(self.max_gather, 0.5 * self._last_call)
            while not self._closed:  # wait (briefly) for the active callers that have nothing queued yet
                waiting = sum(1 for r in self._queue if r.key == key)
                if waiting >= min(len(self._seen), self.max_batch) or time.monotonic() >= deadline:
                    break
                self._cond.wait(max(deadline - time.monotonic(), 0.0))
                for request in self._queue:
                    self._seen[request.caller] = time.monotonic()
            batch, rest = [], deque()
            while self._queue:
                request = self._queue.popleft()
                (batch if request.key == key and len(batch) < self.max_batch else rest).append(request)
            self._queue.extendleft(reversed(rest))
            return batch

    def _work(self) -> None:
        stream = None
        while True:
            batch = self._take()
            if not batch:
                return
            started = time.perf_counter()
            try:
                if batch[0].ready is not None:
                    stream = stream or torch.cuda.Stream()
                    with torch.cuda.stream(stream):
                        for request in batch:
                            stream.wait_event(request.ready)
                        outputs = self.run_batch([r.feeds for r in batch])
                        done = torch.cuda.Event()
                        done.record()
                    for request in batch:
                        request.ready = done
                else:
                    outputs = self.run_batch([r.feeds for r in batch])
                for request, out in zip(batch, outputs):
                    request.outputs = out
            except BaseException as e:  # noqa: BLE001 - every caller of the batch gets the error
                log.debug("batcher %s: a batch of %d failed: %s", self.name, len(batch), e)
                for request in batch:
                    request.error = e
            self._last_call = time.perf_counter() - started
            self.sizes[len(batch)] += 1
            for request in batch:
                request.done.set()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    def __repr__(self) -> str:
        return f"Batcher({self.name}, max {self.max_batch})"


# ----------------------------------------------------------------------------------------------------------------
# How each network's calls combine (torch modules of the model set; every row computed on its own)
# ----------------------------------------------------------------------------------------------------------------
def _shape_key(feeds: Feeds, skip_axis: int = 0) -> Hashable:
    """Requests batch together when every input matches except along ``skip_axis``."""
    return tuple((name, tuple(s for i, s in enumerate(t.shape) if i != skip_axis), t.dtype, str(t.device))
                 for name, t in sorted(feeds.items()))


def _split(x: torch.Tensor, counts: Sequence[int], axis: int = 0) -> List[torch.Tensor]:
    return list(torch.split(x, list(counts), dim=axis))


def _denoiser(models) -> RunBatch:
    """denoising_unet: each request has B = 1 (no CFG) or 2 (CFG: unconditional row, then conditional) rows; the
    batch holds every unconditional row first, then every conditional row, and one bank row per conditional row."""
    from mmgt.unet3d import DenoiserStep

    contract = models.contracts["denoising_unet"]
    names = contract.input_names
    n_masks = len(contract.meta["mask_levels"])
    first_bank = names.index("bank_00")

    def run(requests: Sequence[Feeds]) -> List[Outputs]:
        n, rows = len(requests), requests[0]["sample"].shape[0]
        uncond = rows - 1  # CFG unconditional rows per request (0 or 1)
        args = []
        for i, name in enumerate(names):
            if i >= first_bank:  # the bank: one row per request, for its conditional row
                args.append(torch.cat([r[name] for r in requests]))
            else:  # regrouped: all unconditional rows, then all conditional rows
                parts = [r[name][:uncond] for r in requests] + [r[name][uncond:] for r in requests]
                args.append(torch.cat(parts))
        with torch.no_grad():
            v = DenoiserStep(models.denoising_unet, n_masks, uncond_rows=n * uncond)(*args)  # (n * rows, ...)
        return [{"v": torch.cat([v[i:i + uncond], v[n * uncond + i:n * uncond + i + 1]])} for i in range(n)]

    return run


def _smga(models) -> RunBatch:
    """smga_denoise: a row per request; under guidance the encoded condition has an audio row and a null row per
    request, regrouped as every audio row, then every null row (what guided_denoise takes), with a guidance per row."""
    from mmgt.smga import SMGADenoise

    step = SMGADenoise(models.smga)

    def run(requests: Sequence[Feeds]) -> List[Outputs]:
        n = len(requests)
        cat = lambda name: torch.cat([r[name] for r in requests])  # noqa: E731
        guided = "guidance" in requests[0]
        if guided:
            tokens = torch.cat([r["tokens"][:1] for r in requests] + [r["tokens"][1:] for r in requests])
            hidden = torch.cat([r["hidden"][:1] for r in requests] + [r["hidden"][1:] for r in requests])
        else:
            tokens, hidden = cat("tokens"), cat("hidden")
        with torch.no_grad():
            x0 = step(cat("x_t"), cat("t"), cat("init_pose"), tokens, hidden,
                      cat("guidance") if guided else None)  # (n, W, 402)
        return [{"x0": x0[i:i + 1]} for i in range(n)]

    return run


def _along(models, network: str, input_name: str, output_name: str, axis: int) -> RunBatch:
    """A per-frame network: the requests' frames joined along ``axis`` into one call, then split back."""
    call = models.calls[network]

    def run(requests: Sequence[Feeds]) -> List[Outputs]:
        counts = [r[input_name].shape[axis] for r in requests]
        out = call({input_name: torch.cat([r[input_name] for r in requests], dim=axis)})[output_name]
        return [{output_name: part} for part in _split(out, counts, axis)]

    return run


BATCHED = ("denoising_unet", "smga_denoise", "pose_guider", "audio_proj", "vae_decoder")


def batched(models, max_batch: int = DEFAULT_MAX_BATCH):
    """``models`` with a Batcher on each network of ``BATCHED`` whose call is the contract's torch call; returns the
    new model set (``close_batchers`` stops the workers when it is no longer used)."""
    from mmgt.contract import TorchCall

    plans = {"denoising_unet": (_denoiser, _shape_key),
             "smga_denoise": (_smga, _shape_key),
             "pose_guider": (lambda m: _along(m, "pose_guider", "pose", "pose_features", 0), _shape_key),
             "audio_proj": (lambda m: _along(m, "audio_proj", "audio_windows", "audio_tokens", 1),
                            lambda f: _shape_key(f, skip_axis=1)),
             "vae_decoder": (lambda m: _along(m, "vae_decoder", "latents", "frames", 0), _shape_key)}
    executors = dict(models.executors)
    for name, (make, key) in plans.items():
        if name in models.calls and isinstance(models.calls[name], TorchCall):
            executors[name] = Batcher(name, make(models), key, max_batch)
    import dataclasses

    return dataclasses.replace(models, executors=executors)


def batchers(models) -> Dict[str, Batcher]:
    """The Batchers of a model set, by network."""
    return {name: ex for name, ex in models.calls.items() if isinstance(ex, Batcher)}


def close_batchers(models) -> None:
    for batcher in batchers(models).values():
        batcher.close()


__all__ = ["Batcher", "BATCHED", "batched", "batchers", "close_batchers", "DEFAULT_MAX_BATCH"]
