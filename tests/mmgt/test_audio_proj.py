"""mmgt.audio_proj: +-2 frame audio windows and the audio projection (shape, math, release keys)."""
import numpy as np
import pytest
import torch

from mmgt import audio_proj as A
from mmgt.config import MMGT, TINY

# ---------------------------------------------------------------------------------------------------------------
# windows and projection
# ---------------------------------------------------------------------------------------------------------------

def test_audio_windows_clamp_at_the_edges():
    feats = torch.arange(4, dtype=torch.float32).reshape(4, 1, 1) * torch.ones(4, 2, 3)  # (T=4, L=2, C=3)
    win = A.audio_windows(feats, radius=2)
    assert win.shape == (4, 5, 2, 3)
    expected = torch.tensor([[0, 0, 0, 1, 2], [0, 0, 1, 2, 3], [0, 1, 2, 3, 3], [1, 2, 3, 3, 3]], dtype=torch.float32)
    assert torch.equal(win[:, :, 0, 0], expected)
    assert torch.equal(win[:, :, 1, 2], expected)
    np.testing.assert_array_equal(A.audio_windows(np.arange(3), radius=1), [[0, 0, 1], [0, 1, 2], [1, 2, 2]])
    assert np.array_equal(A.audio_windows(np.arange(1), radius=2), [[0, 0, 0, 0, 0]])


def test_audio_proj_shape_and_math():
    cfg = TINY.audio_proj
    torch.manual_seed(0)
    proj = A.AudioProjModel(cfg).eval()
    x = torch.randn(2, 3, cfg.seq_len, cfg.blocks, cfg.channels)  # (B, F, 5, L, C)
    y = proj(x)
    assert y.shape == (2, 3, cfg.context_tokens, cfg.output_dim)
    # the same numbers by hand: flatten (window, layer, channel) row-major, MLP, split tokens, LayerNorm
    flat = x.reshape(6, -1)
    h = torch.relu(flat @ proj.proj1.weight.T + proj.proj1.bias)
    h = torch.relu(h @ proj.proj2.weight.T + proj.proj2.bias)
    t = (h @ proj.proj3.weight.T + proj.proj3.bias).reshape(6, cfg.context_tokens, cfg.output_dim)
    t = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(y, t.reshape(y.shape), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"expected \(B, F, 5, 2, 32\)"):
        proj(torch.zeros(1, 3, 4, 2, 32))


def test_audio_proj_release_keys_and_shapes_on_meta(release_keys):
    expected = release_keys("net_state_dict_keys_shapes.json", "audioproj.")
    assert len(expected) == 8
    with torch.device("meta"):
        proj = A.AudioProjModel(MMGT.audio_proj)
    assert {k: tuple(v.shape) for k, v in proj.state_dict().items()} == expected
    assert expected["proj1.weight"] == (512, 46080)
    assert sum(p.numel() for p in proj.parameters()) == 36_465_152  # 36.5 M (MMGT_SPEC.md)
    with torch.device("meta"):
        y = proj(torch.empty(1, 80, 5, 12, 768))
    assert y.shape == (1, 80, 32, 768)
