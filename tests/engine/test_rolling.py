"""The rolling schedule end to end (tiny preset): the timesteps every frame receives, frames in order, one noise level
equal to the chunk schedule without overlap, a live stream, the CLI flag, and its counted cost at the release size."""
import dataclasses

import numpy as np
import pytest
import torch

from engine.models import for_settings, with_preset_steps
from engine.runner import Runner
from engine.settings import LIVE, OFFLINE, RenderSettings
from engine.types import AudioChunk
from mmgt import pipeline as P

ROLLING = OFFLINE.with_(hop=20, crossfade=4, smga_steps=2, schedule="rolling")


def _recording(models, settings):
    """``models`` (shaped for ``settings``) whose denoiser calls note their timestep input, and that list."""
    shaped = for_settings(models, settings)
    inner, seen = shaped.calls["denoising_unet"], []

    def call(feeds):
        seen.append(feeds["timestep"].detach().cpu().clone())  # (B, N)
        return inner(feeds)

    return dataclasses.replace(shaped, executors={"denoising_unet": call}), seen


def test_every_frame_receives_its_timesteps_in_order_and_frames_leave_in_order(tiny_models, tiny_avatar, speech,
                                                                                 collecting_sink):
    steps, group, frames = 3, 2, 31  # a partial last group
    settings = ROLLING.with_(steps=steps, chunk=steps * group)
    models, seen = _recording(tiny_models, settings)
    sink = collecting_sink()
    report = Runner(models, tiny_avatar, settings).run(speech[: frames * 640], sink)
    # frames leave in order, a group per call, each frame once
    assert report.frames == frames == len(sink.video())
    assert [b.first_frame for b in sink.out] == list(range(0, frames, group))
    assert [b.n_frames for b in sink.out] == [group] * (frames // group) + [frames % group]
    # call k holds the frames from (k - S + 1) * G on: each real frame gets the DDIM timesteps in order, once each
    n_groups = -(-frames // group)
    assert len(seen) == n_groups + steps - 1  # every group enters once, then S - 1 calls drain the pipeline
    expected = P._schedule(tiny_models.cfg.sampler, steps, "cpu").timesteps.tolist()  # [999, 666, 332]
    got = {}
    for k, t in enumerate(seen):
        assert t.shape == (1, steps * group) and torch.equal(t, t[:1].expand_as(t))  # every CFG row alike
        for i, value in enumerate(t[0].tolist()):
            got.setdefault((k - steps + 1) * group + i, []).append(value)
    for f in range(frames):
        assert got[f] == expected, f"frame {f}: {got[f]}"
    # warm-up slots (before frame 0) sit only in the first S - 1 calls, at their slot's level
    assert min(got) == -(steps - 1) * group and all(len(got[f]) < steps for f in got if f < 0)


def test_one_noise_level_equals_the_chunk_schedule_without_overlap(tiny_models, tiny_avatar, speech, collecting_sink):
    """steps=1: a rolling call is one group of pure noise denoised once, i.e. a chunk of that group without overlap."""
    base = ROLLING.with_(steps=1, chunk=5)
    audio = speech[: 37 * 640]
    rolling, chunks = collecting_sink(), collecting_sink()
    Runner(tiny_models, tiny_avatar, base).run(audio, rolling)
    Runner(tiny_models, tiny_avatar, base.with_(schedule="chunk", overlap=0)).run(audio, chunks)
    assert [(b.first_frame, b.n_frames) for b in rolling.out] == [(b.first_frame, b.n_frames) for b in chunks.out]
    np.testing.assert_array_equal(rolling.video(), chunks.video())
    # and the latents of one call, at the pipeline level, to the bit
    models = for_settings(tiny_models, base)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (5, 64, 64, 3), dtype=np.uint8)
    masks = tuple(rng.random((5, 3, n), dtype=np.float32) for n in (64, 16, 4))
    tokens = torch.from_numpy(rng.standard_normal((5, 4, 32), dtype=np.float32))
    one = P.render_rolling(models, tiny_avatar, P.RollingChunk(index=3, first_frame=15, group_size=5,
                                                               pose_frames=frames, masks=masks, audio_tokens=tokens,
                                                               emit_to=5), 1, 1.0, 7)
    ref = P.render_chunk(models, tiny_avatar, P.StageIIChunk(index=3, first_frame=15, pose_frames=frames, masks=masks,
                                                             audio_tokens=tokens, emit_to=5), 1, 1.0, 7)
    assert torch.equal(one.latents, ref.latents) and torch.equal(one.new_latents, ref.new_latents)


def test_live_stream_with_rolling_schedule(tiny_models, tiny_avatar, speech, collecting_sink):
    audio = speech[: 16000 * 2]  # 50 frames, in 2-frame pieces
    live = RenderSettings(hop=10, crossfade=2, lookahead=4, chunk=6, overlap=4, steps=3, smga_steps=2,
                          schedule="rolling")
    pieces = [AudioChunk(samples=audio[i:i + 1280], start_sample=i) for i in range(0, len(audio), 1280)]
    sink = collecting_sink()
    report = Runner(tiny_models, tiny_avatar, live).run_stream(iter(pieces), sink)
    assert report.frames == 50 == len(sink.video())
    assert [b.first_frame for b in sink.out] == list(range(0, 50, 2))
    assert report.chunks == 25 and report.windows == 5
    assert report.latency and all(e.audio_wait >= 0 and e.stage2 >= 0 for e in report.latency)
    again = collecting_sink()
    Runner(tiny_models, tiny_avatar, live).run(audio, again)  # offline: the same frames
    np.testing.assert_array_equal(again.video(), sink.video())


def test_settings_flag_and_checks(tiny_models, tiny_avatar):
    from engine.cli import build_parser
    from engine.options import settings_from

    ap = build_parser()
    args = ap.parse_args(["render", "--image", "a.png", "--audio", "a.wav", "--out", "o.mp4", "--schedule",
                          "rolling", "--chunk", "8"])
    settings = settings_from(args, OFFLINE)
    assert settings.schedule == "rolling" and OFFLINE.schedule == "chunk"
    assert with_preset_steps(settings, args).steps == tiny_models.cfg.sampler.steps  # tiny: 2
    assert with_preset_steps(settings.with_(steps=4), args).steps == 4
    serve = ap.parse_args(["serve", "--schedule", "rolling"])
    assert settings_from(serve, LIVE).schedule == "rolling"
    with pytest.raises(SystemExit):
        ap.parse_args(["serve", "--schedule", "fifo"])
    with pytest.raises(ValueError, match="schedule must be one of chunk, rolling"):
        RenderSettings(schedule="fifo")
    with pytest.raises(ValueError, match="--chunk 7 must be a multiple of --steps 2"):
        Runner(tiny_models, tiny_avatar, ROLLING.with_(chunk=7))
    # a live session's output clock: rolling calls of 4 frames wait 4 frames at most and leave evenly
    live = LIVE.with_(hop=4, lookahead=2, crossfade=2, steps=4)
    rolling, chunked = live.with_(schedule="rolling", chunk=4).structural(), live.with_(chunk=8, overlap=4).structural()
    assert rolling.max <= chunked.max and rolling.swing < chunked.swing and rolling.first < chunked.first


def test_rolling_costs_at_most_0_6_of_the_chunk_schedule_at_the_same_latency():
    """Acceptance: FLOPs per emitted frame counted at the release size (meta device): chunk 8 / overlap 4 denoises
    every frame twice per step; rolling calls of 4 frames at 4 noise levels, the same latency, once."""
    from engine.flops import call_flops, flops_per_frame, latency_frames
    from mmgt.config import MMGT

    chunk = RenderSettings(chunk=8, overlap=4, steps=4)
    rolling = RenderSettings(chunk=4, steps=4, schedule="rolling")
    assert latency_frames(chunk, 4) == latency_frames(rolling, 4) == 4
    c, r = flops_per_frame(MMGT, chunk), flops_per_frame(MMGT, rolling)
    assert r <= 0.6 * c
    assert 0.45 * c <= r  # not cheaper than one step per frame can be
    four, eight = call_flops(MMGT, 4, 1.0), call_flops(MMGT, 8, 1.0)
    assert r == (four["denoising_unet"] + four["pose_guider"]) / 1  # one call per new frame
    assert eight["denoising_unet"] == pytest.approx(2 * four["denoising_unet"], rel=0.02)  # ~linear in frames
    assert 5e12 < four["denoising_unet"] < 6e12  # the README's 22.1 TFLOP per 16-frame step, over 4
