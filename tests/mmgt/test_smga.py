"""Tests of mmgt/smga.py: SMGA network layout and math, its DDIM pose diffusion, and window continuation."""
from __future__ import annotations

import dataclasses
import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmgt.config import MMGT, POSE_DIM, TINY, SMGAConfig
from mmgt.smga import (
    SMGA, RotaryEmbedding, RotaryMultiheadAttention, SMGADiffusion, build_smga, continue_from, cosine_betas,
    crossfade, ddim_time_pairs, release_state_dict, split_streams,
)

CFG = TINY.smga  # latent 64, 2 layers, 4 heads, window 80
W = CFG.window


def _inputs(b: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(b, W, POSE_DIM, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    pose = torch.rand(b, POSE_DIM, generator=g) * 2 - 1
    cond = torch.randn(b, W, CFG.audio_dim, generator=g)
    return x_t, t, pose, cond


@pytest.fixture(scope="module")
def model() -> SMGA:
    return build_smga(CFG, seed=0)


# ---------------------------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------------------------

def test_release_keys_and_shapes_match_json(release_keys):
    ref = release_keys("smga_gesture_decoder_keys_shapes.json")
    with torch.device("meta"):
        m = SMGA(MMGT.smga)
    got = {k: tuple(v.shape) for k, v in release_state_dict(m).items()}
    assert len(ref) == 473
    assert sorted(set(ref) - set(got)) == []  # missing
    assert sorted(set(got) - set(ref)) == []  # unexpected
    assert [k for k in ref if got[k] != ref[k]] == []  # shape mismatches
    # the spec's parameter count (90.0 M) is a second, independent check of the widths
    assert round(sum(p.numel() for p in m.parameters()) / 1e6, 1) == 90.0


def test_state_dict_loads_strictly_into_a_fresh_model(model):
    other = build_smga(CFG, seed=5)
    assert not torch.equal(other.final_layer.weight, model.final_layer.weight)
    result = other.load_state_dict(model.state_dict(), strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    x_t, t, pose, cond = _inputs()
    with torch.no_grad():
        assert torch.equal(other(x_t, t, pose, cond), model(x_t, t, pose, cond))


def test_rotary_buffer_is_shared_and_has_the_reference_values(model):
    sd = model.state_dict()
    d = CFG.latent_dim
    expected = torch.tensor([1.0 / 10000 ** (2 * i / d) for i in range(d // 2)], dtype=torch.float32)
    for key in ["rotary.freqs", "cond_encoder.0.rotary.freqs", "seqTransDecoder.stack.1.rotary.freqs"]:
        torch.testing.assert_close(sd[key], expected, rtol=1e-6, atol=0)
    assert model.seqTransDecoder.stack[0].rotary is model.rotary is model.cond_encoder[0].rotary


# ---------------------------------------------------------------------------------------------------------------
# Building blocks against hand computations / torch's own modules
# ---------------------------------------------------------------------------------------------------------------

def test_rotary_rotates_interleaved_pairs_by_position():
    d = 8
    rot = RotaryEmbedding(d)
    x = torch.randn(2, 5, d)
    y = rot.rotate_queries_or_keys(x)
    for p in range(5):
        for i in range(d // 2):
            ang = p / 10000 ** (2 * i / d)
            x0, x1 = x[:, p, 2 * i], x[:, p, 2 * i + 1]
            torch.testing.assert_close(y[:, p, 2 * i], x0 * math.cos(ang) - x1 * math.sin(ang), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(y[:, p, 2 * i + 1], x1 * math.cos(ang) + x0 * math.sin(ang),
                                       rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y[:, 0], x[:, 0])  # position 0 is not rotated


def test_attention_equals_nn_multiheadattention():
    torch.manual_seed(0)
    d, h = 32, 4
    mha = nn.MultiheadAttention(d, h, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    ours = RotaryMultiheadAttention(d, h).eval()
    ours.load_state_dict(mha.state_dict(), strict=True)  # same key names
    q, k, v = torch.randn(3, 7, d), torch.randn(3, 11, d), torch.randn(3, 11, d)
    with torch.no_grad():
        torch.testing.assert_close(ours(q, k, v), mha(q, k, v, need_weights=False)[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours(q, q, k[:, :7]), mha(q, q, k[:, :7], need_weights=False)[0],
                                   rtol=1e-5, atol=1e-6)


def test_split_streams_on_a_hand_made_vector():
    x = torch.arange(1, POSE_DIM + 1, dtype=torch.float32)  # value i+1 at index i, never 0
    face, body = split_streams(x)
    idx = torch.arange(POSE_DIM)
    in_face = (idx >= 24 * 3) & (idx < 92 * 3)  # keypoints 24-91, all of x, y, score
    assert torch.equal(face, torch.where(in_face, x, torch.zeros(())))
    assert torch.equal(body, torch.where(in_face, torch.zeros(()), x))
    assert int((face != 0).sum()) == 68 * 3 and int((body != 0).sum()) == 66 * 3
    # first/last face values: keypoint 24's x (index 72) and keypoint 91's score (index 275)
    assert face[71] == 0 and face[72] == 73 and face[275] == 276 and face[276] == 0


def test_face_stream_input_ignores_body_keypoints_only_through_masking(model):
    x_t, _, pose, _ = _inputs(b=1)
    face_in, body_in = model.stream_inputs(x_t, pose)
    assert face_in.shape == body_in.shape == (1, W, 2 * POSE_DIM)
    # the initial pose half is the masked pose, repeated on every frame
    f_pose, b_pose = split_streams(pose)
    assert torch.equal(face_in[:, :, POSE_DIM:], f_pose[:, None].expand(-1, W, -1))
    assert torch.equal(body_in[:, :, POSE_DIM:], b_pose[:, None].expand(-1, W, -1))
    # changing body keypoints changes the body stream only; changing the face changes the face stream only
    face_vals = torch.zeros(POSE_DIM, dtype=torch.bool)
    face_vals[72:276] = True
    x_body_changed = torch.where(face_vals, x_t, x_t + 5.0)
    f2, b2 = model.stream_inputs(x_body_changed, pose)
    assert torch.equal(f2, face_in) and not torch.equal(b2, body_in)
    x_face_changed = torch.where(face_vals, x_t + 5.0, x_t)
    f3, b3 = model.stream_inputs(x_face_changed, pose)
    assert torch.equal(b3, body_in) and not torch.equal(f3, face_in)


# ---------------------------------------------------------------------------------------------------------------
# The whole network against an independent transcription of the reference forward
# ---------------------------------------------------------------------------------------------------------------

def _ref_rotate(freqs, x):
    # lucidrains: freqs einsum + repeat '(n r)', rotate_half on '(d r)' pairs
    pos = torch.arange(x.shape[-2], dtype=freqs.dtype)
    f = torch.einsum("n,f->nf", pos, freqs)
    f = torch.stack([f, f], dim=-1).reshape(f.shape[0], -1)
    xr = x.reshape(*x.shape[:-1], -1, 2)
    rot = torch.stack((-xr[..., 1], xr[..., 0]), dim=-1).reshape(x.shape)
    return x * f.cos() + rot * f.sin()


def _ref_forward(sd, cfg: SMGAConfig, x, cond_frame, cond, times, drop: bool):
    """The reference GestureDecoder.forward written out with nn.MultiheadAttention (eval, batch-first)."""
    d, h = cfg.latent_dim, cfg.num_heads
    freqs = sd["rotary.freqs"]

    def mha(prefix, q, k, v):
        m = nn.MultiheadAttention(d, h, batch_first=True).eval()
        m.load_state_dict({n: sd[f"{prefix}.{n}"] for n in m.state_dict()})
        return m(q, k, v, need_weights=False)[0]

    def lin(prefix, x):
        return F.linear(x, sd[f"{prefix}.weight"], sd[f"{prefix}.bias"])

    def ln(prefix, x):
        return F.layer_norm(x, (d,), sd[f"{prefix}.weight"], sd[f"{prefix}.bias"])

    def film(prefix, t, y):
        scale, shift = lin(f"{prefix}.block.1", F.mish(t))[:, None].chunk(2, dim=-1)
        return (scale + 1) * y + shift

    b, n = x.shape[:2]
    mask = torch.ones(b, n, 134, 3)
    mask[:, :, 24:92] = 0
    kp = x.reshape(b, n, 134, 3)
    face_x, body_x = (kp * (1 - mask)).reshape(b, n, -1), (kp * mask).reshape(b, n, -1)
    cf = cond_frame[:, None].reshape(b, 1, 134, 3)
    face_cf, body_cf = (cf * (1 - mask[:, :1])).reshape(b, 1, -1), (cf * mask[:, :1]).reshape(b, 1, -1)
    x_face = lin("input_projection", torch.cat([face_x, face_cf.repeat(1, n, 1)], -1))
    x_body = lin("input_projection", torch.cat([body_x, body_cf.repeat(1, n, 1)], -1))

    tok = lin("cond_projection", cond)
    for i in range(cfg.cond_layers):
        p = f"cond_encoder.{i}"
        hh = ln(f"{p}.norm1", tok)
        qk = _ref_rotate(freqs, hh)
        tok = tok + mha(f"{p}.self_attn", qk, qk, hh)
        tok = tok + lin(f"{p}.linear2", F.gelu(lin(f"{p}.linear1", ln(f"{p}.norm2", tok))))
    keep = torch.full((b, 1, 1), not drop)
    tok = torch.where(keep, tok, sd["null_cond_embed"])
    hidden = tok.mean(dim=-2)
    hidden = lin("non_attn_cond_projection.3", F.silu(lin("non_attn_cond_projection.1",
                                                          ln("non_attn_cond_projection.0", hidden))))
    half = d // 2
    emb = torch.exp(torch.arange(half) * -(math.log(10000) / (half - 1)))
    emb = times[:, None] * emb[None]
    t_hidden = F.mish(lin("time_mlp.1", torch.cat((emb.sin(), emb.cos()), -1)))
    t = lin("to_time_cond.0", t_hidden)
    t_tokens = lin("to_time_tokens.0", t_hidden).reshape(b, 2, d)
    t = t + torch.where(keep[:, 0], hidden, sd["null_cond_hidden"])
    mem = ln("norm_cond", torch.cat((tok, t_tokens), dim=-2))

    for i in range(cfg.num_layers):
        p = f"seqTransDecoder.stack.{i}"
        outs = []
        for s, xs in (("face", x_face), ("body", x_body)):
            hh = ln(f"{p}.norm_{s}_1", xs)
            qk = _ref_rotate(freqs, hh)
            xs = xs + film(f"{p}.film_{s}_1", t, mha(f"{p}.{s}_self_attn", qk, qk, hh))
            hh = ln(f"{p}.norm_{s}_2", xs)
            xs = xs + film(f"{p}.film_{s}_2", t, mha(f"{p}.{s}_cross_attn", _ref_rotate(freqs, hh),
                                                     _ref_rotate(freqs, mem), mem))
            outs.append(xs)
        merged = outs[0] + outs[1]
        ff = lin(f"{p}.linear2", F.gelu(lin(f"{p}.linear1", ln(f"{p}.norm_final", merged))))
        x_face = merged + film(f"{p}.film_final", t, ff)  # x_body stays the layer-0 input
    return lin("final_layer", x_face)


@pytest.mark.parametrize("with_audio", [True, False])
def test_forward_matches_reference_transcription(model, with_audio):
    x_t, t, pose, cond = _inputs()
    sd = model.state_dict()
    with torch.no_grad():
        ours = model(x_t, t, pose, cond if with_audio else None)
        ref = _ref_forward(sd, CFG, x_t, pose, cond, t, drop=not with_audio)
    assert ours.shape == (2, W, POSE_DIM)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_output_depends_on_audio_and_initial_pose(model):
    x_t, t, pose, cond = _inputs()
    with torch.no_grad():
        base = model(x_t, t, pose, cond)
        other_audio = model(x_t, t, pose, cond.flip(1))
        other_pose = model(x_t, t, pose.flip(0), cond)
        null = model(x_t, t, pose, None)
        float_t = model(x_t, t.float(), pose, cond)
    assert base.shape == (2, W, POSE_DIM) and torch.isfinite(base).all()
    assert (base - other_audio).abs().max() > 1e-3
    assert (base - other_pose).abs().max() > 1e-3
    assert (base - null).abs().max() > 1e-3
    torch.testing.assert_close(float_t, base)


def test_bad_shapes_are_rejected_with_a_message(model):
    x_t, t, pose, cond = _inputs()
    with pytest.raises(ValueError, match="init_pose"):
        model(x_t, t, pose[:, :10], cond)
    with pytest.raises(ValueError, match="audio condition"):
        model(x_t, t, pose, cond[..., :5])
    with pytest.raises(ValueError, match="null condition"):
        model(x_t[:, :40], t, pose, None)


# ---------------------------------------------------------------------------------------------------------------
# Guidance
# ---------------------------------------------------------------------------------------------------------------

def test_guided_forward_combines_uncond_and_cond(model):
    x_t, t, pose, cond = _inputs()
    with torch.no_grad():
        c = model(x_t, t, pose, cond)
        u = model(x_t, t, pose, None)
        torch.testing.assert_close(model.guided_forward(x_t, t, pose, cond, 2.0), u + (c - u) * 2, rtol=1e-5,
                                   atol=1e-5)
        torch.testing.assert_close(model.guided_forward(x_t, t, pose, cond, 0.0), u, rtol=1e-5, atol=1e-5)
        assert torch.equal(model.guided_forward(x_t, t, pose, cond, 1.0), c)


def _count_decoder_passes(model):
    batches = []
    handle = model.final_layer.register_forward_hook(lambda m, i, o: batches.append(i[0].shape[0]))
    return batches, handle


@pytest.mark.parametrize("guidance, per_step_batch", [(1.0, 2), (2.0, 4)])
def test_guidance_one_means_one_pass_per_step(model, guidance, per_step_batch):
    _, _, pose, cond = _inputs()
    batches, handle = _count_decoder_passes(model)
    try:
        SMGADiffusion(CFG).sample(model, cond, pose, steps=3, guidance=guidance, generator=torch.Generator())
    finally:
        handle.remove()
    # exactly one decoder pass per step; with CFG it carries cond + uncond batched together
    assert batches == [per_step_batch] * 3


def test_single_step_sample_is_the_clamped_guided_x0(model):
    _, _, pose, cond = _inputs()
    diff = SMGADiffusion(CFG)
    out = diff.sample(model, cond, pose, steps=1, guidance=2.0, generator=torch.Generator().manual_seed(7))
    x_T = torch.randn(2, W, POSE_DIM, generator=torch.Generator().manual_seed(7))
    t = torch.full((2,), 999, dtype=torch.long)
    with torch.no_grad():
        c, u = model(x_T, t, pose, cond), model(x_T, t, pose, None)
    torch.testing.assert_close(out, (u + (c - u) * 2).clamp(-1, 1), rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_sample_encodes_the_condition_once_and_equals_the_per_step_forward(model, guidance):
    """The audio condition does not depend on x_t or t: sampling encodes it once per window, and the result is
    bit-identical to a DDIM loop that calls the full guided forward (encode + denoise) at every step."""
    _, _, pose, cond = _inputs()
    diff = SMGADiffusion(CFG)
    encodes = []
    handle = model.cond_projection.register_forward_hook(lambda m, i, o: encodes.append(1))
    try:
        out = diff.sample(model, cond, pose, steps=4, guidance=guidance, generator=torch.Generator().manual_seed(3))
    finally:
        handle.remove()
    assert len(encodes) == 1
    # the reference loop, written out: guided_forward at every step, the same draws in the same order
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, W, POSE_DIM, generator=gen)
    pairs = ddim_time_pairs(4, CFG.diffusion_steps)
    with torch.no_grad():
        for t, t_next in pairs:
            x0 = model.guided_forward(x, torch.full((2,), t, dtype=torch.long), pose, cond, guidance).clamp(-1, 1)
            x = x0 if t_next < 0 else diff.ddim_step(x, x0, t, t_next, CFG.eta,
                                                     torch.randn(2, W, POSE_DIM, generator=gen) if CFG.eta > 0
                                                     else None)
    assert torch.equal(out, x)


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_contract_calls_sample_like_the_model(model, guidance):
    """The engine's path -- smga_condition once per window, smga_denoise per step, both called by name through their
    contracts -- samples exactly what SMGADiffusion.sample does with the model."""
    from mmgt.config import get_preset
    from mmgt.contract import Shapes
    from mmgt.smga import smga_contracts

    _, _, pose, cond = _inputs()
    pose, cond = pose[:1], cond[:1]
    cfg = dataclasses.replace(get_preset("tiny"), smga=CFG)
    shapes = Shapes.from_config(cfg, smga_guidance=guidance)
    contracts = {c.name: c for c in smga_contracts(cfg, shapes)}
    holder = types.SimpleNamespace(smga=model)
    condition, step = (contracts[n].torch_call(holder) for n in ("smga_condition", "smga_denoise"))
    encoded = condition({"cond": cond})
    assert tuple(encoded["tokens"].shape) == (shapes.smga_batch, W, CFG.latent_dim)
    extra = {"guidance": torch.tensor([guidance])} if shapes.smga_batch == 2 else {}

    def denoise(x, t):
        return step({"x_t": x, "t": t.float(), "init_pose": pose, **encoded, **extra})["x0"]

    diff = SMGADiffusion(CFG)
    out = diff.sample_encoded(denoise, 1, W, "cpu", steps=3, generator=torch.Generator().manual_seed(1))
    ref = diff.sample(model, cond, pose, steps=3, guidance=guidance, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, ref)


# ---------------------------------------------------------------------------------------------------------------
# Diffusion schedule and sampling
# ---------------------------------------------------------------------------------------------------------------

def test_cosine_schedule_by_hand():
    diff = SMGADiffusion(MMGT.smga)
    s = 0.008

    def f(t):
        return math.cos((t / 1000 + s) / (1 + s) * math.pi / 2) ** 2

    ac = diff.alphas_cumprod
    assert ac.dtype == torch.float32 and ac.shape == (1000,)
    assert math.isclose(float(ac[0]), f(1) / f(0), rel_tol=1e-6)  # ~0.99996
    # the last beta (1 - f(1000)/f(999) = 1, since cos(pi/2) = 0) is clipped to 0.999
    assert math.isclose(float(diff.betas[-1]), 0.999, rel_tol=1e-6)
    assert math.isclose(float(ac[-1]), f(999) / f(0) * 0.001, rel_tol=1e-4)
    assert float(cosine_betas(1000).max()) == pytest.approx(0.999)
    assert bool((diff.betas[:-1] < 0.999).all())


def test_ddim_time_pairs_follow_edge():
    p50 = ddim_time_pairs(50)
    assert p50[0] == (999, 979) and p50[1] == (979, 959) and p50[-1] == (19, -1) and len(p50) == 50
    assert ddim_time_pairs(1) == [(999, -1)]
    assert ddim_time_pairs(3) == [(999, 665), (665, 332), (332, -1)]  # int() truncation of the float linspace
    p1000 = ddim_time_pairs(1000)
    assert len(p1000) == 1000 and p1000[0] == (999, 998) and p1000[-1] == (0, -1)
    for bad in (0, 1001, 2.5):
        with pytest.raises(ValueError, match="steps"):
            ddim_time_pairs(bad)


def test_ddim_step_eta0_moves_along_the_same_noise():
    diff = SMGADiffusion(MMGT.smga)
    x0 = torch.rand(1, 4, POSE_DIM) * 2 - 1
    eps = torch.randn(1, 4, POSE_DIM)
    t, t_next = 700, 300
    a, an = diff.alphas_cumprod[t], diff.alphas_cumprod[t_next]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    torch.testing.assert_close(diff.ddim_step(x_t, x0, t, t_next, 0.0, None), an.sqrt() * x0 + (1 - an).sqrt() * eps,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("steps", [1, 50])
def test_sample_runs_and_stays_in_range(model, steps):
    _, _, pose, cond = _inputs(b=1)
    out = SMGADiffusion(CFG).sample(model, cond, pose, steps=steps, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, W, POSE_DIM)
    assert torch.isfinite(out).all() and out.min() >= -1 and out.max() <= 1


def test_sampling_is_reproducible_with_a_generator():
    _, _, pose, cond = _inputs()
    diff = SMGADiffusion(CFG)
    m1, m2 = build_smga(CFG, seed=3), build_smga(CFG, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    a = diff.sample(m1, cond, pose, steps=4, generator=torch.Generator().manual_seed(11))
    b = diff.sample(m2, cond, pose, steps=4, generator=torch.Generator().manual_seed(11))
    c = diff.sample(m1, cond, pose, steps=4, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_build_smga_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    model = build_smga(CFG, seed=9)
    assert torch.equal(torch.rand(3), expected)
    assert not model.training
    assert build_smga(TINY).cfg == TINY.smga  # an MMGTConfig works too


# ---------------------------------------------------------------------------------------------------------------
# Continuation
# ---------------------------------------------------------------------------------------------------------------

def test_continue_from_picks_the_last_frame():
    win = np.arange(80 * POSE_DIM, dtype=np.float32).reshape(80, POSE_DIM)
    assert np.array_equal(continue_from(win), win[79])
    batch = torch.arange(2 * 80 * POSE_DIM, dtype=torch.float32).reshape(2, 80, POSE_DIM)
    got = continue_from(batch)
    assert got.shape == (2, POSE_DIM) and torch.equal(got, batch[:, 79])
    with pytest.raises(ValueError, match="continue_from"):
        continue_from(np.zeros((80, 10)))


def test_crossfade_linear_weights():
    prev = np.zeros((3, POSE_DIM), np.float32)
    nxt = np.ones((3, POSE_DIM), np.float32) * 4
    out = crossfade(prev, nxt)
    assert out.dtype == np.float32
    assert np.allclose(out[:, 0], [1.0, 2.0, 3.0])  # weights 1/4, 2/4, 3/4 towards the next window
    one = crossfade(torch.full((1, POSE_DIM), 2.0), torch.full((1, POSE_DIM), 4.0))
    assert torch.equal(one, torch.full((1, POSE_DIM), 3.0))
    with pytest.raises(ValueError, match="crossfade"):
        crossfade(prev, nxt[:2])
