"""Backends as per-network executors of the contracts: onnxruntime reproduces the torch networks, every network of
the pipeline (Stage I included) runs on the backend chosen for it, and bad artifacts are refused."""
import copy
import dataclasses
import importlib.util
import shutil

import numpy as np
import pytest
import torch

from engine.backends import BackendUnavailable, IOSpec, use_backend
from export.manifest import ONNX_NAME, ArtifactError
from mmgt import keypoints as K
from mmgt import pipeline as P
from mmgt.config import TINY
from mmgt.contract import Shapes
from mmgt.contracts import NETWORKS

from tests.conftest import EXPORT_CHUNK as CHUNK


@pytest.fixture(scope="module")
def artifacts(tiny_exported):
    """Every network of the tiny preset, exported once for the session (onnx, fp32, chunk 4)."""
    return tiny_exported[0]


@pytest.fixture(scope="module")
def models(tiny_models):
    """The tiny model set with its calls shaped for chunk 4 (what the artifacts were exported for)."""
    return dataclasses.replace(tiny_models, shapes=Shapes.from_config(TINY, chunk=CHUNK))


@pytest.fixture(scope="module")
def chunk_inputs():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    wav = (rng.standard_normal(int(3.2 * 16000)) * 0.1).astype(np.float32)
    return image, wav


def _one_chunk(models, image, wav):
    """Both stages through ``models``' calls: avatar, SMGA window, tokens, one chunk, decode."""
    avatar = P.prepare_avatar(models, image)
    cond = P.smga_condition(models, wav, TINY.smga.window)
    poses = P.generate_poses(models, cond, K.pixel_to_smga(avatar.init_pose)[0], steps=2,
                             generator=torch.Generator().manual_seed(0))
    frames, masks = P.pose_conditions(TINY, K.smga_to_pixel(poses[:CHUNK]))
    tokens = P.audio_tokens(models, wav[:CHUNK * 640], CHUNK)
    chunk = P.StageIIChunk(index=0, first_frame=0, pose_frames=frames, masks=P.unet_masks(TINY, masks),
                           audio_tokens=tokens, emit_from=0, emit_to=CHUNK)
    result = P.render_chunk(models, avatar, chunk, steps=2, guidance=1.0, seed=0)
    return {"bank": avatar.bank, "poses": torch.from_numpy(poses), "tokens": tokens, "latents": result.latents,
            "video": torch.from_numpy(P.decode(models, result.latents).astype(np.float32))}


def test_every_network_runs_on_onnxruntime_and_matches_torch(artifacts, models, chunk_inputs):
    ort_models = use_backend(models, "onnxruntime", artifacts)
    assert ort_models.backends() == {name: "onnxruntime" for name in NETWORKS}  # Stage I and the encoders too
    assert ort_models.smga is models.smga  # the modules are shared, only the calls change
    want, got = _one_chunk(models, *chunk_inputs), _one_chunk(ort_models, *chunk_inputs)
    assert max(float((a - b).abs().max()) for a, b in zip(want["bank"], got["bank"])) <= 1e-3
    for name in ("poses", "tokens", "latents"):
        assert got[name].shape == want[name].shape
        assert float((got[name] - want[name]).abs().max()) <= 2e-3, name
    assert float((got["video"] - want["video"]).abs().max()) <= 1  # one level of rounding at most


def test_torch_backend_is_the_contracts_torch_call(artifacts, models, chunk_inputs):
    ort_models = use_backend(models, "onnxruntime", artifacts, networks=("audio_proj",))
    assert ort_models.backends()["audio_proj"] == "onnxruntime" and ort_models.backends()["wav2vec2"] == "torch"
    back = use_backend(ort_models, "torch")  # every network back on its torch call
    assert set(back.backends().values()) == {"torch"} and not back.executors
    want, got = _one_chunk(models, *chunk_inputs), _one_chunk(back, *chunk_inputs)
    assert all(torch.equal(want[k], got[k]) for k in ("poses", "tokens", "latents", "video"))


def test_missing_artifacts_are_refused_with_the_export_command(tmp_path, models):
    with pytest.raises(ArtifactError, match=r"no usable onnx artifact of .*run `engine export --preset tiny"):
        use_backend(models, "onnxruntime", tmp_path, networks=("pose_guider",))
    with pytest.raises(ArtifactError, match="needs --artifacts"):
        use_backend(models, "onnxruntime", None)
    with pytest.raises(ValueError, match="unknown networks"):
        use_backend(models, "onnxruntime", tmp_path, networks=("smga_step",))


def test_other_shapes_or_weights_are_refused(artifacts, models):
    chunk8 = dataclasses.replace(models, shapes=Shapes.from_config(TINY, chunk=8))
    with pytest.raises(ArtifactError, match=r"shapes.chunk is 4, wanted 8.*--chunk 8"):
        use_backend(chunk8, "onnxruntime", artifacts, networks=("pose_guider",))
    cfg_run = dataclasses.replace(models, shapes=Shapes.from_config(TINY, chunk=CHUNK, guidance=3.5))
    with pytest.raises(ArtifactError, match=r"shapes.unet_batch is 1, wanted 2.*--guidance"):
        use_backend(cfg_run, "onnxruntime", artifacts, networks=("denoising_unet",))
    other = dataclasses.replace(models, pose_guider=copy.deepcopy(models.pose_guider))
    with torch.no_grad():
        other.pose_guider.conv_out.bias += 1e-3
    with pytest.raises(ArtifactError, match="other weights"):
        use_backend(other, "onnxruntime", artifacts, networks=("pose_guider",))
    use_backend(other, "onnxruntime", artifacts, networks=("pose_guider",), verify_weights=False)  # explicit


def test_damaged_artifact_is_refused(artifacts, models, tmp_path):
    copy_root = tmp_path / "A"
    shutil.copytree(artifacts, copy_root)
    (model,) = [p for p in (copy_root / "denoising_unet").glob(f"*/{ONNX_NAME}")]
    model.write_bytes(model.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="truncated"):
        use_backend(models, "onnxruntime", copy_root, networks=("denoising_unet",))


def test_executors_check_what_the_pipeline_passes(artifacts, models):
    ort_models = use_backend(models, "onnxruntime", artifacts, networks=("pose_guider",))
    pose = torch.rand(1, 3, 2, 64, 64)
    with pytest.raises(ValueError, match=r"pose axis 2 is 2, the artifact takes 4"):
        ort_models.call("pose_guider", {"pose": pose})
    with pytest.raises(ValueError, match=r"inputs missing \['pose'\], unexpected \['poses'\]"):
        ort_models.call("pose_guider", {"poses": pose})


def test_a_model_set_for_other_settings_is_refused_by_the_runner(artifacts, models, tiny_avatar):
    from engine.runner import Runner
    from engine.settings import OFFLINE

    ort_models = use_backend(models, "onnxruntime", artifacts, networks=("pose_guider",))
    with pytest.raises(ValueError, match="were made for .*chunk=4.*these settings need .*chunk=16"):
        Runner(ort_models, tiny_avatar, OFFLINE)


def test_iospec_reads_shapes_and_ranges():
    spec = IOSpec.from_json({"name": "latents", "shape": [4, 4, 8, 8], "dtype": "float16",
                             "dynamic": [{"axis": 0, "min": 1, "max": 4, "symbol": "frames"}]})
    assert spec.torch_dtype == torch.float16 and spec.axis_range(0) == (1, 4) and spec.axis_range(1) == (4, 4)
    assert spec.problem((2, 4, 8, 8)) is None
    assert "axis 0 is 5" in spec.problem((5, 4, 8, 8)) and "rank 3" in spec.problem((4, 8, 8))
    assert spec.shape_for({"frames": 3}) == (3, 4, 8, 8)


def test_tensorrt_backend_needs_tensorrt(tmp_path, models):
    if importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available():
        pytest.skip("TensorRT is available: see tests/export/test_tensorrt.py")
    with pytest.raises(BackendUnavailable, match="TensorRT is not installed|needs an NVIDIA GPU"):
        use_backend(models, "tensorrt", tmp_path, networks=("pose_guider",))
