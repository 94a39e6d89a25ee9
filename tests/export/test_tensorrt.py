"""TensorRT plans of the tiny preset (needs TensorRT and a CUDA GPU; skipped otherwise).

Builds fp16 plans of the Stage II networks with a timing cache, checks the cache/manifest fields, and runs one
render_chunk through the TensorRT executors against the eager torch networks.
"""
import io

import numpy as np
import pytest
import torch

from engine.models import ExportSource
from export.cli import build_parser, run_export
from export.manifest import PLAN_NAME, validate_artifact

pytestmark = [pytest.mark.tensorrt, pytest.mark.gpu]

CHUNK = 4
STAGE2_NETWORKS = ("audio_proj", "pose_guider", "reference_unet", "denoising_unet", "vae_decoder")


@pytest.fixture(scope="module")
def trt_artifacts(tmp_path_factory):
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT tests need a CUDA GPU")
    root = tmp_path_factory.mktemp("trt")
    args = build_parser().parse_args(["export", "--preset", "tiny", "--out", str(root / "A"), "--format", "tensorrt",
                                      "--fp16", "--chunk", str(CHUNK), "--timing-cache", str(root / "timing.cache"),
                                      "--only", *STAGE2_NETWORKS])
    out, err = io.StringIO(), io.StringIO()
    rc = run_export(args, ExportSource.from_args(args), out=out, err=err)
    assert rc == 0, out.getvalue() + err.getvalue()
    return root, args


def test_plans_are_built_with_manifest_and_timing_cache(trt_artifacts):
    import tensorrt as trt

    root, args = trt_artifacts
    assert (root / "timing.cache").stat().st_size > 0
    major, minor = torch.cuda.get_device_capability(0)
    for network in STAGE2_NETWORKS:
        (directory,) = [p for p in (root / "A" / network).iterdir() if p.is_dir()]
        manifest = validate_artifact(directory, require=("model.onnx", PLAN_NAME))
        assert manifest["format"] == "tensorrt" and manifest["precision"] == "fp16"
        assert manifest["key_fields"]["tensorrt"]["version"] == trt.__version__
        assert manifest["key_fields"]["tensorrt"]["compute_capability"] == f"{major}.{minor}"
        assert manifest["info"]["parity"]["provider"] == "tensorrt" and manifest["info"]["parity"]["passed"]
    out = io.StringIO()
    assert run_export(args, ExportSource.from_args(args), out=out, err=io.StringIO()) == 0
    assert f"{len(STAGE2_NETWORKS)} cached" in out.getvalue()


def test_tensorrt_render_chunk_matches_torch(trt_artifacts, tiny_models):
    from engine.backends import use_backend
    from mmgt import pipeline as P
    from mmgt.config import TINY
    from mmgt.contract import Shapes

    root, _ = trt_artifacts
    models = P.build_models(TINY, device="cuda", dtype=torch.float16, shapes=Shapes.from_config(TINY, chunk=CHUNK))
    trt_models = use_backend(models, "tensorrt", root / "A", networks=STAGE2_NETWORKS)
    graph_models = use_backend(models, "tensorrt", root / "A", networks=STAGE2_NETWORKS, cuda_graph=True)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    wav = (rng.standard_normal(CHUNK * 640) * 0.1).astype(np.float32)
    avatar = P.prepare_avatar(models, image)
    avatar_trt = P.prepare_avatar(trt_models, image)
    kps = np.repeat(avatar.init_pose[None], CHUNK, axis=0)
    frames, masks = P.pose_conditions(TINY, kps)
    tokens = P.audio_tokens(models, wav, CHUNK)
    chunk = P.StageIIChunk(index=0, first_frame=0, pose_frames=frames, masks=P.unet_masks(TINY, masks),
                           audio_tokens=tokens, emit_from=0, emit_to=CHUNK)
    want = P.render_chunk(models, avatar, chunk, steps=2, guidance=1.0, seed=0).latents.float()
    got = P.render_chunk(trt_models, avatar_trt, chunk, steps=2, guidance=1.0, seed=0).latents.float()
    again = P.render_chunk(graph_models, avatar_trt, chunk, steps=2, guidance=1.0, seed=0).latents.float()
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= 5e-2 * max(scale, 1.0)
    assert torch.allclose(again, got, atol=1e-3)  # the CUDA-graph replay computes the same plan
    video = P.decode(models, want)
    video_trt = P.decode(trt_models, want)
    assert np.abs(video.astype(int) - video_trt.astype(int)).mean() < 2.0
