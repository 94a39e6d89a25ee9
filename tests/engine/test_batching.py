"""Continuous batching across sessions: a batch's rows equal the solo calls, the Batcher collects concurrent callers,
and two sessions rendering at once on a batched model set get their solo frames."""
import dataclasses
import threading
import time

import numpy as np
import pytest
import torch

from engine.backends.batching import BATCHED, Batcher, batched, batchers, close_batchers
from engine.runner import Runner
from engine.settings import LIVE_CPU
from mmgt import pipeline as P
from mmgt.config import TINY
from mmgt.contract import Shapes

SETTINGS = LIVE_CPU.with_(chunk=8, overlap=4, hop=20)


def _requests(contract, n: int, seed: int):
    return [contract.sample_inputs(seed=seed + i) for i in range(n)]


@pytest.mark.parametrize("guidance, smga_guidance", [(1.0, 1.0), (3.5, 2.0)])
def test_a_batch_gives_every_row_its_solo_result(tiny_models, guidance, smga_guidance):
    """Each batched network, with and without classifier-free guidance in both stages: three requests of different
    inputs (banks, masks, tokens, timesteps, guidance) run as one call give each its own solo outputs."""
    models = dataclasses.replace(tiny_models, shapes=Shapes.from_config(TINY, chunk=8, guidance=guidance,
                                                                          smga_guidance=smga_guidance))
    fast = batched(models)
    try:
        for name in BATCHED:
            requests = _requests(models.contracts[name], 3, seed=10)
            if name == "smga_denoise" and smga_guidance != 1.0:  # a guidance of each session's own
                for i, r in enumerate(requests):
                    r["guidance"] = torch.tensor([1.5 + i])
            if name == "audio_proj":  # sessions send different frame counts: joined along the frame axis
                requests = [{k: v[:, : 5 + 3 * i] for k, v in r.items()} for i, r in enumerate(requests)]
            solo = [models.call(name, r) for r in requests]
            together = fast.calls[name].run_batch(requests)
            for a, b in zip(solo, together):
                assert set(a) == set(b)
                for key in a:
                    assert a[key].shape == b[key].shape, (name, key)
                    torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=name)
    finally:
        close_batchers(fast)


def test_concurrent_callers_are_batched_and_each_gets_its_own_rows():
    calls = []

    def slow_double(requests):  # long enough that the other callers queue up behind the first call
        calls.append(len(requests))
        time.sleep(0.05)
        return [{"y": r["x"] * 2} for r in requests]

    b = Batcher("test", slow_double, key=lambda f: tuple(f["x"].shape[1:]), max_batch=4)
    results, errors = {}, []

    def work(i):
        try:
            for k in range(5):
                x = torch.full((1, 3), float(10 * i + k))
                results[(i, k)] = b({"x": x})["y"]
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    b.close()
    assert not errors
    for (i, k), y in results.items():
        assert torch.equal(y, torch.full((1, 3), 2.0 * (10 * i + k)))
    assert max(calls) > 1 and max(calls) <= 4 and sum(calls) == 30  # batched, bounded, every request once
    assert sum(n * c for n, c in b.sizes.items()) == 30


def test_requests_of_other_shapes_wait_for_their_own_batch_and_errors_reach_their_callers():
    seen = []

    def run(requests):
        seen.append(sorted({tuple(r["x"].shape) for r in requests}))
        if any(r["x"].shape[1] == 5 for r in requests):
            raise ValueError("no fives")
        return [{"y": r["x"] + 1} for r in requests]

    b = Batcher("test", run, key=lambda f: tuple(f["x"].shape[1:]))
    assert torch.equal(b({"x": torch.zeros(1, 2)})["y"], torch.ones(1, 2))
    with pytest.raises(ValueError, match="no fives"):
        b({"x": torch.zeros(1, 5)})
    b.close()
    assert all(len(s) == 1 for s in seen)  # a batch never mixes shapes
    with pytest.raises(RuntimeError, match="closed"):
        b({"x": torch.zeros(1, 2)})


def test_two_sessions_on_one_batched_model_set_get_their_solo_frames(tiny_models, portrait, speech,
                                                                      collecting_sink):
    """Two live sessions (their own avatar and audio) rendering at the same time through one batched model set:
    each session's frames equal its solo run on the plain model set (<= 1 level), and calls were batched."""
    shaped = dataclasses.replace(tiny_models, shapes=Shapes.from_settings(TINY, SETTINGS))
    fast = batched(shaped)
    slow = batchers(fast)["denoising_unet"]  # a slower call lets the other session's chunk queue up behind it
    slow.run_batch = (lambda run: lambda requests: time.sleep(0.15) or run(requests))(slow.run_batch)
    images = [portrait, np.ascontiguousarray(portrait[:, ::-1])]
    audios = [speech[: 3 * 16000], speech[4 * 16000: 7 * 16000]]
    try:
        avatars = [P.prepare_avatar(shaped, im) for im in images]
        solo = []
        for avatar, audio in zip(avatars, audios):
            sink = collecting_sink()
            Runner(shaped, avatar, SETTINGS).run(audio, sink)
            solo.append(sink.video())
        sinks = [collecting_sink() for _ in images]
        threads = [threading.Thread(target=lambda i=i: Runner(fast, avatars[i], SETTINGS).run(audios[i], sinks[i]))
                   for i in range(2)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        for i in range(2):
            video = sinks[i].video()
            assert video.shape == solo[i].shape
            assert np.abs(video.astype(int) - solo[i]).max() <= 1, f"session {i} differs from its solo run"
        assert max(slow.sizes) == 2, dict(slow.sizes)  # the two sessions' chunks were denoised in one call
    finally:
        close_batchers(fast)
