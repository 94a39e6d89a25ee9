"""mmgt.speech_encoders: WavLM (incl. the unilm checkpoint remap) and wav2vec2 at 25 fps, SMGA's audio condition,
and the feature paths called from many threads on one shared model. Tiny seeded models."""
import json
import threading

import numpy as np
import pytest
import torch

from mmgt import speech_encoders as A
from mmgt.acoustic import librosa_features
from mmgt.audio_io import AudioError, frames_for_samples
from mmgt.config import TINY, WavLMConfig, replace

# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wavlm():
    return A.build_wavlm(TINY.wavlm, seed=0)


@pytest.fixture(scope="module")
def w2v():
    return A.build_wav2vec2(TINY.wav2vec2, seed=0)


def noise(n, seed=0):
    return (0.1 * np.random.RandomState(seed).randn(n)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# WavLM
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_samples", [100, 6401, 12345, 51200])
def test_wavlm_features_exact_frame_counts(wavlm, n_samples):
    n_frames = frames_for_samples(n_samples)
    feats = A.wavlm_features(wavlm, noise(n_samples), n_frames)
    assert feats.shape == (n_frames, TINY.wavlm.hidden_size) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all()


def test_wavlm_features_follow_the_reference_50_to_25_fps(wavlm):
    wav = noise(51_200, seed=1)  # 3.2 s
    x = torch.from_numpy(wav)[None]
    x = torch.nn.functional.layer_norm(x, x.shape[-1:])  # unilm cfg.normalize
    with torch.no_grad():
        hidden = wavlm(input_values=x).last_hidden_state[0]  # (159, H) at 50 fps
    assert hidden.shape[0] == 159
    padded = torch.cat([hidden, hidden[-1:]])  # 160 rows, reference repeats the last frame
    feats = A.wavlm_features(wavlm, wav, 80)  # ceil(160 / 2) = 80 as in the reference
    # 160 -> 80 with align_corners: positions i * 159 / 79, so the ends are exact and the rest interpolate
    torch.testing.assert_close(feats[0], padded[0])
    torch.testing.assert_close(feats[-1], padded[-1])
    pos = 40 * 159 / 79
    lo = int(pos)
    torch.testing.assert_close(feats[40], padded[lo] * (lo + 1 - pos) + padded[lo + 1] * (pos - lo))
    # 2k-1 rows -> k rows picks every other row exactly
    feats_odd = A.wavlm_features(wavlm, wav[:50_880], 80)  # 158 frames + 1 = 159 rows -> 80
    with torch.no_grad():
        h2 = wavlm(input_values=torch.nn.functional.layer_norm(torch.from_numpy(wav[:50_880])[None], (50_880,))
                   ).last_hidden_state[0]
    rows = torch.cat([h2, h2[-1:]])
    assert rows.shape[0] == 159
    torch.testing.assert_close(feats_odd, rows[::2])


def test_build_is_deterministic_given_a_seed():
    a = A.build_wavlm(TINY.wavlm, seed=3).state_dict()
    b = A.build_wavlm(TINY.wavlm, seed=3).state_dict()
    c = A.build_wavlm(TINY.wavlm, seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    before = torch.random.get_rng_state()
    A.build_wav2vec2(TINY.wav2vec2, seed=1)
    assert torch.equal(before, torch.random.get_rng_state())  # the global RNG is left alone


def unilm_cfg(cfg: WavLMConfig, normalize=True):
    """What WavLM-Large.pt's 'cfg' holds, at ``cfg``'s sizes."""
    return {
        "extractor_mode": "layer_norm", "encoder_layers": cfg.num_layers, "encoder_embed_dim": cfg.hidden_size,
        "encoder_ffn_embed_dim": cfg.intermediate_size, "encoder_attention_heads": cfg.num_heads,
        "activation_fn": "gelu", "layer_norm_first": True,
        "conv_feature_layers": f"[({cfg.conv_dim[0]},10,5)] + [({cfg.conv_dim[0]},3,2)] * 4 + "
                               f"[({cfg.conv_dim[0]},2,2)] * 2",
        "conv_bias": False, "normalize": normalize, "conv_pos": 128, "conv_pos_groups": 16,
        "relative_position_embedding": True, "num_buckets": cfg.num_buckets, "max_distance": cfg.max_bucket_distance,
        "gru_rel_pos": True,
    }


def test_unilm_checkpoint_round_trip(tmp_path):
    # conv width 24 != hidden 32, so the unilm model has post_extract_proj as WavLM-Large does
    cfg = replace(TINY.wavlm, conv_dim=(24,) * 7)
    model = A.build_wavlm(cfg, seed=7)
    unilm_sd, unmatched = A.remap_state_dict(model.state_dict(), A.WAVLM_HF_TO_UNILM)
    assert unmatched == []
    # the names are unilm's
    assert "encoder.layers.0.self_attn.relative_attention_bias.weight" in unilm_sd
    assert "feature_extractor.conv_layers.3.2.1.weight" in unilm_sd
    assert {"post_extract_proj.weight", "mask_emb", "encoder.pos_conv.0.weight_g", "encoder.pos_conv.0.weight_v",
            "encoder.layers.1.self_attn.grep_a", "encoder.layers.1.fc1.weight", "layer_norm.bias"} <= set(unilm_sd)
    assert not any("attention." in k or "feed_forward" in k for k in unilm_sd)

    path = tmp_path / "WavLM-Large.pt"
    torch.save({"cfg": unilm_cfg(cfg), "model": {k: v.clone() for k, v in unilm_sd.items()}}, path)
    loaded = A.load_wavlm(path, cfg)
    assert not loaded.training and loaded.config.normalize_input is True
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    wav = noise(9_999, seed=2)
    assert torch.equal(A.wavlm_features(loaded, wav, 16), A.wavlm_features(model, wav, 16))

    # the checkpoint's normalize flag travels with the model
    torch.save({"cfg": unilm_cfg(cfg, normalize=False), "model": unilm_sd}, path)
    raw = A.load_wavlm(path, cfg)
    assert raw.config.normalize_input is False
    assert torch.equal(A.wavlm_features(raw, wav, 16), A.wavlm_features(model, wav, 16, normalize=False))


def test_unilm_checkpoint_safetensors_twin(tmp_path, monkeypatch):
    """`engine weights convert` of WavLM-Large.pt: the twin carries the state dict and the cfg, and load_wavlm reads
    it without unpickling."""
    from mmgt.weights import read_checkpoint, write_twin

    cfg = replace(TINY.wavlm, conv_dim=(24,) * 7)
    model = A.build_wavlm(cfg, seed=7)
    unilm_sd, _ = A.remap_state_dict(model.state_dict(), A.WAVLM_HF_TO_UNILM)
    path = tmp_path / "WavLM-Large.pt"
    torch.save({"cfg": unilm_cfg(cfg, normalize=False), "model": unilm_sd}, path)
    twin = write_twin(path, *A.wavlm_twin_content(read_checkpoint(path), path))
    assert twin.name == "WavLM-Large.safetensors"

    def no_unpickling(*a, **k):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    loaded = A.load_wavlm(path, cfg)
    assert loaded.config.normalize_input is False  # the cfg travelled in the metadata
    wav = noise(9_999, seed=2)
    assert torch.equal(A.wavlm_features(loaded, wav, 16), A.wavlm_features(model, wav, 16, normalize=False))
    with pytest.raises(ValueError, match=r"WavLM-Large\.safetensors: no 'unilm_cfg' metadata"):
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, str(tmp_path / "WavLM-Large.safetensors"))
        A.read_wavlm_twin(tmp_path / "WavLM-Large.safetensors")


def test_unilm_without_post_extract_proj_loads_as_identity(tmp_path):
    cfg = TINY.wavlm  # conv width 32 == hidden 32: unilm builds no post_extract_proj
    model = A.build_wavlm(cfg, seed=5)
    with torch.no_grad():
        model.feature_projection.projection.weight.copy_(torch.eye(32))
        model.feature_projection.projection.bias.zero_()
    unilm_sd, _ = A.remap_state_dict(model.state_dict(), A.WAVLM_HF_TO_UNILM)
    del unilm_sd["post_extract_proj.weight"], unilm_sd["post_extract_proj.bias"]
    torch.save({"cfg": unilm_cfg(cfg), "model": unilm_sd}, tmp_path / "w.pt")
    loaded = A.load_wavlm(tmp_path / "w.pt", cfg)
    wav = noise(4_000, seed=3)
    assert torch.equal(A.wavlm_features(loaded, wav, 7), A.wavlm_features(model, wav, 7))


def test_unilm_checkpoint_errors_name_keys_and_sizes(tmp_path):
    cfg = replace(TINY.wavlm, conv_dim=(24,) * 7)
    unilm_sd, _ = A.remap_state_dict(A.build_wavlm(cfg, seed=0).state_dict(), A.WAVLM_HF_TO_UNILM)
    bad = dict(unilm_sd)
    del bad["encoder.layers.1.fc2.bias"]
    bad["encoder.layers.1.extra_gate.weight"] = torch.zeros(2)
    torch.save({"cfg": unilm_cfg(cfg), "model": bad}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad\.pt") as err:
        A.load_wavlm(tmp_path / "bad.pt", cfg)
    assert "encoder.layers.1.feed_forward.output_dense.bias" in str(err.value)  # missing, in transformers names
    assert "encoder.layers.1.extra_gate.weight" in str(err.value)  # unexpected, as found

    torch.save({"cfg": unilm_cfg(cfg), "model": unilm_sd}, tmp_path / "ok.pt")
    with pytest.raises(ValueError, match=r"num_layers: checkpoint 2 != config 3"):
        A.load_wavlm(tmp_path / "ok.pt", replace(cfg, num_layers=3))

    torch.save({"weights": unilm_sd}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match=r"plain\.pt.*not a unilm WavLM checkpoint"):
        A.load_wavlm(tmp_path / "plain.pt", cfg)
    with pytest.raises(ValueError, match=r"no config\.json"):
        A.load_wavlm(tmp_path, cfg)


def test_transformers_directories_load_local(tmp_path, wavlm, w2v):
    wavlm.save_pretrained(tmp_path / "wavlm")
    w2v.save_pretrained(tmp_path / "w2v")
    (tmp_path / "w2v" / "preprocessor_config.json").write_text(json.dumps({"do_normalize": False}))
    wav = noise(7_000, seed=4)
    lw = A.load_wavlm(tmp_path / "wavlm", TINY.wavlm)
    assert torch.equal(A.wavlm_features(lw, wav, 11), A.wavlm_features(wavlm, wav, 11))
    lv = A.load_wav2vec2(tmp_path / "w2v", TINY.wav2vec2)
    assert lv.config.normalize_input is False
    assert torch.equal(A.wav2vec2_features(lv, wav, 11), A.wav2vec2_features(w2v, wav, 11, normalize=False))
    with pytest.raises(ValueError, match="hidden_size: model 32 != config 48"):
        A.load_wav2vec2(tmp_path / "w2v", replace(TINY.wav2vec2, hidden_size=48))
    with pytest.raises(ValueError, match="no config.json"):
        A.load_wav2vec2(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# wav2vec2
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_samples", [100, 6401, 12345])
def test_wav2vec2_features_exact_frame_counts(w2v, n_samples):
    n_frames = frames_for_samples(n_samples)
    feats = A.wav2vec2_features(w2v, noise(n_samples), n_frames)
    assert feats.shape == (n_frames, TINY.wav2vec2.num_layers, TINY.wav2vec2.hidden_size)
    assert feats.dtype == torch.float32 and torch.isfinite(feats).all()


def test_wav2vec2_features_match_transformers_hidden_states(w2v):
    wav = noise(12_345, seed=6)
    x = torch.from_numpy(wav)[None]
    x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)  # Wav2Vec2FeatureExtractor normalisation
    with torch.no_grad():
        out = w2v(x, output_hidden_states=True)
    n_cnn = out.last_hidden_state.shape[1]
    # at the CNN's own frame count the interpolation is the identity: transformers' hidden_states[1:] exactly
    ours = A.wav2vec2_features(w2v, wav, n_cnn)
    torch.testing.assert_close(ours, torch.stack(out.hidden_states[1:], dim=2)[0], rtol=0, atol=1e-6)
    # at 25 fps the CNN features are interpolated BEFORE the transformer (different from resampling its output)
    at25 = A.wav2vec2_features(w2v, wav, 20)
    after = torch.nn.functional.interpolate(ours.permute(1, 2, 0), size=20, mode="linear", align_corners=True)
    assert at25.shape == (20, 2, 32) and not torch.allclose(at25, after.permute(2, 0, 1), atol=1e-3)


def test_bad_waveforms_are_refused(w2v):
    with pytest.raises(AudioError, match="empty"):
        A.wav2vec2_features(w2v, np.zeros(0, np.float32), 4)
    with pytest.raises(AudioError, match="1-D"):
        A.wav2vec2_features(w2v, np.zeros((2, 100), np.float32), 4)
    with pytest.raises(AudioError, match="NaN"):
        librosa_features(np.full(1000, np.nan, np.float32), 4)
    with pytest.raises(AudioError, match="n_frames"):
        A.wav2vec2_features(w2v, noise(1000), 0)


@pytest.fixture(scope="module")
def w2v_pre_norm():
    """The tiny wav2vec2 with a pre-norm transformer (Wav2Vec2EncoderStableLayerNorm, as wav2vec2-large-lv60)."""
    from transformers import Wav2Vec2Model

    from mmgt.seeding import seeded

    hf = A._hf_wav2vec2_config(TINY.wav2vec2)
    hf.do_stable_layer_norm, hf.feat_extract_norm = True, "layer"
    with seeded(1):
        return Wav2Vec2Model(hf).eval()


@pytest.mark.parametrize("variant", ["post_norm", "pre_norm"])
def test_wav2vec2_encoder_pass_equals_transformers_for_both_encoder_variants(w2v, w2v_pre_norm, variant):
    model = w2v if variant == "post_norm" else w2v_pre_norm
    expected_encoder = "Wav2Vec2Encoder" if variant == "post_norm" else "Wav2Vec2EncoderStableLayerNorm"
    assert type(model.encoder).__name__ == expected_encoder
    wav = noise(16_000, seed=8)
    x = torch.from_numpy(wav)[None]
    x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
    n_cnn = out.last_hidden_state.shape[1]  # 49: at the CNN's own frame count nothing is interpolated
    ours = A.wav2vec2_features(model, wav, n_cnn)
    assert ours.shape == (n_cnn, TINY.wav2vec2.num_layers, TINY.wav2vec2.hidden_size)
    # every layer's output; the last one carries the pre-norm encoder's final LayerNorm, as last_hidden_state does
    # (transformers 4.x's hidden_states[-1] too; 5.x records the last layer's output before that LayerNorm)
    expected = torch.stack([*out.hidden_states[1:-1], out.last_hidden_state], dim=2)[0]  # (T, L, H)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    if variant == "post_norm":  # no final LayerNorm: exactly transformers' hidden_states[1:]
        torch.testing.assert_close(ours, torch.stack(out.hidden_states[1:], dim=2)[0], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# one shared model, many threads
# ---------------------------------------------------------------------------------------------------------------

def test_feature_paths_on_one_shared_model_from_four_threads_match_serial(wavlm, w2v, in_threads):
    # each thread its own waveform and frame count; nothing a call needs may live on the shared models
    jobs = [(noise(6_000 + 2_500 * i, seed=20 + i), 9 + 4 * i) for i in range(4)]
    serial = [(A.wav2vec2_features(w2v, wav, n), A.wavlm_features(wavlm, wav, n)) for wav, n in jobs]
    start = threading.Barrier(4)
    worst = [0.0] * 4

    def work(i):
        wav, n = jobs[i]
        start.wait()  # all four on the models at once
        for _ in range(20):
            w2, wl = A.wav2vec2_features(w2v, wav, n), A.wavlm_features(wavlm, wav, n)
            assert w2.shape == serial[i][0].shape and wl.shape == serial[i][1].shape
            worst[i] = max(worst[i], (w2 - serial[i][0]).abs().max().item(), (wl - serial[i][1]).abs().max().item())

    errors = in_threads(work, 4)
    assert not errors, errors
    assert max(worst) <= 1e-6, worst
