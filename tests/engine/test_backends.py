"""Backends behind the pipeline: onnxruntime adapters reproduce the torch networks; bad artifacts are refused."""
import copy
import importlib.util
import io
import shutil
from functools import partial

import numpy as np
import pytest
import torch

from engine.backends import BackendUnavailable, IOSpec, apply_backend
from engine.models import export_model_set
from export.cli import build_parser, run_export
from export.manifest import ONNX_NAME, STAGE2_NETWORKS, ArtifactError, ExportShapes
from mmgt import pipeline as P
from mmgt.config import TINY

CHUNK = 4


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """The Stage II networks of the tiny preset, exported once for this module (onnx, fp32, chunk 4)."""
    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("backends") / "A"
    args = build_parser().parse_args(["export", "--preset", "tiny", "--out", str(out), "--chunk", str(CHUNK),
                                      "--only", *STAGE2_NETWORKS])
    err = io.StringIO()
    assert run_export(args, partial(export_model_set, args), out=io.StringIO(), err=err) == 0, err.getvalue()
    return out


@pytest.fixture(scope="module")
def shapes():
    return ExportShapes.from_config(TINY, chunk=CHUNK)


@pytest.fixture(scope="module")
def chunk_inputs(tiny_models):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    avatar = P.prepare_avatar(tiny_models, image)
    kps = avatar.init_pose[None].repeat(CHUNK, axis=0)
    kps[:, :, :2] += rng.normal(0, 4, kps[:, :, :2].shape).astype(np.float32)  # some motion
    frames, masks = P.pose_conditions(TINY, kps)
    wav = (rng.standard_normal(CHUNK * 640) * 0.1).astype(np.float32)
    return image, kps, frames, masks, wav


def test_onnxruntime_render_chunk_matches_torch(artifacts, shapes, tiny_models, chunk_inputs):
    image, _, frames, masks, wav = chunk_inputs
    ort_models = apply_backend(tiny_models, "onnxruntime", artifacts, shapes)
    assert type(ort_models.denoising_unet).__name__ == "DenoiserAdapter"
    assert ort_models.smga is tiny_models.smga  # Stage I stays eager
    # 1. avatar: ReferenceNet bank through the adapter
    avatar = P.prepare_avatar(tiny_models, image)
    avatar_ort = P.prepare_avatar(ort_models, image)
    assert len(avatar_ort.bank) == len(avatar.bank)
    assert max(float((a - b).abs().max()) for a, b in zip(avatar.bank, avatar_ort.bank)) <= 1e-3
    # 2. audio tokens (audio projection) and one render_chunk call (pose guider + denoiser steps)
    tokens = P.audio_tokens(tiny_models, wav, CHUNK)
    tokens_ort = P.audio_tokens(ort_models, wav, CHUNK)
    assert float((tokens - tokens_ort).abs().max()) <= 1e-3
    inputs = P.ChunkInputs(pose_frames=frames, masks=masks, audio_tokens=tokens, first_frame=0)
    latents = P.render_chunk(tiny_models, avatar, inputs, steps=2, guidance=1.0, seed=0)
    latents_ort = P.render_chunk(ort_models, avatar_ort, inputs, steps=2, guidance=1.0, seed=0)
    assert latents_ort.shape == latents.shape == (1, 4, CHUNK, 8, 8)
    assert float((latents - latents_ort).abs().max()) <= 1e-3
    # 3. VAE decode through the adapter
    video = P.decode(tiny_models, latents)
    video_ort = P.decode(ort_models, latents)
    assert video_ort.shape == video.shape == (CHUNK, 64, 64, 3)
    assert np.abs(video.astype(int) - video_ort.astype(int)).max() <= 1


def test_torch_backend_is_the_eager_network(shapes, tiny_models, chunk_inputs):
    image, _, frames, masks, wav = chunk_inputs
    torch_models = apply_backend(tiny_models, "torch", shapes=shapes)
    avatar = P.prepare_avatar(tiny_models, image)
    tokens = P.audio_tokens(tiny_models, wav, CHUNK)
    assert torch.equal(P.audio_tokens(torch_models, wav, CHUNK), tokens)
    inputs = P.ChunkInputs(pose_frames=frames, masks=masks, audio_tokens=tokens, first_frame=0)
    a = P.render_chunk(tiny_models, avatar, inputs, steps=2, guidance=1.0, seed=0)
    b = P.render_chunk(torch_models, P.prepare_avatar(torch_models, image), inputs, steps=2, guidance=1.0, seed=0)
    assert torch.equal(a, b)


def test_audio_projection_splits_long_inputs(artifacts, shapes, tiny_models):
    """More frames than the artifact's max (80) run in pieces, the short last one padded to the min."""
    ort_models = apply_backend(tiny_models, "onnxruntime", artifacts, shapes, networks=("audio_proj",))
    ap = TINY.audio_proj
    windows = torch.randn(1, shapes.audio_frames_max + 5, ap.seq_len, ap.blocks, ap.channels,
                          generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = tiny_models.audioproj(windows)
    got = ort_models.audioproj(windows)
    assert got.shape == want.shape and float((got - want).abs().max()) <= 1e-3


def test_missing_artifacts_are_refused_with_the_export_command(tmp_path, shapes, tiny_models):
    with pytest.raises(ArtifactError, match=r"no usable onnx artifact of .*run `engine export --preset tiny"):
        apply_backend(tiny_models, "onnxruntime", tmp_path, shapes)
    with pytest.raises(ArtifactError, match="needs --artifacts"):
        apply_backend(tiny_models, "onnxruntime", None, shapes)


def test_other_shapes_or_weights_are_refused(artifacts, shapes, tiny_models):
    with pytest.raises(ArtifactError, match=r"shapes.chunk is 4, wanted 8.*--chunk 8"):
        apply_backend(tiny_models, "onnxruntime", artifacts, ExportShapes.from_config(TINY, chunk=8))
    with pytest.raises(ArtifactError, match=r"shapes.unet_batch is 1, wanted 2.*--guidance"):
        apply_backend(tiny_models, "onnxruntime", artifacts, ExportShapes.from_config(TINY, chunk=CHUNK,
                                                                                      guidance=3.5))
    other = copy.copy(tiny_models)
    other.pose_guider = copy.deepcopy(tiny_models.pose_guider)
    with torch.no_grad():
        other.pose_guider.conv_out.bias += 1e-3
    with pytest.raises(ArtifactError, match="other weights"):
        apply_backend(other, "onnxruntime", artifacts, shapes)
    apply_backend(other, "onnxruntime", artifacts, shapes, verify_weights=False)  # the user's explicit choice


def test_damaged_artifact_is_refused(artifacts, shapes, tiny_models, tmp_path):
    copy_root = tmp_path / "A"
    shutil.copytree(artifacts, copy_root)
    (model,) = [p for p in (copy_root / "denoising_unet").glob(f"*/{ONNX_NAME}")]
    model.write_bytes(model.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="truncated"):
        apply_backend(tiny_models, "onnxruntime", copy_root, shapes)


def test_adapters_check_what_the_pipeline_passes(artifacts, shapes, tiny_models, chunk_inputs):
    ort_models = apply_backend(tiny_models, "onnxruntime", artifacts, shapes)
    image, _, frames, masks, _ = chunk_inputs
    avatar = P.prepare_avatar(ort_models, image)
    pose = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 255.0
    with pytest.raises(ValueError, match=r"pose axis 2 is 2, the artifact takes 4"):
        ort_models.pose_guider(pose[:, :, :2])
    sample = torch.zeros(1, 4, CHUNK, 8, 8)
    with pytest.raises(ValueError, match="uncond_rows=1"):
        ort_models.denoising_unet(sample, torch.tensor([10]), avatar.context, uncond_rows=1)


def test_iospec_reads_shapes_and_ranges():
    spec = IOSpec.from_json({"name": "latents", "shape": [4, 4, 8, 8], "dtype": "float16",
                             "dynamic": [{"axis": 0, "min": 1, "max": 4, "symbol": "frames"}]})
    assert spec.torch_dtype == torch.float16 and spec.axis_range(0) == (1, 4) and spec.axis_range(1) == (4, 4)
    assert spec.problem((2, 4, 8, 8)) is None
    assert "axis 0 is 5" in spec.problem((5, 4, 8, 8)) and "rank 3" in spec.problem((4, 8, 8))
    assert spec.shape_for({"frames": 3}) == (3, 4, 8, 8)


def test_tensorrt_backend_needs_tensorrt(tmp_path, shapes, tiny_models):
    if importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available():
        pytest.skip("TensorRT is available: see tests/export/test_tensorrt.py")
    with pytest.raises(BackendUnavailable, match="TensorRT is not installed|needs an NVIDIA GPU"):
        apply_backend(tiny_models, "tensorrt", tmp_path, shapes)
