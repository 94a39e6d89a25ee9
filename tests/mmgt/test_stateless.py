"""One model set, many callers at once: nothing a call needs lives on a shared module (the acceptance test of the
stateless model set). Four threads call one tiny ModelSet at the same time, each with its own avatar and audio, through
both stages: speech features, SMGA, poses and masks, audio tokens, the ReferenceNet bank, the denoiser, the decoder.
Every thread's outputs must equal its serial run."""
import threading

import numpy as np
import pytest
import torch

from mmgt import keypoints as K
from mmgt import pipeline as P
from mmgt.attention import ReferenceReadProcessor, ReferenceWriteProcessor

THREADS, ITERATIONS, CHUNK = 4, 20, 8


def _inputs(portrait: np.ndarray, k: int):
    """Thread k's own reference image (shifted, tinted) and audio (a chirp of its own pitch plus noise)."""
    image = np.roll(portrait, 37 * k, axis=1).astype(np.int16)
    image = np.clip(image + np.array([25 * k, -15 * k, 10 * k]), 0, 255).astype(np.uint8)
    t = np.arange(int(3.2 * 16000)) / 16000
    rng = np.random.default_rng(k)
    wave = 0.3 * np.sin(2 * np.pi * (150 + 90 * k) * t * (1 + 0.2 * t)) + 0.02 * rng.standard_normal(len(t))
    return image, wave.astype(np.float32)


def _one_pass(models: P.ModelSet, image: np.ndarray, wave: np.ndarray, seed: int):
    """Everything one caller does with the shared model set, returning every intermediate result."""
    cfg = models.cfg
    avatar = P.prepare_avatar(models, image)  # CLIP context, VAE latent, ReferenceNet bank
    cond = P.smga_condition(models, wave, cfg.smga.window)  # WavLM + librosa
    vec = P.generate_poses(models, cond, K.pixel_to_smga(avatar.init_pose)[0], steps=2,
                           generator=torch.Generator().manual_seed(seed))  # (W, 402)
    kps = K.smga_to_pixel(vec[:CHUNK])
    frames, masks = P.pose_conditions(cfg, kps)
    tokens = P.audio_tokens(models, wave[:CHUNK * 640], CHUNK)  # wav2vec2 + projection
    chunk = P.StageIIChunk(index=0, first_frame=0, pose_frames=frames, masks=P.unet_masks(cfg, masks),
                           audio_tokens=tokens, emit_from=0, emit_to=CHUNK)
    result = P.render_chunk(models, avatar, chunk, steps=2, guidance=1.0, seed=seed)
    video = P.decode(models, result.new_latents)
    return {"bank": torch.cat([b.flatten() for b in avatar.bank]), "cond": cond, "poses": torch.from_numpy(vec),
            "tokens": tokens, "latents": result.latents, "frames": torch.from_numpy(video.astype(np.float32))}


def test_one_model_set_serves_four_threads_at_once(tiny_models, portrait, in_threads):
    models = tiny_models
    inputs = [_inputs(portrait, k) for k in range(THREADS)]
    serial = [_one_pass(models, image, wave, seed=k) for k, (image, wave) in enumerate(inputs)]
    # the threads differ from each other: a mix-up between them could not go unseen
    assert (serial[0]["bank"] - serial[1]["bank"]).abs().max() > 1e-3
    assert (serial[0]["latents"] - serial[1]["latents"]).abs().max() > 1e-3

    worst = [0.0] * THREADS
    start = threading.Barrier(THREADS)

    def work(k: int) -> None:
        image, wave = inputs[k]
        start.wait()  # all four begin together
        for _ in range(ITERATIONS):
            out = _one_pass(models, image, wave, seed=k)
            for name, ref in serial[k].items():
                worst[k] = max(worst[k], float((out[name].float() - ref.float()).abs().max()))

    errors = in_threads(work, THREADS)
    assert not errors, errors
    assert max(worst) <= 1e-5, f"a thread's results differ from its serial run by {worst}"


def test_networks_keep_no_per_call_state(tiny_models):
    """The reference bank reaches and leaves the networks as call arguments: their attention processors hold their
    position in the bank (configuration) and nothing else."""
    for module, kind in ((tiny_models.reference_unet, ReferenceWriteProcessor),
                         (tiny_models.denoising_unet, ReferenceReadProcessor)):
        processors = [m.processor for m in module.modules() if isinstance(getattr(m, "processor", None), kind)]
        assert len(processors) == len(module.bank_names)
        for p in processors:
            assert set(vars(p)) <= {"backend", "index"}, vars(p)
    assert not hasattr(tiny_models.denoising_unet, "bank_state") and not hasattr(tiny_models.reference_unet,
                                                                                 "recorder")


@pytest.mark.parametrize("network", ["reference_unet", "denoising_unet", "wav2vec2"])
def test_no_hooks_on_shared_modules(tiny_models, network):
    """Forward hooks are module state: none may be left on (or needed by) the shared networks."""
    module = getattr(tiny_models, network)
    hooks = [m for m in module.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert not hooks
