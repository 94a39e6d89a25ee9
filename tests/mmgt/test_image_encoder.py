"""CLIP image embedding: release layout, reference preprocessing, context shape, determinism."""
import numpy as np
import pytest
import torch

from mmgt.config import MMGT, TINY
from mmgt.image_encoder import (CLIP_MEAN, CLIP_STD, build_clip, clip_embed, clip_preprocess, load_clip,
                                unconditional_context)


@pytest.fixture(scope="module")
def model():
    return build_clip(TINY.clip, seed=0)


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, size=(50, 40, 3), dtype=np.uint8)


def test_release_layout_on_meta():
    with torch.device("meta"):
        big = build_clip(MMGT.clip)
    state = big.state_dict()
    # ViT-L/14 vision tower + 1024 -> 768 projection (sd-image-variations image_encoder)
    assert sum(p.numel() for p in big.parameters()) == 303_966_208
    assert tuple(state["visual_projection.weight"].shape) == (768, 1024)
    assert tuple(state["vision_model.embeddings.position_embedding.weight"].shape) == (257, 1024)  # 16x16 + cls
    assert tuple(state["vision_model.embeddings.patch_embedding.weight"].shape) == (1024, 3, 14, 14)
    assert big.config.hidden_act == "quick_gelu"


def test_preprocess_equals_reference_processor(image):
    # the reference: CLIPImageProcessor().preprocess(ref_image.resize((224, 224))) on a PIL image
    from PIL import Image
    from transformers import CLIPImageProcessorPil

    ref = CLIPImageProcessorPil().preprocess(Image.fromarray(image).resize((224, 224)), return_tensors="pt")
    ours = clip_preprocess(image, 224)
    assert ours.shape == (1, 3, 224, 224)
    assert torch.allclose(ours, ref.pixel_values, atol=1e-5)


def test_preprocess_normalisation_right_answer():
    white = np.full((32, 32, 3), 255, np.uint8)
    px = clip_preprocess(white, 32)  # no resize needed: (1 - mean) / std per channel
    expected = torch.tensor([(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)])
    assert torch.allclose(px[0, :, 5, 7], expected, atol=1e-6)
    assert torch.allclose(clip_preprocess(np.ones((32, 32, 3), np.float32), 32), px)  # float [0, 1] input
    with pytest.raises(ValueError, match="CLIP input image"):
        clip_preprocess(np.zeros((32, 32, 4), np.uint8))


def test_embed_shape_determinism_and_value(model, image):
    ctx = clip_embed(model, image)
    assert ctx.shape == (1, 1, TINY.clip.projection_dim)
    assert torch.equal(clip_embed(model, image), ctx)
    with torch.no_grad():
        direct = model(pixel_values=clip_preprocess(image, TINY.clip.image_size)).image_embeds
    assert torch.allclose(ctx[:, 0], direct, atol=1e-6)
    other = clip_embed(model, 255 - image)
    assert not torch.allclose(other, ctx)
    # a seeded rebuild gives the same weights and so the same context
    assert torch.allclose(clip_embed(build_clip(TINY.clip, seed=0), image), ctx, atol=1e-6)
    assert not torch.allclose(clip_embed(build_clip(TINY.clip, seed=1), image), ctx)


def test_unconditional_context_is_zeros(model, image):
    ctx = clip_embed(model, image)
    null = unconditional_context(ctx)
    assert null.shape == ctx.shape and null.dtype == ctx.dtype and torch.count_nonzero(null) == 0


def test_save_and_load_local_dir(model, image, tmp_path):
    model.save_pretrained(tmp_path / "image_encoder")
    loaded = load_clip(tmp_path / "image_encoder")
    assert torch.allclose(clip_embed(loaded, image), clip_embed(model, image), atol=1e-6)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_clip(tmp_path / "missing")
