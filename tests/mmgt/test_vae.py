"""SD VAE helpers: layout at release size, reference-image encoding, chunked decoding, uint8 frames, TAESD path."""
import numpy as np
import pytest
import torch

from mmgt.config import MMGT, TINY
from mmgt.vae import (VAEDecoder, build_tiny_decoder, build_vae, decode_latents, encode_reference, image_to_tensor,
                      load_tiny_decoder, load_vae, to_uint8)


@pytest.fixture(scope="module")
def vae():
    return build_vae(TINY.vae, seed=0)


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)


def test_release_layout_on_meta():
    with torch.device("meta"):
        big = build_vae(MMGT.vae)
    # sd-vae-ft-mse: 83,653,863 parameters, 248 state-dict entries, latent scale 0.18215
    assert sum(p.numel() for p in big.parameters()) == 83_653_863
    assert len(big.state_dict()) == 248
    assert big.config.scaling_factor == 0.18215 and big.config.latent_channels == 4
    assert tuple(big.state_dict()["decoder.conv_out.weight"].shape) == (3, 128, 3, 3)


def test_seeded_build_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b = build_vae(TINY.vae, seed=3), build_vae(TINY.vae, seed=3)
    assert torch.equal(torch.rand(1), before)  # the seeded builds did not consume the caller's RNG
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    c = build_vae(TINY.vae, seed=4)
    assert not torch.equal(a.decoder.conv_out.weight, c.decoder.conv_out.weight)


def test_encode_reference_is_scaled_posterior_mean(vae, image):
    lat = encode_reference(vae, image)
    assert lat.shape == (1, 4, 8, 8)
    x = torch.from_numpy(image).float().permute(2, 0, 1)[None] / 255.0 * 2 - 1  # [-1, 1]
    with torch.no_grad():
        expected = vae.encode(x).latent_dist.mean * 0.18215
    assert torch.allclose(lat, expected, atol=1e-6)
    # float input in [0, 1] is the same image
    assert torch.allclose(encode_reference(vae, image.astype(np.float32) / 255.0), lat, atol=1e-6)
    assert torch.equal(encode_reference(vae, image), lat)  # deterministic: the mean, not a sample


def test_image_to_tensor_range_and_errors(vae, image):
    t = image_to_tensor(np.array([[[0, 255, 51]]], dtype=np.uint8))
    assert torch.allclose(t.flatten(), torch.tensor([-1.0, 1.0, -0.6]))
    assert image_to_tensor(image, size=(32, 40)).shape == (1, 3, 32, 40)
    assert encode_reference(vae, np.zeros((60, 60, 3), np.uint8), size=(64, 64)).shape == (1, 4, 8, 8)
    with pytest.raises(ValueError, match="multiple of the VAE factor"):
        encode_reference(vae, np.zeros((60, 60, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        image_to_tensor(np.zeros((64, 64), np.uint8))


def test_decode_video_shape_range_and_chunking(vae):
    lat = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(1))  # (B, C, F, h, w)
    frames = decode_latents(vae, lat, chunk=4)
    assert frames.shape == (2, 3, 3, 64, 64) and frames.dtype == torch.float32
    assert frames.min() >= 0 and frames.max() <= 1
    # chunking changes nothing, and the layout is the reference's "(b f)" flattening
    one_by_one = decode_latents(vae, lat, chunk=1)
    assert torch.allclose(one_by_one, frames, atol=1e-5)
    with torch.no_grad():
        ref = vae.decode(lat[1, :, 2][None] / 0.18215).sample  # batch 1, frame 2
    assert torch.allclose(frames[1, :, 2], (ref[0] / 2 + 0.5).clamp(0, 1), atol=1e-5)
    # 4D input: frames out in the same order
    flat = decode_latents(vae, lat[0].permute(1, 0, 2, 3), chunk=2)
    assert flat.shape == (3, 3, 64, 64)
    assert torch.allclose(flat, frames[0].permute(1, 0, 2, 3), atol=1e-5)


def test_encode_then_decode_shapes(vae, image):
    lat = encode_reference(vae, image)
    out = decode_latents(vae, lat)
    assert out.shape == (1, 3, 64, 64)
    u8 = to_uint8(out)
    assert u8.shape == (1, 64, 64, 3) and u8.dtype == np.uint8


def test_vae_decoder_module_matches_decode_latents(vae):
    lat = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = VAEDecoder(vae)(lat)
    assert out.shape == (3, 3, 64, 64)
    assert torch.allclose(out, decode_latents(vae, lat), atol=1e-6)


def test_to_uint8_right_answers():
    f = torch.tensor([0.0, 0.5, 1.0, 1.2, -0.1, 0.999]).view(1, 3, 1, 2)  # (N, 3, H, W)
    got = to_uint8(f)  # (1, 1, 2, 3): channels last
    assert got.shape == (1, 1, 2, 3)
    # truncation like the reference's (x * 255).astype(uint8); clamped to [0, 1] first
    assert got[0, 0].T.flatten().tolist() == [0, 127, 255, 255, 0, 254]
    assert to_uint8(f, rounding=True)[0, 0].T.flatten().tolist() == [0, 128, 255, 255, 0, 255]
    video = torch.zeros(2, 3, 4, 1, 1)  # (B, 3, F, H, W): value = b * 4 + f, in 1/255 steps
    for b in range(2):
        for fr in range(4):
            video[b, :, fr] = (b * 4 + fr + 0.5) / 255.0
    assert to_uint8(video)[:, 0, 0, 0].tolist() == list(range(8))  # "(b f)" order
    with pytest.raises(ValueError, match="to_uint8"):
        to_uint8(np.zeros((2, 4, 8, 8)))
    with pytest.raises(ValueError, match="to_uint8"):
        to_uint8(torch.zeros(2, 4, 8, 8))


@pytest.mark.parametrize("rounding", [False, True])
def test_to_uint8_tensor_and_array_paths_give_the_same_bytes(rounding):
    """Tensors convert where they live; the bytes equal the array path's (random values, exact halves, edges)."""
    g = torch.Generator().manual_seed(0)
    f = torch.rand(3, 3, 2, 5, 7, generator=g) * 1.2 - 0.1  # (B, 3, F, H, W), some outside [0, 1]
    f[0, 0, 0, 0, :5] = torch.tensor([0.5 / 255, 1.5 / 255, 127.5 / 255, 254.5 / 255, 1.0])
    np.testing.assert_array_equal(to_uint8(f, rounding=rounding), to_uint8(f.numpy(), rounding=rounding))
    half = f.half()  # the Stage II dtype on a GPU: converted through float32 on both paths
    np.testing.assert_array_equal(to_uint8(half, rounding=rounding), to_uint8(half.float().numpy(), rounding=rounding))


def test_tiny_decoder_same_interface(vae):
    taesd = build_tiny_decoder(TINY.vae, channels=8, num_blocks=(1, 1, 1, 1), seed=0)
    assert taesd.config.scaling_factor == 1.0
    lat = torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    a, b = decode_latents(taesd, lat), decode_latents(vae, lat)
    assert a.shape == b.shape == (1, 3, 2, 64, 64)
    assert a.min() >= 0 and a.max() <= 1
    with torch.no_grad():
        ref = (taesd.decode(lat[0].permute(1, 0, 2, 3)).sample / 2 + 0.5).clamp(0, 1)  # scale 1: latents as-is
    assert torch.allclose(a[0].permute(1, 0, 2, 3), ref, atol=1e-5)
    with pytest.raises(ValueError, match="num_blocks"):
        build_tiny_decoder(TINY.vae, channels=8, num_blocks=(1, 1))


def test_save_and_load_local_dirs(vae, tmp_path):
    vae.save_pretrained(tmp_path / "vae")
    loaded = load_vae(tmp_path / "vae")
    assert torch.equal(loaded.decoder.conv_out.weight, vae.decoder.conv_out.weight)
    taesd = build_tiny_decoder(TINY.vae, channels=8, num_blocks=(1, 1, 1, 1), seed=1)
    taesd.save_pretrained(tmp_path / "taesd")
    assert torch.equal(load_tiny_decoder(tmp_path / "taesd").decoder.layers[-1].weight,
                       taesd.decoder.layers[-1].weight)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_vae(tmp_path / "missing")
