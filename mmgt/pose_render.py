"""Pose frames: keypoints drawn as DWPose/ControlNet skeletons (MMGT_SPEC.md section 3).

This is MMGT's own variant of DWPose's ``draw_pose`` (``src/dwpose/util.py`` of the reference), the picture the
PoseGuider was trained on:

    * black canvas;
    * body: the first 17 OpenPose limbs as filled ellipses (``cv2.ellipse2Poly`` + ``cv2.fillConvexPoly``, stick
      width 4) in the 18 OpenPose colours, then the whole canvas x 0.9 (MMGT; stock DWPose uses 0.6), then the 18
      joints as filled circles of radius 4 in full colour;
    * hands: 20 edges of thickness 2, edge i coloured by HSV hue i / 20 with the channel order reversed (the
      reference converts to "BGR" on a canvas it later reads as RGB), then the 21 points as radius-4 circles
      (0, 0, 255);
    * face: 68 points as radius-3 white circles.

Input is UNIT keypoints (pixel / 512) with scores, as the reference's ``DWposeDetector_movment_mask`` receives them.
Validity follows the reference exactly: points with score < 0.3 are set to -1; a body joint is drawn when its score
is > 0.3; a hand/face point when ``int(x * size) > 0`` and ``int(y * size) > 0``. Knees and ankles are dropped
(the reference's ``mask_leg`` runs before every drawing). Output is RGB uint8.
"""
from __future__ import annotations

import colorsys
import math
from typing import Optional

import cv2
import numpy as np

from mmgt.keypoints import BODY, FACE, HAND_1, HAND_2, LEGS, N_KEYPOINTS, SCORE_THRESHOLD

REFERENCE_SIZE = 512  # the reference always draws on a 512 x 512 canvas
MAX_UNIT = 8.0  # coordinate clip (unit space) keeping OpenCV's int32 points in range

# OpenPose limbs (0-based joint pairs); only the first 17 are drawn (the last two, ear-shoulder, are not).
LIMB_SEQ = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (2, 16), (5, 17),
)
N_DRAWN_LIMBS = 17
STICK_WIDTH = 4
BODY_SCALE = 0.9  # MMGT's body canvas factor (stock DWPose: 0.6)
# (canvas * 0.9).astype(uint8) as a 256-entry table: the same numbers without a float64 copy of the canvas
_BODY_DIM_LUT = (np.arange(256) * BODY_SCALE).astype(np.uint8)
JOINT_RADIUS = 4

# The 18 OpenPose colours, used as given on the RGB canvas: limb i and joint i share colour i.
BODY_COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
    (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)

HAND_EDGES = (
    (0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10),
    (10, 11), (11, 12), (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20),
)
HAND_EDGE_THICKNESS = 2
HAND_POINT_RADIUS = 4
HAND_POINT_COLOR = (0, 0, 255)
FACE_POINT_RADIUS = 3
FACE_POINT_COLOR = (255, 255, 255)


def _hand_edge_colors() -> tuple:
    """Edge i: HSV(i / 20, 1, 1) * 255, channel order reversed, truncated to integers (as the reference's
    ``matplotlib.colors.hsv_to_rgb(...) * 255`` then ``[::-1].astype(np.uint8)``; colorsys does the same float64
    arithmetic)."""
    colors = []
    for i in range(len(HAND_EDGES)):
        rgb = colorsys.hsv_to_rgb(i / float(len(HAND_EDGES)), 1.0, 1.0)
        colors.append(tuple(int(c * 255) for c in reversed(rgb)))
    return tuple(colors)


HAND_EDGE_COLORS = _hand_edge_colors()


def _check_pose(kps_unit: np.ndarray) -> np.ndarray:
    kps = np.asarray(kps_unit, dtype=np.float32)
    if kps.shape != (N_KEYPOINTS, 3):
        raise ValueError(f"render_pose: keypoints must be ({N_KEYPOINTS}, 3) unit coordinates, got {kps.shape}")
    return kps


def prepare_keypoints(kps_unit: np.ndarray, score_threshold: float = SCORE_THRESHOLD,
                      drop_legs: bool = True) -> np.ndarray:
    """The reference's pre-drawing steps on (..., 134, 3) unit keypoints: legs zeroed (x, y, score), then every
    point with score < threshold moved to (-1, -1). Scores are kept (the body is drawn by score).

    Beyond the reference: non-finite points count as invalid (score 0), and coordinates are clipped to
    [-MAX_UNIT, MAX_UNIT] so OpenCV's int32 points cannot overflow (SMGA's range is about -0.4 .. 1.6).
    """
    kps = np.array(kps_unit, dtype=np.float32)  # copy
    if drop_legs:
        kps[..., LEGS, :] = 0.0  # the reference's mask_leg zeroes pixel x, y and score alike
    finite = np.isfinite(kps).all(axis=-1)  # (..., 134)
    kps[~finite] = (-1.0, -1.0, 0.0)
    np.clip(kps[..., :2], -MAX_UNIT, MAX_UNIT, out=kps[..., :2])
    low = kps[..., 2] < score_threshold
    kps[..., 0][low] = -1.0
    kps[..., 1][low] = -1.0
    return kps


def _draw_body(canvas: np.ndarray, body: np.ndarray, score_threshold: float) -> None:
    """body (18, 3) unit; in place."""
    H, W = canvas.shape[:2]
    visible = body[:, 2] > score_threshold  # (18,)
    # 1. limbs; float32 arithmetic as in the reference (float32 candidate x python float)
    for i in range(N_DRAWN_LIMBS):
        a, b = LIMB_SEQ[i]
        if not (visible[a] and visible[b]):
            continue
        Y = body[[a, b], 0] * float(W)  # x in pixels (the reference's naming)
        X = body[[a, b], 1] * float(H)  # y in pixels
        mX, mY = np.mean(X), np.mean(Y)
        length = ((X[0] - X[1]) ** 2 + (Y[0] - Y[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(X[0] - X[1], Y[0] - Y[1]))
        polygon = cv2.ellipse2Poly((int(mY), int(mX)), (int(length / 2), STICK_WIDTH), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, BODY_COLORS[i])
    # 2. the limbs are dimmed, the joints drawn on top are not
    canvas[...] = cv2.LUT(canvas, _BODY_DIM_LUT)  # == (canvas * 0.9).astype(np.uint8)
    # 3. joints
    for i in range(len(BODY)):
        if not visible[i]:
            continue
        x, y = int(body[i, 0] * W), int(body[i, 1] * H)
        cv2.circle(canvas, (x, y), JOINT_RADIUS, BODY_COLORS[i], thickness=-1)


def _draw_hand(canvas: np.ndarray, hand: np.ndarray) -> None:
    """hand (21, 3) unit; in place: 20 edges, then the 21 points."""
    H, W = canvas.shape[:2]
    px = [(int(x * W), int(y * H)) for x, y in hand[:, :2]]
    for i, (p, q) in enumerate(HAND_EDGES):
        (x1, y1), (x2, y2) = px[p], px[q]
        if x1 > 0 and y1 > 0 and x2 > 0 and y2 > 0:
            cv2.line(canvas, (x1, y1), (x2, y2), HAND_EDGE_COLORS[i], thickness=HAND_EDGE_THICKNESS)
    for x, y in px:
        if x > 0 and y > 0:
            cv2.circle(canvas, (x, y), HAND_POINT_RADIUS, HAND_POINT_COLOR, thickness=-1)


def _draw_face(canvas: np.ndarray, face: np.ndarray) -> None:
    """face (68, 3) unit; in place."""
    H, W = canvas.shape[:2]
    for x, y in face[:, :2]:
        x, y = int(x * W), int(y * H)
        if x > 0 and y > 0:
            cv2.circle(canvas, (x, y), FACE_POINT_RADIUS, FACE_POINT_COLOR, thickness=-1)


def _resize(frame: np.ndarray, out_size: int) -> np.ndarray:
    """The reference feeds pose frames through torchvision ``Resize((h, w))`` on PIL images: PIL bilinear
    (antialiased when shrinking). A no-op at the drawing size."""
    if frame.shape[0] == out_size and frame.shape[1] == out_size:
        return frame
    from PIL import Image

    return np.asarray(Image.fromarray(frame).resize((out_size, out_size), Image.BILINEAR))


def _draw_pose(canvas: np.ndarray, kps_unit: np.ndarray, score_threshold: float, drop_legs: bool) -> None:
    """Draw one pose into a black uint8 (size, size, 3) canvas, in place: body, hands, face."""
    kps = prepare_keypoints(_check_pose(kps_unit), score_threshold, drop_legs)  # (134, 3)
    _draw_body(canvas, kps[BODY], score_threshold)
    _draw_hand(canvas, kps[HAND_1])
    _draw_hand(canvas, kps[HAND_2])
    _draw_face(canvas, kps[FACE])


def render_pose(kps_unit: np.ndarray, size: int = REFERENCE_SIZE, out_size: Optional[int] = None,
                score_threshold: float = SCORE_THRESHOLD, drop_legs: bool = True) -> np.ndarray:
    """Draw one pose: (134, 3) unit keypoints -> RGB uint8 (out_size or size, same, 3). Body, hands, face."""
    canvas = np.zeros((size, size, 3), dtype=np.uint8)
    _draw_pose(canvas, kps_unit, score_threshold, drop_legs)
    return _resize(canvas, out_size or size)


def render_poses(kps_unit: np.ndarray, size: int = REFERENCE_SIZE, out_size: Optional[int] = None,
                 score_threshold: float = SCORE_THRESHOLD, drop_legs: bool = True) -> np.ndarray:
    """Draw a pose sequence: (F, 134, 3) unit keypoints -> RGB uint8 (F, out, out, 3), out = out_size or size.

    OpenCV draws one primitive at a time and has no batched polygon fill, so frames are drawn in a loop, straight
    into the output when no resize is asked for."""
    kps = np.asarray(kps_unit, dtype=np.float32)
    if kps.ndim != 3 or kps.shape[1:] != (N_KEYPOINTS, 3):
        raise ValueError(f"render_poses: keypoints must be (F, {N_KEYPOINTS}, 3) unit coordinates, "
                         f"got {kps.shape}")
    out = out_size or size
    frames = np.zeros((len(kps), out, out, 3), dtype=np.uint8)  # (F, out, out, 3)
    scratch = None if out == size else np.empty((size, size, 3), np.uint8)
    for f in range(len(kps)):
        if scratch is None:
            _draw_pose(frames[f], kps[f], score_threshold, drop_legs)
        else:
            scratch.fill(0)
            _draw_pose(scratch, kps[f], score_threshold, drop_legs)
            frames[f] = _resize(scratch, out)
    return frames
