"""Pose frames drawn from keypoints: colours, sizes, validity and order as the reference's draw_pose (MMGT)."""
import numpy as np
import pytest

from mmgt.keypoints import N_KEYPOINTS
from mmgt.pose_render import HAND_EDGE_COLORS, render_pose, render_poses

S = 512


def blank() -> np.ndarray:
    """All points invalid: coordinates -1, score 0."""
    kps = np.full((N_KEYPOINTS, 3), -1.0, np.float32)
    kps[:, 2] = 0.0
    return kps


def put(kps, i, x_px, y_px, score=1.0):
    kps[i] = (x_px / S, y_px / S, score)


def test_hand_edge_colours_are_reversed_hsv_truncated():
    # hue 0 -> rgb (255, 0, 0) -> reversed; hue 0.05: g = 0.3 * 255 = 76.5 -> 76; hue 0.25: r = 127.5 -> 127
    assert HAND_EDGE_COLORS[0] == (0, 0, 255)
    assert HAND_EDGE_COLORS[1] == (0, 76, 255)
    assert HAND_EDGE_COLORS[5] == (0, 255, 127)
    assert HAND_EDGE_COLORS[10] == (255, 255, 0)  # hue 0.5 = cyan (0, 255, 255) reversed
    assert len(HAND_EDGE_COLORS) == 20


def test_limb_is_dimmed_ellipse_and_joints_full_colour():
    kps = blank()
    put(kps, 1, 256, 256)  # neck
    put(kps, 2, 156, 256)  # right shoulder: limb 0 = (1, 2), colour (255, 0, 0)
    img = render_pose(kps)
    assert img.shape == (S, S, 3) and img.dtype == np.uint8
    # limb midpoint: colour x 0.9 truncated; the ellipse is 4 px thick on each side
    assert tuple(img[256, 206]) == (229, 0, 0)
    assert tuple(img[256 + 3, 206]) == (229, 0, 0)
    assert tuple(img[256 + 6, 206]) == (0, 0, 0)
    # joints: colour of their own index, not dimmed
    assert tuple(img[256, 256]) == (255, 85, 0)
    assert tuple(img[256, 156]) == (255, 170, 0)
    # nothing far from the limb
    ys, xs = np.nonzero(img.any(axis=2))
    assert ys.min() >= 256 - 5 and ys.max() <= 256 + 5 and xs.min() >= 156 - 5 and xs.max() <= 256 + 5


def test_body_joint_below_threshold_draws_nothing():
    kps = blank()
    put(kps, 1, 256, 256)
    put(kps, 2, 156, 256, score=0.25)  # below 0.3: no limb, no joint
    img = render_pose(kps)
    assert tuple(img[256, 206]) == (0, 0, 0)
    assert tuple(img[256, 156]) == (0, 0, 0)
    assert tuple(img[256, 256]) == (255, 85, 0)  # the neck alone


def test_legs_dropped_unless_asked():
    kps = blank()
    put(kps, 8, 200, 300)  # right hip
    put(kps, 9, 200, 400)  # right knee: limb 7 = (8, 9), colour (0, 255, 85)
    with_legs = render_pose(kps, drop_legs=False)
    assert tuple(with_legs[350, 200]) == (0, 229, 76)  # (0, 255, 85) x 0.9 truncated
    assert tuple(with_legs[400, 200]) == (0, 255, 255)  # knee joint colour 9
    default = render_pose(kps)
    assert tuple(default[350, 200]) == (0, 0, 0) and tuple(default[400, 200]) == (0, 0, 0)
    assert tuple(default[300, 200]) == (0, 255, 170)  # the hip joint stays (colour 8)


def test_hand_edge_and_points():
    kps = blank()
    put(kps, 92 + 1, 100, 100)
    put(kps, 92 + 2, 140, 100)  # edge 1 = (1, 2)
    img = render_pose(kps)
    assert tuple(img[100, 120]) == HAND_EDGE_COLORS[1]
    assert tuple(img[101, 120]) == HAND_EDGE_COLORS[1]  # thickness 2
    assert tuple(img[100, 100]) == (0, 0, 255) and tuple(img[100, 140]) == (0, 0, 255)
    assert tuple(img[100, 104]) == (0, 0, 255)  # radius 4
    # the second hand draws the same way
    kps2 = blank()
    put(kps2, 113 + 1, 100, 100)
    put(kps2, 113 + 2, 140, 100)
    assert np.array_equal(render_pose(kps2), img)


def test_hand_point_with_nonpositive_pixel_is_invalid():
    kps = blank()
    put(kps, 92 + 1, 100, 100)
    kps[92 + 2] = (0.001, 100 / S, 1.0)  # int(0.001 * 512) = 0: invalid even with a high score
    img = render_pose(kps)
    assert tuple(img[100, 50]) == (0, 0, 0)  # no edge towards x = 0
    assert tuple(img[100, 100]) == (0, 0, 255)
    assert img[:, :20].max() == 0


def test_face_points_white_radius_3_and_drawn_last():
    kps = blank()
    put(kps, 30, 300, 200)
    put(kps, 92, 300, 200)  # a hand point under the face point
    img = render_pose(kps)
    assert tuple(img[200, 300]) == (255, 255, 255)
    assert tuple(img[200, 303]) == (255, 255, 255)
    assert tuple(img[200, 304]) == (0, 0, 255)  # the hand point (radius 4) shows around the face point


def test_non_finite_and_far_points_do_not_break_drawing():
    kps = blank()
    put(kps, 1, 256, 256)
    kps[2] = (np.nan, 0.5, 1.0)  # NaN: invalid, no limb
    kps[5] = (1e12, 0.5, 1.0)  # far off canvas: clipped, the limb runs off the right edge
    img = render_pose(kps)
    assert tuple(img[256, 256]) == (255, 85, 0)
    assert tuple(img[256, 200]) == (0, 0, 0)  # no limb towards the NaN shoulder
    assert tuple(img[256, 400]) == (229, 76, 0)  # limb 1 = (1, 5), colour (255, 85, 0) x 0.9


def test_all_invalid_is_black():
    kps = np.random.default_rng(0).uniform(0.1, 0.9, (N_KEYPOINTS, 3)).astype(np.float32)
    kps[:, 2] = 0.1  # every score below the threshold
    assert render_pose(kps).max() == 0


def test_sequence_equals_frames_and_resizes():
    rng = np.random.default_rng(1)
    kps = rng.uniform(0.05, 0.95, (3, N_KEYPOINTS, 3)).astype(np.float32)
    kps[..., 2] = rng.uniform(0.0, 1.0, (3, N_KEYPOINTS))
    seq = render_poses(kps)
    assert seq.shape == (3, S, S, 3)
    for f in range(3):
        assert np.array_equal(seq[f], render_pose(kps[f]))
    assert seq.max() > 0
    limb = blank()
    put(limb, 1, 256, 256)
    put(limb, 2, 156, 256)
    assert tuple(render_poses(limb[None])[0, 256, 206]) == (229, 0, 0)  # dimmed inside the batch too
    small = render_poses(kps, out_size=64)
    assert small.shape == (3, 64, 64, 3) and small.dtype == np.uint8
    assert np.array_equal(small[1], render_pose(kps[1], out_size=64))


def test_bad_shape_names_the_problem():
    with pytest.raises(ValueError, match="134, 3"):
        render_pose(np.zeros((133, 3)))
    with pytest.raises(ValueError, match="F, 134, 3"):
        render_poses(np.zeros((134, 3)))
