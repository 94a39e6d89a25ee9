"""PoseGuider: release key layout, shapes, zero-initialised output, per-frame (inflated) convolutions."""

import pytest
import torch
import torch.nn.functional as F

from mmgt.config import MMGT, TINY, PoseGuiderConfig
from mmgt.pose_guider import PoseGuider

def test_release_size_keys_and_shapes_on_meta(release_keys):
    expected = release_keys("net_state_dict_keys_shapes.json", "pose_guider.")
    assert len(expected) == 16
    with torch.device("meta"):
        pg = PoseGuider(MMGT.pose_guider)
    ours = {k: tuple(v.shape) for k, v in pg.state_dict().items()}
    assert ours == expected
    # spot checks against MMGT_SPEC.md: conv_in 3->16, last block 96->256 (s2), conv_out 256->320
    assert ours["conv_in.weight"] == (16, 3, 3, 3)
    assert ours["blocks.5.weight"] == (256, 96, 3, 3) and pg.blocks[5].stride == (2, 2)
    assert [b.stride[0] for b in pg.blocks] == [1, 2, 1, 2, 1, 2]
    assert ours["conv_out.weight"] == (320, 256, 3, 3)
    # parameter count of the release: 1.09 M (exactly 1,086,480)
    assert sum(p.numel() for p in pg.parameters()) == 1_086_480


def test_output_shape_and_zero_init():
    torch.manual_seed(0)
    cfg = TINY.pose_guider
    pg = PoseGuider(cfg).eval()
    pose = torch.rand(2, 3, 3, 64, 64)  # (B, 3, F, H, W) in [0, 1]
    with torch.no_grad():
        out = pg(pose)
    assert out.shape == (2, cfg.embedding_channels, 3, 8, 8)
    assert pg.downsample_factor == 8
    assert torch.count_nonzero(out) == 0  # zero-initialised conv_out: an untrained guider adds nothing
    assert torch.count_nonzero(pg.conv_out.weight) == 0 and torch.count_nonzero(pg.conv_out.bias) == 0


def test_general_widths_and_per_frame_equivalence():
    torch.manual_seed(1)
    cfg = PoseGuiderConfig(block_out_channels=(4, 6, 10), embedding_channels=12)
    pg = PoseGuider(cfg).eval()
    torch.nn.init.normal_(pg.conv_out.weight, std=0.1)  # make the output non-trivial
    assert [tuple(b.weight.shape) for b in pg.blocks] == [(4, 4, 3, 3), (6, 4, 3, 3), (6, 6, 3, 3), (10, 6, 3, 3)]
    pose = torch.rand(1, 3, 4, 16, 16)
    with torch.no_grad():
        video = pg(pose)  # (1, 12, 4, 4, 4): two stride-2 levels -> factor 4
        frames = pg(pose[0].permute(1, 0, 2, 3))  # (4, 3, 16, 16) as independent frames
    assert video.shape == (1, 12, 4, 4, 4)
    assert torch.allclose(video[0].permute(1, 0, 2, 3), frames, atol=1e-6)
    # a frame's output depends on that frame alone (no temporal mixing)
    pose2 = pose.clone()
    pose2[:, :, 3] = 0.0
    with torch.no_grad():
        video2 = pg(pose2)
    assert torch.equal(video2[:, :, :3], video[:, :, :3]) and not torch.equal(video2[:, :, 3], video[:, :, 3])


def test_forward_matches_hand_written_reference():
    torch.manual_seed(2)
    pg = PoseGuider(PoseGuiderConfig(block_out_channels=(4, 8), embedding_channels=5)).eval()
    torch.nn.init.normal_(pg.conv_out.weight, std=0.1)
    x = torch.rand(3, 3, 8, 8)
    h = F.silu(F.conv2d(x, pg.conv_in.weight, pg.conv_in.bias, padding=1))
    h = F.silu(F.conv2d(h, pg.blocks[0].weight, pg.blocks[0].bias, padding=1))
    h = F.silu(F.conv2d(h, pg.blocks[1].weight, pg.blocks[1].bias, padding=1, stride=2))
    ref = F.conv2d(h, pg.conv_out.weight, pg.conv_out.bias, padding=1)
    with torch.no_grad():
        assert torch.allclose(pg(x), ref, atol=1e-6)


def test_loads_release_keys_strictly_and_rejects_bad_input():
    pg = PoseGuider(TINY.pose_guider)
    state = {f"pose_guider.{k}": torch.randn_like(v) for k, v in pg.state_dict().items()}
    other = PoseGuider(TINY.pose_guider)
    other.load_state_dict({k[len("pose_guider."):]: v for k, v in state.items()}, strict=True)
    assert torch.equal(other.conv_out.weight, state["pose_guider.conv_out.weight"])
    with pytest.raises(ValueError, match="PoseGuider input"):
        pg(torch.rand(1, 4, 2, 16, 16))
