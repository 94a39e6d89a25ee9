"""Release layouts: key lists at release size, and tiny models saved in the release file structure load back
strictly and reproduce their outputs; broken checkpoints fail with one error naming the file and the problem."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmgt import pipeline as P
from mmgt.config import TINY
from mmgt.contract import Shapes
from mmgt.smga import SMGA, SMGADiffusion
from mmgt.weights import ReleaseLayout, WeightsError, load_smga, load_stage2, read_checkpoint, stage2_builders

ROOT = Path(__file__).resolve().parents[2]


def test_check_layout_cli_reports_zero_differences(keys_dir):
    out = subprocess.run([sys.executable, "-m", "mmgt.weights", "--check-layout", str(keys_dir)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "smga: missing=0 unexpected=0 shape_mismatch=0 (473 keys)" in lines
    assert "net: missing=0 unexpected=0 shape_mismatch=0 (2232 keys)" in lines


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("release")
    P.save_models(tiny_models, root)
    return ReleaseLayout(root)


def _smga_out(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(1, TINY.smga.window, TINY.smga.audio_dim, generator=g)
    init = torch.randn(1, 402, generator=g) * 0.1
    return SMGADiffusion(TINY.smga).sample(model, cond, init, steps=3, generator=torch.Generator().manual_seed(1))


def test_smga_round_trip(release_dir, tiny_models):
    fresh = SMGA(TINY.smga)
    load_smga(fresh, release_dir.smga)
    torch.testing.assert_close(_smga_out(fresh), _smga_out(tiny_models.smga), rtol=0, atol=0)
    obj = read_checkpoint(release_dir.smga)
    assert set(obj) >= {"ema_state_dict", "model_state_dict", "epoch"}


def _broken(tmp_path, state, name):
    p = tmp_path / name
    torch.save({"ema_state_dict": state}, p)
    return p


def test_smga_broken_checkpoints(tmp_path, tiny_models, release_dir):
    good = dict(tiny_models.smga.state_dict())
    missing = dict(good)
    missing.pop("final_layer.bias")
    extra = dict(good, **{"decoder.extra.weight": torch.zeros(2)})
    shape = dict(good, **{"final_layer.weight": torch.zeros(3, 3)})
    cases = {
        _broken(tmp_path, missing, "missing.pt"): "missing keys: final_layer.bias",
        _broken(tmp_path, extra, "extra.pt"): "unexpected keys: decoder.extra.weight",
        _broken(tmp_path, shape, "shape.pt"): "final_layer.weight model (402, 64) vs file (3, 3)",
    }
    trunc = tmp_path / "truncated.pt"
    trunc.write_bytes(release_dir.smga.read_bytes()[:5000])
    cases[trunc] = "truncated or corrupt"
    lfs = tmp_path / "lfs.pt"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    cases[lfs] = "git-lfs pointer"
    for path, expect in cases.items():
        with pytest.raises(WeightsError) as e:
            load_smga(SMGA(TINY.smga), path)
        assert str(e.value).startswith(str(path)) and expect in str(e.value), str(e.value)


def test_module_prefix_is_accepted(tmp_path, tiny_models):
    p = _broken(tmp_path, {f"module.{k}": v for k, v in tiny_models.smga.state_dict().items()}, "ddp.pt")
    load_smga(SMGA(TINY.smga), p)


def test_whole_model_set_round_trip(release_dir, tiny_models, tiny_avatar, speech):
    """load_models on the saved release directory gives the same render as the models that were saved."""
    cfg_shapes = Shapes.from_config(TINY, guidance=2.0)  # a CFG run: the denoiser batch of 2
    loaded = P.load_models(release_dir.root, TINY, shapes=cfg_shapes)
    saved = dataclasses.replace(tiny_models, shapes=cfg_shapes)
    avatar = P.prepare_avatar(loaded, tiny_avatar.image)
    for a, b in zip(avatar.bank, tiny_avatar.bank):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    kps = np.repeat(tiny_avatar.init_pose[None], 8, axis=0)
    frames, masks = P.pose_conditions(TINY, kps)
    tokens = P.audio_tokens(loaded, speech[: 8 * 640], 8)
    torch.testing.assert_close(tokens, P.audio_tokens(tiny_models, speech[: 8 * 640], 8), rtol=0, atol=0)
    chunk = P.StageIIChunk(index=0, first_frame=0, pose_frames=frames, masks=P.unet_masks(TINY, masks),
                           audio_tokens=tokens, emit_from=0, emit_to=8)
    a = P.decode(loaded, P.render_chunk(loaded, avatar, chunk, steps=2, guidance=2.0, seed=0).latents)
    b = P.decode(saved, P.render_chunk(saved, tiny_avatar, chunk, steps=2, guidance=2.0, seed=0).latents)
    np.testing.assert_array_equal(a, b)


def test_stage2_mismatch_names_file_and_keys(tmp_path, tiny_models):
    parts = tiny_models.stage2_modules()
    state = {f"{n}.{k}": v for n, m in parts.items() for k, v in m.state_dict().items()}
    state.pop("denoising_unet.conv_out.bias")
    state["pose_guider.conv_out.weight"] = torch.zeros(1, 1, 1, 1)
    p = tmp_path / "net-32500.pth"
    torch.save(state, p)
    fresh = {name: build() for name, build in stage2_builders(TINY).items()}
    before = {k: v.clone() for k, v in fresh["pose_guider"].state_dict().items()}
    with pytest.raises(WeightsError) as e:
        load_stage2(fresh, p)
    msg = str(e.value)
    assert msg.startswith(str(p))
    assert "denoising_unet: missing=1" in msg and "denoising_unet.conv_out.bias" not in msg  # named without prefix
    assert "conv_out.bias" in msg and "pose_guider: missing=0 unexpected=0 shape_mismatch=1" in msg
    for k, v in fresh["pose_guider"].state_dict().items():  # nothing was loaded from the bad file
        assert torch.equal(v, before[k])


def test_missing_release_file_is_named(tmp_path):
    with pytest.raises(WeightsError, match="weights directory not found"):
        P.load_models(tmp_path / "nothing", TINY)


def test_key_list_copy_matches_shared():
    """tests/data/mmgt_keys is a copy of ../shared/mmgt_keys for clones without it; where both exist they are equal."""
    shared = ROOT.parent / "shared" / "mmgt_keys"
    copy = ROOT / "tests" / "data" / "mmgt_keys"
    names = sorted(p.name for p in copy.glob("*.json"))
    assert names == ["denoising_unet_stage1_keys_shapes.json", "net_state_dict_keys_shapes.json",
                     "smga_gesture_decoder_keys_shapes.json"]
    if shared.is_dir():  # a lone clone has only the copy, whose layouts the other key tests check
        assert sorted(p.name for p in shared.glob("*.json")) == names
        for name in names:
            assert (copy / name).read_bytes() == (shared / name).read_bytes(), name


def test_check_checkpoint_reads_shapes_only(release_dir):
    """The key check of `engine weights check`: meta-device networks against the file's shapes, no tensor data."""
    from dataclasses import replace

    from mmgt.weights import check_checkpoint

    for name in ("smga", "net"):
        rep = check_checkpoint(getattr(release_dir, name), name, TINY)
        assert rep.ok and rep.n_expected > 100, rep.line()
    wider = replace(TINY, smga=replace(TINY.smga, latent_dim=TINY.smga.latent_dim * 2))
    rep = check_checkpoint(release_dir.smga, "smga", wider)
    assert not rep.ok and rep.shape_mismatch
