"""Cache keys, digests, manifests and atomic writes: what makes an artifact new, what makes it invalid."""
import copy
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from export.cli import key_fields
from export.manifest import (DIGEST_CACHE, MANIFEST_NAME, ONNX_NAME, ArtifactError, atomic_directory, cache_key,
                             config_hash, files_digest, find_artifact, make_manifest, network_weights,
                             validate_artifact, weights_digest, write_manifest)
from mmgt.config import TINY
from mmgt.contract import Shapes
from mmgt.contracts import network_contracts

ROOT = Path(__file__).resolve().parents[2]


def _keys(cfg=TINY, models=None, precision="fp32", opset=17, **shape_args):
    shapes = Shapes.from_config(cfg, **{"chunk": 4, "smga_guidance": 2.0, **shape_args})
    specs = network_contracts(cfg, shapes)
    out = {}
    for name, spec in specs.items():
        digest = weights_digest(network_weights(models, spec)) if models is not None else "w"
        out[name] = cache_key(key_fields(spec, cfg, shapes, digest, "onnx", spec.precision(precision), opset))
    return out


def test_chunk_changes_only_the_networks_it_shapes():
    a, b = _keys(chunk=4), _keys(chunk=8)
    changed = {n for n in a if a[n] != b[n]}
    assert changed == {"pose_guider", "denoising_unet", "vae_decoder"}


def test_window_changes_the_stage1_keys():
    a, b = _keys(), _keys(window=40, smga_guidance=1.0)
    assert a["smga_denoise"] != b["smga_denoise"] and a["wavlm"] != b["wavlm"] and a["wav2vec2"] != b["wav2vec2"]
    assert "smga_denoise" not in _keys(window=40)  # guided: the null condition has 80 tokens
    assert a["denoising_unet"] == b["denoising_unet"]


def test_smga_guidance_changes_only_the_stage1_keys():
    a, b = _keys(smga_guidance=2.0), _keys(smga_guidance=1.0)
    assert {n for n in a if a[n] != b[n]} == {"smga_condition", "smga_denoise"}


def test_guidance_changes_the_denoiser_batch_and_key():
    a, b = _keys(guidance=1.0), _keys(guidance=3.5)
    assert a["denoising_unet"] != b["denoising_unet"] and a["reference_unet"] == b["reference_unet"]


def test_precision_and_opset_change_the_key():
    a, b, c = _keys(), _keys(precision="fp16"), _keys(opset=18)
    assert a["pose_guider"] != b["pose_guider"] and a["pose_guider"] != c["pose_guider"]
    assert a["smga_denoise"] == b["smga_denoise"]  # Stage I is exported in fp32 whatever is asked


def test_weights_change_the_key(tiny_models):
    a = _keys(models=tiny_models)
    other = replace(tiny_models, pose_guider=copy.deepcopy(tiny_models.pose_guider))
    with torch.no_grad():
        other.pose_guider.conv_in.weight[0, 0, 0, 0] += 1e-3
    b = _keys(models=other)
    assert {n for n in a if a[n] != b[n]} == {"pose_guider"}


def test_runtime_config_fields_do_not_change_the_key():
    cfg = replace(TINY, smga=replace(TINY.smga, sample_steps=3, guidance=1.0),
                  sampler=replace(TINY.sampler, steps=7))
    assert _keys(cfg) == _keys()
    wider = replace(TINY, unet=replace(TINY.unet, attention_heads=4))
    assert config_hash(wider, ("unet",)) != config_hash(TINY, ("unet",))


def test_weights_digest_matches_across_dtypes(tiny_models):
    """Export records the fp16 digest of its fp32 weights; a model held in fp16 at run time matches it."""
    contracts = tiny_models.contracts
    mods = network_weights(tiny_models, contracts["pose_guider"])
    half = {k: copy.deepcopy(m).half() for k, m in mods.items()}
    assert weights_digest(half, "float16") == weights_digest(mods, "float16")
    assert weights_digest(half) != weights_digest(mods)
    assert weights_digest(network_weights(tiny_models, contracts["vae_decoder"])) != \
        weights_digest(network_weights(tiny_models, contracts["vae_encoder"]))


def _artifact(tmp_path, fields=None, payload=b"model bytes"):
    fields = fields or {"network": "pose_guider", "format": "onnx", "precision": "fp32", "shapes": {"chunk": 4}}
    key = cache_key(fields)
    with atomic_directory(tmp_path / "pose_guider" / key) as tmp:
        (tmp / ONNX_NAME).write_bytes(payload)
        write_manifest(tmp, make_manifest(fields, tmp, [ONNX_NAME], {"note": "x"}))
    return tmp_path / "pose_guider" / key


def test_validate_detects_every_kind_of_damage(tmp_path):
    directory = _artifact(tmp_path)
    validate_artifact(directory)
    model, manifest_path = directory / ONNX_NAME, directory / MANIFEST_NAME
    good_manifest, good_model = manifest_path.read_text(), model.read_bytes()
    cases = {
        "truncated": lambda: model.write_bytes(good_model[:3]),
        "sha256": lambda: model.write_bytes(good_model[::-1]),
        "missing": lambda: model.unlink(),
        "modified": lambda: manifest_path.write_text(good_manifest.replace('"note": "x"', '"note": "y"')),
        "no manifest": lambda: manifest_path.unlink(),
    }
    for expected, damage in cases.items():
        damage()
        with pytest.raises(ArtifactError, match=expected):
            validate_artifact(directory)
        manifest_path.write_text(good_manifest)
        model.write_bytes(good_model)
    validate_artifact(directory)
    # a valid artifact under a name that is not its key
    moved = directory.parent / "0123456789abcdef0123"
    directory.rename(moved)
    with pytest.raises(ArtifactError, match="directory is 0123456789abcdef0123"):
        validate_artifact(moved)


def test_resealed_manifest_with_other_key_fields_is_refused(tmp_path):
    directory = _artifact(tmp_path)
    data = json.loads((directory / MANIFEST_NAME).read_text())
    data["key_fields"]["shapes"]["chunk"] = 8  # consistent seal, but the fields no longer hash to the directory
    from export.manifest import _body_digest

    data["manifest_sha256"] = _body_digest(data)
    (directory / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="key fields hash to"):
        validate_artifact(directory)


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "net" / "key"
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as tmp:
            (tmp / ONNX_NAME).write_bytes(b"half")
            raise RuntimeError("exporter crashed")
    assert not final.exists() and list((tmp_path / "net").iterdir()) == []
    # replacing an existing (invalid) directory swaps it whole
    final.mkdir()
    (final / "stale").write_text("old")
    with atomic_directory(final) as tmp:
        (tmp / ONNX_NAME).write_bytes(b"new")
    assert sorted(p.name for p in final.iterdir()) == [ONNX_NAME]
    assert [p.name for p in (tmp_path / "net").iterdir()] == ["key"]


def test_find_artifact_matches_and_explains(tmp_path):
    _artifact(tmp_path)
    want = {"network": "pose_guider", "format": "onnx", "precision": "fp32", "shapes": {"chunk": 4, "latent": 8}}
    directory, manifest = find_artifact(tmp_path, "pose_guider", want)
    assert manifest["cache_key"] == directory.name
    with pytest.raises(ArtifactError, match=r"shapes.chunk is 4, wanted 8.*run engine export"):
        find_artifact(tmp_path, "pose_guider", {**want, "shapes": {"chunk": 8}}, hint="run engine export")
    with pytest.raises(ArtifactError, match="other weights"):
        find_artifact(tmp_path, "pose_guider", want, check=lambda m: "other weights")
    with pytest.raises(ArtifactError, match="none exported"):
        find_artifact(tmp_path, "vae_decoder", want)


def test_manifest_module_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None; import export.manifest as m; "
            "print(m.cache_key({'a': 1}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.strip()) == 20


# ----------------------------------------------------------------------------------------------------------------
# The digest of weight files: recorded by size and mtime, a changed file hashed again
# ----------------------------------------------------------------------------------------------------------------
def _aged(path: Path, seconds: float = 60.0) -> Path:
    """Set ``path``'s mtime into the past (a file written just now is not recorded: it may change again unseen)."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - int(seconds * 1e9)))
    return path


def _weights_dir(root: Path) -> Path:
    (root / "model").mkdir(parents=True)
    (root / "model" / "weights.bin").write_bytes(b"\x01" * 4096)
    (root / "model" / "config.json").write_text('{"width": 8}')
    (root / "single.pt").write_bytes(b"\x02" * 100)
    for p in (root / "model" / "weights.bin", root / "model" / "config.json", root / "single.pt"):
        _aged(p)
    return root


def test_files_digest_detects_a_changed_file(tmp_path):
    root = _weights_dir(tmp_path / "W")
    paths = [root / "model", root / "single.pt"]
    first = files_digest(root, paths)
    assert files_digest(root, paths) == first  # stable
    assert json.loads((root / DIGEST_CACHE).read_text()).keys() == {"model/config.json", "model/weights.bin",
                                                                    "single.pt"}
    # one byte changed, same size: the new mtime makes it hashed again
    weights = root / "model" / "weights.bin"
    weights.write_bytes(b"\x01" * 4095 + b"\x03")
    changed = files_digest(root, paths)
    assert changed != first
    assert files_digest(root, [root / "single.pt"]) != changed  # the digest covers exactly the paths given
    # a file added to a folder, a file gone
    (root / "model" / "extra.json").write_text("{}")
    assert files_digest(root, paths) != changed
    (root / "single.pt").unlink()
    assert files_digest(root, paths) not in (first, changed)


def test_files_digest_reads_only_what_changed(tmp_path):
    """An unchanged file (same size and mtime) is taken from the record, not read: a record edited by hand shows
    through; touching the file makes it read again."""
    root = _weights_dir(tmp_path / "W")
    paths = [root / "model", root / "single.pt"]
    true = files_digest(root, paths)
    record = json.loads((root / DIGEST_CACHE).read_text())
    record["single.pt"]["sha256"] = "0" * 64
    (root / DIGEST_CACHE).write_text(json.dumps(record))
    assert files_digest(root, paths) != true  # the record was used as it is
    _aged(root / "single.pt", 30.0)  # another mtime: hashed again
    assert files_digest(root, paths) == true


def test_files_digest_ignores_hidden_entries_and_the_directory_name(tmp_path):
    root = _weights_dir(tmp_path / "W")
    digest = files_digest(root, [root / "model"])
    (root / "model" / ".cache").mkdir()
    (root / "model" / ".cache" / "partial.incomplete").write_bytes(b"x")
    (root / "model" / ".weights.bin.tmp").write_bytes(b"y")
    assert files_digest(root, [root / "model"]) == digest
    moved = tmp_path / "elsewhere"
    root.rename(moved)
    assert files_digest(moved, [moved / "model"]) == digest


def test_files_digest_does_not_record_a_file_written_just_now(tmp_path):
    root = tmp_path / "W"
    root.mkdir()
    (root / "fresh.bin").write_bytes(b"new")
    files_digest(root, [root / "fresh.bin"])
    assert not (root / DIGEST_CACHE).exists()  # its mtime may not move if it is rewritten within the same tick
