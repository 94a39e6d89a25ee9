"""Motion masks from keypoints: exact boxes, the uint8 overlap, the MM-HAA levels and the full-mask Decision."""
import cv2
import numpy as np
import pytest
from PIL import Image

from mmgt.config import MASK_BRANCHES
from mmgt.keypoints import N_KEYPOINTS
from mmgt.motion_masks import box_masks, mask_levels, motion_masks, scaled_kernel

S = 512


def blank(frames=1) -> np.ndarray:
    kps = np.full((frames, N_KEYPOINTS, 3), -1.0, np.float32)
    kps[..., 2] = 0.0
    return kps


def put(kps, f, i, x, y, score=1.0):
    kps[f, i] = (x, y, score)


def test_face_box_edges_exact():
    kps = blank()
    put(kps, 0, 24, 0.25, 0.25)
    put(kps, 0, 40, 0.5, 0.375)  # face points span x 128..256, y 128..192 in pixels
    m = box_masks(kps)["face_hands"][0]
    assert m.dtype == np.uint8 and m.shape == (S, S)
    assert m[128, 128] == 255 and m[191, 255] == 255
    assert m[128, 256] == 0 and m[192, 128] == 0  # max is exclusive
    assert m[127, 128] == 0 and m[128, 127] == 0
    assert int(m.sum()) == 255 * 128 * 64


def test_lips_box_and_face_box_contains_it():
    kps = blank()
    put(kps, 0, 72, 0.40, 0.30)
    put(kps, 0, 80, 0.45, 0.32)  # lips: x int(204.8)=204 .. int(230.4)=230, y int(153.6)=153 .. int(163.84)=163
    masks = box_masks(kps)
    lips = masks["lips"][0]
    ys, xs = np.nonzero(lips)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (204, 229, 153, 162)
    assert np.array_equal(masks["face_hands"][0], lips)  # the lips are face points too
    assert masks["hands"][0].max() == 0


def test_face_hand_overlap_wraps_to_254_and_hands_union_stays_255():
    kps = blank()
    put(kps, 0, 24, 0.25, 0.25)
    put(kps, 0, 25, 0.50, 0.50)  # face box 128..256
    put(kps, 0, 92, 0.375, 0.375)
    put(kps, 0, 93, 0.625, 0.625)  # hand 1 box 192..320 overlaps the face box on 192..256
    put(kps, 0, 113, 0.5, 0.5)
    put(kps, 0, 114, 0.75, 0.75)  # hand 2 box 256..384 overlaps hand 1 on 256..320
    masks = box_masks(kps)
    fh, hands = masks["face_hands"][0], masks["hands"][0]
    assert fh[200, 200] == 254  # face + hand
    assert fh[150, 150] == 255  # face only
    assert fh[300, 300] == 255  # both hands, one union box
    assert hands[300, 300] == 255 and hands[200, 200] == 255 and hands[150, 150] == 0
    assert fh[383, 383] == 255 and fh[384, 384] == 0


def test_invalid_points_are_ignored():
    kps = blank()
    put(kps, 0, 24, 0.25, 0.25)
    put(kps, 0, 25, 0.50, 0.50)
    put(kps, 0, 26, 0.0, 0.9)  # px = 0: invalid
    put(kps, 0, 27, 0.001, 0.9)  # int(0.512) = 0: invalid
    put(kps, 0, 28, 0.9, -0.2)  # negative y: invalid
    put(kps, 0, 29, 0.9, 0.9, score=0.2)  # low score: invalid
    m = box_masks(kps)["face_hands"][0]
    ys, xs = np.nonzero(m)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (128, 255, 128, 255)


def test_degenerate_box_draws_nothing():
    kps = blank(2)
    put(kps, 0, 24, 0.3, 0.3)  # a single point
    put(kps, 1, 24, 0.3, 0.3)
    put(kps, 1, 25, 0.3, 0.6)  # same x: min == max
    assert box_masks(kps)["face_hands"].max() == 0


def reference_boxes(kps_unit_frame):
    """The reference's per-point Python loops (draw_facepose_with_bbox / draw_handpose_with_individual_bbox)."""
    cand = kps_unit_frame[:, :2].copy()
    cand[kps_unit_frame[:, 2] < 0.3] = -1

    def box(canvas, pts):
        min_x, min_y, max_x, max_y = S, S, 0, 0
        for x, y in pts:
            x, y = int(x * S), int(y * S)
            if x > 0 and y > 0:
                min_x, min_y, max_x, max_y = min(min_x, x), min(min_y, y), max(max_x, x), max(max_y, y)
        if min_x < max_x and min_y < max_y:
            canvas[min_y:max_y, min_x:max_x] = 255
        return canvas

    face = box(np.zeros((S, S), np.uint8), cand[24:92])
    hands = box(box(np.zeros((S, S), np.uint8), cand[92:113]), cand[113:134])
    lips = box(np.zeros((S, S), np.uint8), cand[72:92])
    return face + hands, lips, hands


def test_vectorised_boxes_equal_reference_loops():
    rng = np.random.default_rng(0)
    kps = rng.uniform(-0.2, 1.2, (6, N_KEYPOINTS, 3)).astype(np.float32)
    kps[..., 2] = rng.uniform(0.0, 1.0, (6, N_KEYPOINTS))
    masks = box_masks(kps)
    for f in range(6):
        fh, lips, hands = reference_boxes(kps[f])
        assert np.array_equal(masks["face_hands"][f], fh)
        assert np.array_equal(masks["lips"][f], lips)
        assert np.array_equal(masks["hands"][f], hands)
    assert (masks["face_hands"] == 254).any()  # the random boxes do overlap somewhere


def reference_levels(mask_frame, kernel):
    """The reference: RGB mask frame -> blur_mask -> PIL 'L' -> torchvision Resize (PIL bilinear) -> ToTensor."""
    rgb = np.repeat(mask_frame[:, :, None], 3, axis=2)
    small = cv2.resize(rgb, (64, 64))
    norm = cv2.normalize(cv2.GaussianBlur(small, (kernel, kernel), 0), None, 0, 255, cv2.NORM_MINMAX)
    img = Image.fromarray(norm.astype(np.uint8)).convert("L")
    return [np.asarray(img.resize((s, s), Image.BILINEAR), np.float32).reshape(-1) / 255.0 for s in (64, 32, 16, 8)]


def test_levels_match_reference_path_exactly():
    kps = blank(2)
    put(kps, 0, 24, 0.3, 0.2)
    put(kps, 0, 25, 0.6, 0.45)
    put(kps, 0, 92, 0.5, 0.4)
    put(kps, 0, 93, 0.7, 0.8)
    put(kps, 1, 72, 0.41, 0.37)
    put(kps, 1, 73, 0.52, 0.43)
    masks = box_masks(kps)
    for key, kernel in (("face_hands", 31), ("lips", 21)):
        levels = mask_levels(masks[key], kernel)
        assert [lv.shape for lv in levels] == [(2, 4096), (2, 1024), (2, 256), (2, 64)]
        for f in range(2):
            for got, want in zip(levels, reference_levels(masks[key][f], kernel)):
                assert got.dtype == np.float32
                assert np.array_equal(got[f], want)


def _branches(out):
    """{branch: [level arrays (F, side^2)]} out of motion_masks' one layout (per level (F, 3, side^2))."""
    return {b: [lv[:, i] for lv in out] for i, b in enumerate(MASK_BRANCHES)}


def test_motion_masks_levels_range_and_full_decision():
    kps = blank(3)
    for f in range(2):
        put(kps, f, 24, 0.3, 0.2)
        put(kps, f, 40, 0.6, 0.5)
        put(kps, f, 72, 0.40, 0.40)
        put(kps, f, 80, 0.50, 0.45)
    # frame 2: all invalid
    layout = motion_masks(kps)
    assert [lv.shape for lv in layout] == [(3, 3, 4096), (3, 3, 1024), (3, 3, 256), (3, 3, 64)]
    assert all(lv.dtype == np.float32 and lv.min() >= 0.0 and lv.max() <= 1.0 for lv in layout)
    out = _branches(layout)
    face, lip, full = out["face"][0], out["lip"][0], out["full"][0]
    assert face[0].max() == 1.0 and lip[0].max() == 1.0  # min-max normalised
    for i in range(4):
        want = np.clip(1.0 - out["face"][i] + out["lip"][i], 0.0, 1.0)
        assert np.array_equal(out["full"][i], want)
    # where the face is strong and the lips absent the full mask is small; the lips add back
    px = np.argmax(face[0] - lip[0])
    assert full[0, px] < 0.2
    # the all-invalid frame: no face, no lips, the full mask is everywhere 1
    for i in range(4):
        assert out["face"][i][2].max() == 0.0 and out["lip"][i][2].max() == 0.0
        assert np.all(out["full"][i][2] == 1.0)
    assert np.array_equal(out["face"][0][0], out["face"][0][1])  # identical frames, identical masks


def test_motion_masks_branch_axis_follows_mask_branches():
    """Axis 1 holds the branches in MASK_BRANCHES order, the order MM-HAA's attn2_0/1/2 read them."""
    assert MASK_BRANCHES == ("full", "face", "lip")
    kps = blank(1)
    put(kps, 0, 24, 0.3, 0.2)
    put(kps, 0, 40, 0.6, 0.5)
    layout = motion_masks(kps)
    boxes = box_masks(kps)
    for lv_array, face_ref in zip(layout, mask_levels(boxes["face_hands"], 31)):
        assert np.array_equal(lv_array[:, 1], face_ref)


def test_tiny_levels_and_kernel_scaling():
    assert scaled_kernel(31, 64) == 31 and scaled_kernel(21, 64) == 21
    assert scaled_kernel(31, 8) == 3 and scaled_kernel(21, 8) == 3 and scaled_kernel(5, 8) == 1
    kps = blank(1)
    put(kps, 0, 24, 0.2, 0.2)
    put(kps, 0, 25, 0.5, 0.5)
    out = _branches(motion_masks(kps, levels=(8, 4, 2, 1)))
    assert [lv.shape for lv in out["face"]] == [(1, 64), (1, 16), (1, 4), (1, 1)]
    assert out["face"][0].max() == 1.0 and out["face"][0].min() == 0.0  # the box survives the scaled blur


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="134, 3"):
        box_masks(np.zeros((2, 10, 3)))
    with pytest.raises(ValueError, match="uint8"):
        mask_levels(np.zeros((1, 8, 8), np.float32), 3)
    with pytest.raises(ValueError, match="odd"):
        mask_levels(np.zeros((1, 8, 8), np.uint8), 4)


def test_a_window_of_masks_is_drawn_in_small_blocks_with_the_same_result():
    """An 80-frame window gives the masks of its frames drawn one by one, and drawing it allocates a few blocks'
    worth of 512 x 512 boxes, not the whole window's (~20 MB per array: long renders swung by ~130 MB)."""
    import tracemalloc

    rng = np.random.default_rng(0)
    kps = blank(80)
    for f in range(80):  # a face and lips that move from frame to frame
        x, y = rng.uniform(0.2, 0.6, 2)
        put(kps, f, 24, x, y)
        put(kps, f, 40, x + 0.2, y + 0.25)
        put(kps, f, 72, x + 0.08, y + 0.15)
        put(kps, f, 80, x + 0.14, y + 0.2)
    tracemalloc.start()
    try:
        layout = motion_masks(kps)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    one_by_one = [motion_masks(kps[f:f + 1]) for f in range(80)]
    for i, level in enumerate(layout):
        assert np.array_equal(level, np.concatenate([m[i] for m in one_by_one]))
    result = sum(level.nbytes for level in layout)  # the arrays returned (~5 MB)
    assert peak - result < 30 * 2 ** 20, (peak, result)
