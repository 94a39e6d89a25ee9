"""Motion masks for MM-HAA, straight from keypoints (MMGT_SPEC.md section 3, Algorithm 1).

Per frame, on the 512 x 512 canvas, filled 255 boxes (the reference's ``draw_facepose_with_bbox`` and
``draw_handpose_with_individual_bbox``):
    * face_hands = the face box (points 24-91) + each hand's own box, ADDED as uint8 (an overlap wraps to 254);
    * lips       = the box of points 72-91;
    * hands      = the two hand boxes (an overlap stays 255).
A box spans [min, max) over the group's valid points (px = int(x * 512); valid when px > 0 and py > 0, after points
with score < 0.3 were moved to -1) and exists only when min < max on both axes.

Preprocessing for MM-HAA (the reference's ``blur_mask`` + ``ImageProcessor.preprocess_mov_mask``): resize to the
first level (cv2 bilinear), Gaussian blur (face 31 x 31, lips 21 x 21, sigma from the kernel), min-max normalise to
0..255 (``cv2.NORM_MINMAX``: a constant image, all-zero included, becomes 0), then every level is a PIL bilinear
resize of that 8-bit image, divided by 255 and flattened to (F, side * side).

The three MM-HAA branches: face = face_hands, lip = lips, full = clamp(1 - face + lip, 0, 1) (the spec's
Decision), computed on the level tensors. They leave this module in the one layout every later stage uses: per level
one float32 array (F, 3, side * side), the branches on axis 1 in ``MASK_BRANCHES`` order (full, face, lip), sliced
per render chunk and handed to the UNet3D and the exported denoiser as they are.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from PIL import Image

from mmgt.config import MASK_BRANCHES
from mmgt.keypoints import FACE, HAND_1, HAND_2, LIPS, N_KEYPOINTS, SCORE_THRESHOLD

MASK_SIZE = 512  # the reference draws masks on a 512 x 512 canvas
LEVELS = (64, 32, 16, 8)  # MM-HAA mask sides for down blocks 0..3 at 512 px
FACE_KERNEL = 31  # Gaussian kernels of the reference, sized for the 64 x 64 first level
LIP_KERNEL = 21
REFERENCE_FIRST_LEVEL = 64
MASK_BLOCK = 8  # frames whose 512 x 512 boxes are drawn at once: a whole window at once (~20 MB per array, six
# of them) was a transient of ~130 MB that an hours-long render saw as memory swinging by as much


def _check(kps_unit: np.ndarray) -> np.ndarray:
    kps = np.asarray(kps_unit, dtype=np.float32)
    if kps.ndim == 2:
        kps = kps[None]
    if kps.ndim != 3 or kps.shape[1:] != (N_KEYPOINTS, 3):
        raise ValueError(f"motion masks: keypoints must be (F, {N_KEYPOINTS}, 3) unit coordinates, "
                         f"got {kps.shape}")
    return kps


def _boxes(kps: np.ndarray, index: np.ndarray, size: int, score_threshold: float) -> np.ndarray:
    """Filled 255 box of one keypoint group for every frame: (F, 134, 3) unit -> bool (F, size, size)."""
    pts = kps[:, index]  # (F, n, 3)
    # 1. pixel coordinates and validity as the reference: int() truncates; low scores were moved to -1
    xy = pts[..., :2] * np.float32(size)  # (F, n, 2)
    xy = np.where(np.isfinite(xy), xy, -1.0)
    px = np.trunc(np.clip(xy, -2.0 * size, 4.0 * size)).astype(np.int64)  # clip only guards the int cast
    valid = (px[..., 0] > 0) & (px[..., 1] > 0) & (pts[..., 2] >= score_threshold)  # (F, n)
    # 2. bounds over the valid points: min starts at the canvas size, max at 0
    big = np.int64(size)
    min_x = np.where(valid, px[..., 0], big).min(axis=1)  # (F,)
    min_y = np.where(valid, px[..., 1], big).min(axis=1)
    max_x = np.where(valid, px[..., 0], 0).max(axis=1)
    max_y = np.where(valid, px[..., 1], 0).max(axis=1)
    ok = (min_x < max_x) & (min_y < max_y)  # (F,)
    # 3. rows [min_y, max_y) x columns [min_x, max_x), broadcast over frames
    grid = np.arange(size)
    cols = (grid[None] >= min_x[:, None]) & (grid[None] < max_x[:, None])  # (F, size)
    rows = (grid[None] >= min_y[:, None]) & (grid[None] < max_y[:, None]) & ok[:, None]  # (F, size)
    return rows[:, :, None] & cols[:, None, :]  # (F, size, size)


def box_masks(kps_unit: np.ndarray, size: int = MASK_SIZE,
              score_threshold: float = SCORE_THRESHOLD) -> Dict[str, np.ndarray]:
    """(F, 134, 3) unit keypoints -> dict(face_hands, lips, hands) of uint8 (F, size, size) masks."""
    kps = _check(kps_unit)
    face = _boxes(kps, FACE, size, score_threshold).astype(np.uint8) * np.uint8(255)  # (F, size, size)
    hands = (_boxes(kps, HAND_1, size, score_threshold) | _boxes(kps, HAND_2, size, score_threshold))
    hands = hands.astype(np.uint8) * np.uint8(255)
    lips = _boxes(kps, LIPS, size, score_threshold).astype(np.uint8) * np.uint8(255)
    face_hands = face + hands  # uint8 addition wraps: face/hand overlap = 254, as the reference's image sum
    return {"face_hands": face_hands, "lips": lips, "hands": hands}


def scaled_kernel(kernel: int, first_level: int) -> int:
    """The reference kernel at 64 x 64, scaled to another first level and kept odd (>= 1). Unchanged at 64."""
    if first_level == REFERENCE_FIRST_LEVEL:
        return kernel
    k = int(kernel * first_level / REFERENCE_FIRST_LEVEL)
    return max(1, k // 2 * 2 + 1)


def mask_levels(mask: np.ndarray, kernel: int, levels: Sequence[int] = LEVELS) -> List[np.ndarray]:
    """uint8 (F, H, W) mask -> [float32 (F, side * side) in [0, 1] for side in levels]."""
    mask = np.asarray(mask)
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3 or mask.dtype != np.uint8:
        raise ValueError(f"mask_levels: mask must be uint8 (F, H, W), got {mask.dtype} {mask.shape}")
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"mask_levels: the Gaussian kernel must be odd and positive, got {kernel}")
    first = int(levels[0])
    out = [np.zeros((len(mask), int(s) * int(s)), np.float32) for s in levels]  # per level (F, s*s)
    for f in range(len(mask)):  # 1-channel OpenCV calls per frame are faster than stacking frames as channels
        # 1. resize, blur, min-max normalise (8-bit throughout, as the reference)
        small = cv2.resize(mask[f], (first, first), interpolation=cv2.INTER_LINEAR)  # (first, first)
        blurred = cv2.GaussianBlur(small, (kernel, kernel), 0)
        norm = cv2.normalize(blurred, None, 0, 255, cv2.NORM_MINMAX)
        # 2. levels: PIL bilinear (antialiased when shrinking) on the 8-bit image, then / 255
        img = Image.fromarray(norm)
        for i, side in enumerate(levels):
            level = img if side == first else img.resize((int(side), int(side)), Image.BILINEAR)
            out[i][f] = np.asarray(level, dtype=np.float32).reshape(-1) / np.float32(255.0)
    return out


def motion_masks(kps_unit: np.ndarray, levels: Sequence[int] = LEVELS, size: int = MASK_SIZE,
                 face_kernel: Optional[int] = None, lip_kernel: Optional[int] = None,
                 score_threshold: float = SCORE_THRESHOLD) -> Tuple[np.ndarray, ...]:
    """(F, 134, 3) unit keypoints -> per level a float32 (F, 3, side * side) array: full, face, lip on axis 1.

    Kernels default to the reference's 31 (face) and 21 (lips) at a 64 first level, scaled for other first levels
    (e.g. the tiny preset's 8) so the blur keeps its relative extent.
    """
    face_kernel = face_kernel or scaled_kernel(FACE_KERNEL, int(levels[0]))
    lip_kernel = lip_kernel or scaled_kernel(LIP_KERNEL, int(levels[0]))
    kps = np.asarray(kps_unit)
    blocks = [_motion_masks_block(kps[i:i + MASK_BLOCK], levels, size, face_kernel, lip_kernel, score_threshold)
              for i in range(0, max(len(kps), 1), MASK_BLOCK)]
    return tuple(np.concatenate(level, axis=0) for level in zip(*blocks))  # per level (F, 3, side^2)


def _motion_masks_block(kps_unit: np.ndarray, levels: Sequence[int], size: int, face_kernel: int, lip_kernel: int,
                        score_threshold: float) -> Tuple[np.ndarray, ...]:
    """motion_masks for a block of at most MASK_BLOCK frames."""
    boxes = box_masks(kps_unit, size, score_threshold)  # uint8 (B, size, size) each
    face = mask_levels(boxes["face_hands"], face_kernel, levels)
    lip = mask_levels(boxes["lips"], lip_kernel, levels)
    out = []
    for face_l, lip_l in zip(face, lip):
        full_l = np.clip(1.0 - face_l + lip_l, 0.0, 1.0)  # the Decision
        branches = {"full": full_l, "face": face_l, "lip": lip_l}
        out.append(np.stack([branches[b] for b in MASK_BRANCHES], axis=1).astype(np.float32))  # (F, 3, side^2)
    return tuple(out)
