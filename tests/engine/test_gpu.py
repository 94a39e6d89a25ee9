"""Tier 2: GPU numerics of the engine (skipped without CUDA). fp16 against fp32, compiled against eager."""
import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def chunk_case(portrait, speech):
    from mmgt import pipeline as P
    from mmgt.config import TINY

    def run(dtype, compile_unet=False):
        models = P.build_models(TINY, device="cuda", dtype=dtype)
        if compile_unet:
            models.denoising_unet = torch.compile(models.denoising_unet, dynamic=False)
        avatar = P.prepare_avatar(models, portrait)
        kps = np.repeat(avatar.init_pose[None], 12, axis=0)
        frames, masks = P.pose_conditions(TINY, kps)
        tokens = P.audio_tokens(models, speech[: 12 * 640], 12)
        inputs = P.ChunkInputs(frames, masks, tokens, first_frame=0)
        lat = P.render_chunk(models, avatar, inputs, steps=4, guidance=2.0, seed=0)
        return lat.float().cpu(), P.decode(models, lat)

    return run


def test_fp16_matches_fp32(chunk_case):
    lat32, img32 = chunk_case(torch.float32)
    lat16, img16 = chunk_case(torch.float16)
    rel = (lat16 - lat32).norm() / lat32.norm()
    assert rel < 2e-2, float(rel)
    assert np.abs(img16.astype(int) - img32).mean() < 2.0


def test_compiled_denoiser_matches_eager(chunk_case):
    lat, _ = chunk_case(torch.float16)
    lat_c, _ = chunk_case(torch.float16, compile_unet=True)
    assert ((lat_c - lat).norm() / lat.norm()) < 1e-2
