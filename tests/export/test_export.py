"""`engine export` on the tiny preset: every network to ONNX, checked, compared with torch, cached, validated."""
import copy
import dataclasses
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.manifest import MANIFEST_NAME, ONNX_DATA_NAME, ONNX_NAME, read_manifest, validate_artifact
from export.onnx import export_onnx, finalize_onnx, ort_session
from mmgt.config import TINY
from mmgt.contract import Shapes
from mmgt.contracts import NETWORKS, network_contracts
from tests.conftest import EXPORT_CHUNK as CHUNK
from tests.conftest import run_export_command as _run


def _artifact(root: Path, network: str) -> Path:
    dirs = [p for p in (root / network).iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(dirs) == 1, f"{network}: expected one artifact, found {dirs}"
    return dirs[0]


@pytest.fixture(scope="module")
def exported(tiny_exported):
    """All networks exported once (the first run), then the same command again (the second run)."""
    return tiny_exported


@pytest.fixture(scope="module")
def shapes():
    return Shapes.from_config(TINY, chunk=CHUNK)


@pytest.fixture(scope="module")
def contracts(shapes):
    return network_contracts(TINY, shapes)


def test_first_run_builds_every_network(exported):
    out, (rc, stdout, stderr, _), _ = exported
    assert rc == 0, stderr
    for name in NETWORKS:
        assert name in stdout  # one progress line and one summary row per network
        manifest = validate_artifact(_artifact(out, name))
        assert manifest["network"] == name and manifest["format"] == "onnx" and manifest["precision"] == "fp32"
    assert f"{len(NETWORKS)} built" in stdout


@pytest.mark.parametrize("network", NETWORKS)
def test_onnx_checker_and_parity_with_torch(exported, network, tiny_models, shapes, contracts):
    """onnx.checker passes and onnxruntime matches the model set's torch call of the network (max abs diff <= 1e-3),
    at the contract's shapes and, for a dynamic axis, at its smallest size too."""
    out = exported[0]
    directory = _artifact(out, network)
    onnx.checker.check_model(str(directory / ONNX_NAME))
    manifest = read_manifest(directory)
    assert manifest["info"]["parity"]["passed"] and manifest["info"]["parity"]["max_abs_diff"] <= 1e-3
    # an independent check: the engine's torch call of the network (the model set's) against the artifact
    spec = contracts[network]
    call = dataclasses.replace(tiny_models, shapes=shapes).calls[network]
    session = ort_session(directory / ONNX_NAME)
    for point in spec.profile_points():
        feeds = spec.sample_inputs(seed=7, sizes=point)
        got = session.run(list(spec.output_names), {k: v.numpy() for k, v in feeds.items()})
        want = call(feeds)
        for name, value in zip(spec.output_names, got):
            diff = float(np.abs(value - want[name].float().numpy()).max())
            assert diff <= 1e-3, f"{network}.{name} at {point}: onnxruntime vs torch max abs diff {diff}"
            assert float(want[name].abs().max()) > 0  # a non-trivial output


def test_second_run_reuses_everything_quickly(exported):
    _, (_, _, _, t_first), (rc, stdout, stderr, t_second) = exported
    assert rc == 0, stderr
    assert f"{len(NETWORKS)} cached" in stdout and "built" not in stdout
    assert t_second < 0.1 * t_first, f"second run {t_second:.1f} s vs first {t_first:.1f} s"


def test_manifest_describes_the_artifact(exported, shapes):
    out = exported[0]
    manifest = read_manifest(_artifact(out, "denoising_unet"))
    fields = manifest["key_fields"]
    names = [t["name"] for t in fields["io"]["inputs"]]
    assert names[:5] == ["sample", "timestep", "context", "pose_features", "audio_tokens"]
    assert names[5:8] == ["mask_0", "mask_1", "mask_2"] and names[-1] == "bank_09"  # one layout per mask level
    assert fields["io"]["inputs"][5]["shape"] == [1, CHUNK, 3, shapes.latent ** 2]  # full, face, lip on axis 2
    assert fields["io"]["inputs"][0]["shape"] == [1, 4, CHUNK, shapes.latent, shapes.latent]
    assert fields["shapes"] == {"chunk": CHUNK, "resolution": 64, "unet_batch": 1}
    assert fields["opset"] >= 17 and manifest["info"]["onnx"]["opset"] >= 17
    assert set(manifest["files"]) == {ONNX_NAME}
    size = (out / "denoising_unet" / manifest["cache_key"] / ONNX_NAME).stat().st_size
    assert manifest["files"][ONNX_NAME]["size"] == size
    assert set(manifest["info"]["weights_digests"]) == {"float32", "float16", "bfloat16"}


def test_truncated_or_edited_artifacts_are_rebuilt_or_refused(tmp_path):
    out = tmp_path / "B"
    rc, _, stderr, _ = _run(out, "--only", "pose_guider", "audio_proj")
    assert rc == 0, stderr
    # 1. a truncated model file: refused with --no-build, rebuilt without
    model = _artifact(out, "pose_guider") / ONNX_NAME
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    rc, stdout, stderr, _ = _run(out, "--only", "pose_guider", "audio_proj", "--no-build")
    assert rc == 1 and "pose_guider onnx refused" in stderr and "truncated" in stderr
    assert "audio_proj" not in stderr  # the intact one is still fine
    rc, stdout, stderr, _ = _run(out, "--only", "pose_guider", "audio_proj")
    assert rc == 0 and "rebuilt" in stdout, stdout + stderr
    validate_artifact(model.parent)
    # 2. an edited manifest (its seal no longer matches)
    path = _artifact(out, "audio_proj") / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["info"]["parity"]["max_abs_diff"] = 0.0
    path.write_text(json.dumps(data))
    rc, _, stderr, _ = _run(out, "--only", "audio_proj", "--no-build")
    assert rc == 1 and "modified" in stderr
    rc, stdout, _, _ = _run(out, "--only", "audio_proj")
    assert rc == 0 and "rebuilt" in stdout
    validate_artifact(path.parent)
    # 3. --no-build with nothing there at all
    rc, _, stderr, _ = _run(tmp_path / "empty", "--only", "pose_guider", "--no-build")
    assert rc == 1 and "not exported yet" in stderr


def test_fp16_export_is_a_new_artifact(tmp_path, contracts):
    out = tmp_path / "C"
    assert _run(out, "--only", "pose_guider")[0] == 0
    rc, stdout, stderr, _ = _run(out, "--only", "pose_guider", "--fp16")
    assert rc == 0 and "built" in stdout, stderr
    dirs = sorted(p for p in (out / "pose_guider").iterdir() if p.is_dir())
    assert len(dirs) == 2  # the fp32 and the fp16 artifact side by side
    manifests = {m["precision"]: m for m in (read_manifest(d) for d in dirs)}
    fp16 = manifests["fp16"]
    assert fp16["key_fields"]["io"]["inputs"][0]["dtype"] == "float16"
    assert fp16["info"]["parity"]["passed"] and fp16["info"]["parity"]["tolerance"] == 5e-2
    assert contracts["smga_denoise"].precision("fp16") == "fp32"  # Stage I stays fp32


def test_tensorrt_fails_fast_without_tensorrt(tmp_path):
    if importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available():
        pytest.skip("TensorRT and a GPU are present: see test_tensorrt.py")
    out = tmp_path / "T"
    rc, stdout, stderr, seconds = _run(out, "--format", "tensorrt")
    lines = stderr.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and stdout == ""
    if importlib.util.find_spec("tensorrt") is None:
        assert "TensorRT is not installed: pip install 'mmgt-engine[tensorrt]' on a machine with an NVIDIA GPU" \
               in lines[0]
    else:
        assert "needs an NVIDIA GPU" in lines[0]
    assert not out.exists() and seconds < 5.0  # nothing loaded, nothing written


def test_usage_errors_are_one_line(tmp_path, capsys):
    rc, _, stderr, _ = _run(tmp_path / "U", "--only", "unet")
    assert rc == 2 and "unknown network(s) unet" in stderr and "denoising_unet" in stderr
    rc, _, stderr, _ = _run(tmp_path / "U", "--force", "--no-build")
    assert rc == 2 and "contradict" in stderr
    rc, _, stderr, _ = _run(tmp_path / "U", "--chunk", "40")
    assert rc == 2 and "chunk must be in [1, 32]" in stderr
    # a trained preset without weights: refused by the loader (engine.models), before any network is built
    from engine.cli import main

    assert main(["export", "--preset", "mmgt", "--out", str(tmp_path / "U")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("engine export: error:") and "--weights DIR" in err[0], err


def test_large_models_go_to_one_external_data_file(tmp_path, tiny_models, contracts):
    """The >2 GB path, forced with a zero threshold: model.onnx + model.onnx.data, checked and still exact."""
    spec = contracts["vae_decoder"]
    info = export_onnx(spec, tiny_models, tmp_path, external_threshold=0)
    assert info["files"] == [ONNX_NAME, ONNX_DATA_NAME]
    assert (tmp_path / ONNX_NAME).stat().st_size < (tmp_path / ONNX_DATA_NAME).stat().st_size
    assert info["parity"]["passed"] and info["parity"]["max_abs_diff"] <= 1e-3
    assert not (tmp_path / "raw").exists()
    # an exporter's one-file-per-tensor layout is streamed into one data file with the same numbers
    per_tensor = tmp_path / "per_tensor"
    per_tensor.mkdir()
    model = onnx.load(str(tmp_path / ONNX_NAME))
    onnx.save_model(model, str(per_tensor / ONNX_NAME), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=0)
    assert len(list(per_tensor.iterdir())) > 10
    joined = tmp_path / "joined"
    joined.mkdir()
    assert finalize_onnx(per_tensor / ONNX_NAME, joined / ONNX_NAME, threshold=0) == [ONNX_NAME, ONNX_DATA_NAME]
    assert sorted(p.name for p in joined.iterdir()) == [ONNX_NAME, ONNX_DATA_NAME]
    onnx.checker.check_model(str(joined / ONNX_NAME))
    feeds = {k: v.numpy() for k, v in spec.sample_inputs(seed=3).items()}
    a = ort_session(tmp_path / ONNX_NAME).run(None, feeds)[0]
    b = ort_session(joined / ONNX_NAME).run(None, feeds)[0]
    assert np.array_equal(a, b)


def test_export_leaves_the_shared_models_unchanged(tmp_path, tiny_models, contracts):
    """Exporting switches nothing on the shared networks (the export math of attention applies while tracing only);
    an fp16 export works on a copy."""
    from mmgt.attention import AttnProcessor, attention_modules

    def backends():
        return {n: l.processor.backend for n, l in attention_modules(tiny_models.denoising_unet).items()
                if isinstance(l.processor, AttnProcessor)}

    before = backends()
    export_onnx(contracts["reference_unet"], tiny_models, tmp_path / "ref", parity=False)
    assert backends() == before and set(before.values()) == {"sdpa"}
    weight = tiny_models.pose_guider.conv_in.weight.detach().clone()
    export_onnx(contracts["pose_guider"], tiny_models, tmp_path / "pg", precision="fp16")
    assert torch.equal(tiny_models.pose_guider.conv_in.weight, weight)  # same dtype, same values


# ----------------------------------------------------------------------------------------------------------------
# Keys without building: the weights' identity, and models loaded only for what is built
# ----------------------------------------------------------------------------------------------------------------
class CountingSource:
    """An ExportSource that counts the networks it is asked to load."""

    def __init__(self, source):
        self.source, self.cfg, self.loads = source, source.cfg, []

    def weights_identity(self, contract=None):
        return self.source.weights_identity(contract)

    def load(self, networks):
        self.loads.append(list(networks))
        return self.source.load(networks)


def _export_weights(weights: Path, out: Path, *extra: str):
    """`engine export --weights W --preset tiny --out OUT --chunk 4 EXTRA` in-process: (rc, stdout, stderr, loads)."""
    import io

    from engine.models import ExportSource
    from export.cli import build_parser, run_export

    args = build_parser().parse_args(["export", "--weights", str(weights), "--preset", "tiny", "--out", str(out),
                                      "--chunk", str(CHUNK), *extra])
    source = CountingSource(ExportSource.from_args(args))
    stdout, stderr = io.StringIO(), io.StringIO()
    rc = run_export(args, source, out=stdout, err=stderr)
    return rc, stdout.getvalue(), stderr.getvalue(), source.loads


def test_changed_weight_files_are_detected_without_building_the_rest(tmp_path, tiny_models):
    """`--weights DIR`: the keys come from the release files' digests (recorded by size and mtime); a re-run loads
    no model, a changed file that feeds a network rebuilds exactly that network, one that does not changes nothing,
    and the engine's run-time weights check picks the artifact of the weights it holds."""
    from engine.backends import use_backend
    from export.manifest import DIGEST_CACHE
    from mmgt.pipeline import load_models, save_models
    from mmgt.weights import ReleaseLayout, save_stage2

    weights, out = tmp_path / "W", tmp_path / "A"
    layout = save_models(tiny_models, weights)
    for f in (p for p in weights.rglob("*") if p.is_file()):  # as if fetched earlier: the digests get recorded
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns - 60 * 10**9))
    only = ("--only", "audio_proj", "--skip-parity")
    # 1. first run builds (the model set loaded once); the re-run loads nothing, even without the export index
    rc, stdout, stderr, loads = _export_weights(weights, out, *only)
    assert rc == 0 and "1 built" in stdout and loads == [["audio_proj"]], stderr
    assert "MMGT_pretrained/stage_2/process_2/net-32500.pth" in json.loads((weights / DIGEST_CACHE).read_text())
    rc, stdout, _, loads = _export_weights(weights, out, *only)
    assert rc == 0 and "1 cached" in stdout and loads == []
    (out / ".cache" / "export-index.json").unlink()
    rc, stdout, _, loads = _export_weights(weights, out, *only)
    assert rc == 0 and "1 cached" in stdout and loads == []
    old = _artifact(out, "audio_proj")
    # 2. the VAE's weights change: audio_proj does not read them, it stays cached
    vae_file = next(p for p in layout.vae.iterdir() if p.suffix == ".safetensors")
    vae_file.write_bytes(vae_file.read_bytes()[:-1] + bytes([vae_file.read_bytes()[-1] ^ 1]))
    rc, stdout, _, loads = _export_weights(weights, out, *only)
    assert rc == 0 and "1 cached" in stdout and loads == []
    # 3. the audio projection's weights change (same file size): a new artifact, built from the new weights
    changed = dict(tiny_models.stage2_modules())
    changed["audioproj"] = copy.deepcopy(tiny_models.audioproj)
    with torch.no_grad():
        next(changed["audioproj"].parameters()).add_(0.5)
    size = layout.net.stat().st_size
    save_stage2(changed, layout.net)
    assert layout.net.stat().st_size == size
    rc, stdout, stderr, loads = _export_weights(weights, out, *only)
    assert rc == 0 and "1 built" in stdout and loads == [["audio_proj"]], stderr
    dirs = sorted(p for p in (out / "audio_proj").iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(dirs) == 2 and old in dirs
    new = next(d for d in dirs if d != old)
    digests = [read_manifest(d)["info"]["weights_digests"]["float32"] for d in (old, new)]
    assert digests[0] != digests[1]
    # 4. the engine's check at run time: each model set gets the artifact exported from its own weights
    shapes = Shapes.from_config(TINY, chunk=CHUNK)
    for models, want in ((dataclasses.replace(tiny_models, shapes=shapes), old),
                         (load_models(ReleaseLayout(weights).root, TINY, shapes=shapes), new)):
        executor = use_backend(models, "onnxruntime", out, networks=["audio_proj"]).executors["audio_proj"]
        assert executor.source == want


def test_seeded_identity_and_random_modules_do_not_depend_on_the_networks_asked_for():
    """--random-weights: each module comes from its own fixed seed, so one network's weights (and key) are the same
    whichever networks an export asks for; the identity of seeded weights needs no build."""
    from engine.models import ExportSource, random_networks, weight_parts
    from export.manifest import weights_digest
    from mmgt.weights import RELEASE_PARTS

    contracts = network_contracts(TINY, Shapes.from_config(TINY))
    assert set(weight_parts(contracts.values())) == set(RELEASE_PARTS)
    alone = random_networks(TINY, ["pose_guider"])
    more = random_networks(TINY, ["smga_denoise", "vae_decoder", "pose_guider"])
    assert weights_digest({"p": alone.pose_guider}) == weights_digest({"p": more.pose_guider})
    assert not hasattr(alone, "smga") and hasattr(more, "smga")
    source = ExportSource(TINY, random_weights=True)
    assert source.weights_identity(contracts["pose_guider"]) == source.weights_identity(None)
    assert source.weights_identity(None) != ExportSource(TINY).weights_identity(None)  # another builder
    assert ExportSource(dataclasses.replace(TINY, seed=1)).weights_identity(None) != \
        ExportSource(TINY).weights_identity(None)
