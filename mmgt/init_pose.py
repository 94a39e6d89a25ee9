"""The initial pose of the reference image: (134, 3) PIXEL keypoints on the 512 canvas (MMGT_SPEC.md section 1).

Three sources, tried in this order by :func:`initial_pose`:
    1. a user pose file (``mmgt.keypoints.load_pose_file``, first frame);
    2. DWPose, when ``<weights>/DWPose/{yolox_l.onnx, dw-ll_ucoco_384.onnx}`` exist: YOLOX-L person detection, then
       RTMPose (SimCC) COCO-WholeBody 133 keypoints, both on onnxruntime, converted to MMGT's 134 layout exactly as
       the reference (``src/dwpose/wholebody.py``, DWPose's ``onnxdet.py`` / ``onnxpose.py``) does;
    3. a built-in frontal upper-body template fitted to the image's foreground.

Like the reference, DWPose runs on the image resized to 512 x 512 (the reference's ``resize_image(img, 512)`` for the
square images it uses), so its pixel coordinates are canvas coordinates. Its raw output is returned (raw scores,
low-score points keep their coordinates): that is what the reference feeds SMGA.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np

from mmgt.keypoints import CANVAS, INVALID, N_KEYPOINTS, load_pose_file

logger = logging.getLogger(__name__)

DET_FILE = "DWPose/yolox_l.onnx"
POSE_FILE = "DWPose/dw-ll_ucoco_384.onnx"

# YOLOX (DWPose onnxdet.py)
DET_INPUT = (640, 640)  # (h, w)
DET_PAD_VALUE = 114
DET_STRIDES = (8, 16, 32)
DET_NMS_IOU = 0.45
DET_SCORE_MIN = 0.1  # candidates entering NMS
DET_PERSON_MIN = 0.3  # persons kept after NMS

# RTMPose (DWPose onnxpose.py)
POSE_INPUT = (288, 384)  # (w, h) of dw-ll_ucoco_384, used when the model's input shape is dynamic
BBOX_PADDING = 1.25
POSE_MEAN = np.array([123.675, 116.28, 103.53])  # applied to the BGR crop, as the reference does
POSE_STD = np.array([58.395, 57.12, 57.375])
SIMCC_SPLIT_RATIO = 2.0

# COCO-WholeBody 133 (+ neck inserted at 17) -> OpenPose-18 body order (DWPose Wholebody.__call__)
MMPOSE_IDX = [17, 6, 8, 10, 7, 9, 12, 14, 16, 13, 15, 2, 1, 4, 3]
OPENPOSE_IDX = [1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17]
NECK_THRESHOLD = 0.3


# ----------------------------------------------------------------------------------------------------------------
# Image helpers
# ----------------------------------------------------------------------------------------------------------------
def _as_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 HxW, HxWx1, HxWx3 or HxWx4 -> HxWx3 (alpha composited on white, as controlnet_aux's HWC3)."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"initial pose: the image must be uint8, got {img.dtype}")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4) or min(img.shape[:2]) < 1:
        raise ValueError(f"initial pose: the image must be HxW, HxWx3 or HxWx4, got {img.shape}")
    if img.shape[2] == 1:
        return np.repeat(img, 3, axis=2)
    if img.shape[2] == 4:
        color, alpha = img[:, :, :3].astype(np.float32), img[:, :, 3:].astype(np.float32) / 255.0
        return (color * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    return img


def _to_canvas(image_rgb: np.ndarray) -> np.ndarray:
    """Resize to CANVAS x CANVAS with controlnet_aux ``resize_image``'s choice: k = CANVAS / min(h, w), LANCZOS4
    when k > 1 else INTER_AREA (identical to the reference for square images; others are stretched, as the
    reference image itself is for Stage II)."""
    h, w = image_rgb.shape[:2]
    if (h, w) == (CANVAS, CANVAS):
        return image_rgb
    k = CANVAS / float(min(h, w))
    return cv2.resize(image_rgb, (CANVAS, CANVAS), interpolation=cv2.INTER_LANCZOS4 if k > 1 else cv2.INTER_AREA)


# ----------------------------------------------------------------------------------------------------------------
# YOLOX person detection
# ----------------------------------------------------------------------------------------------------------------
def letterbox(img: np.ndarray, input_size: Tuple[int, int] = DET_INPUT) -> Tuple[np.ndarray, float]:
    """YOLOX preprocessing: resize by r = min(h_in / h, w_in / w) into the top-left corner of a 114-padded canvas.

    Returns (float32 (3, h_in, w_in) in the image's channel order, 0..255 unnormalised; r). Image coordinates are
    letterbox coordinates / r.
    """
    h_in, w_in = input_size
    padded = np.full((h_in, w_in, 3), DET_PAD_VALUE, dtype=np.uint8)
    r = min(h_in / img.shape[0], w_in / img.shape[1])
    new_w, new_h = int(img.shape[1] * r), int(img.shape[0] * r)
    resized = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR).astype(np.uint8)
    padded[:new_h, :new_w] = resized
    return np.ascontiguousarray(padded.transpose(2, 0, 1), dtype=np.float32), r  # (3, h_in, w_in)


def _decode_yolox(raw: np.ndarray, input_size: Tuple[int, int]) -> np.ndarray:
    """(A, 5 + C) grid-relative outputs -> absolute (cx, cy, w, h) in letterbox pixels (DWPose demo_postprocess)."""
    grids, strides = [], []
    for stride in DET_STRIDES:
        hs, ws = input_size[0] // stride, input_size[1] // stride
        xv, yv = np.meshgrid(np.arange(ws), np.arange(hs))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((hs * ws, 1), stride))
    grid, stride = np.concatenate(grids), np.concatenate(strides)  # (A, 2), (A, 1)
    if len(raw) != len(grid):
        raise ValueError(f"YOLOX output has {len(raw)} anchors, expected {len(grid)} for input {input_size}")
    out = raw.copy()
    out[:, :2] = (out[:, :2] + grid) * stride
    out[:, 2:4] = np.exp(out[:, 2:4]) * stride
    return out


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> List[int]:
    """Greedy single-class NMS on xyxy boxes with the +1 pixel area convention of DWPose's numpy NMS."""
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x2[i], x2[order[1:]]) - np.maximum(x1[i], x1[order[1:]]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[order[1:]]) - np.maximum(y1[i], y1[order[1:]]) + 1)
        inter = w * h
        iou = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[np.where(iou <= iou_threshold)[0] + 1]
    return keep


def detection_boxes(raw: np.ndarray, ratio: float, input_size: Tuple[int, int] = DET_INPUT) -> np.ndarray:
    """YOLOX output (1, A, 85) or (A, 85) -> person boxes (N, 4) xyxy in image pixels, best first.

    The reference runs class-aware NMS over all 80 classes and then keeps class 0 with score > 0.3; classes do not
    interact, so NMS over the person class alone gives the same boxes in the same order.
    """
    pred = _decode_yolox(np.asarray(raw, np.float32).reshape(-1, raw.shape[-1]), input_size)  # (A, 85)
    person = pred[:, 4] * pred[:, 5]  # objectness x person-class probability
    cxcywh = pred[:, :4]
    boxes = np.stack([cxcywh[:, 0] - cxcywh[:, 2] / 2.0, cxcywh[:, 1] - cxcywh[:, 3] / 2.0,
                      cxcywh[:, 0] + cxcywh[:, 2] / 2.0, cxcywh[:, 1] + cxcywh[:, 3] / 2.0], axis=1) / ratio
    cand = person > DET_SCORE_MIN
    boxes, person = boxes[cand], person[cand]
    if len(boxes) == 0:
        return np.zeros((0, 4), np.float32)
    keep = nms(boxes, person, DET_NMS_IOU)
    keep = [k for k in keep if person[k] > DET_PERSON_MIN]
    return boxes[keep].reshape(-1, 4)


# ----------------------------------------------------------------------------------------------------------------
# RTMPose whole-body keypoints
# ----------------------------------------------------------------------------------------------------------------
def bbox_xyxy2cs(bbox: np.ndarray, padding: float = BBOX_PADDING) -> Tuple[np.ndarray, np.ndarray]:
    """xyxy box -> (center (2,), scale (w, h) x padding)."""
    x1, y1, x2, y2 = [float(v) for v in bbox]
    return np.array([x1 + x2, y1 + y2]) * 0.5, np.array([x2 - x1, y2 - y1]) * padding


def fix_aspect_ratio(scale: np.ndarray, aspect_ratio: float) -> np.ndarray:
    """Grow the (w, h) scale to the model's w / h ratio."""
    w, h = float(scale[0]), float(scale[1])
    return np.array([w, w / aspect_ratio]) if w > h * aspect_ratio else np.array([h * aspect_ratio, h])


def warp_matrix(center: np.ndarray, scale: np.ndarray, output_size: Tuple[int, int]) -> np.ndarray:
    """2x3 affine taking the (center, scale) box to an output_size (w, h) image, rotation 0 (mmpose
    get_warp_matrix: three point pairs through cv2.getAffineTransform in float32)."""
    dst_w, dst_h = output_size
    src_dir = np.array([0.0, scale[0] * -0.5])
    dst_dir = np.array([0.0, dst_w * -0.5])

    def third(a, b):  # b + (a - b) rotated 90 degrees anticlockwise
        d = a - b
        return b + np.r_[-d[1], d[0]]

    src = np.zeros((3, 2), np.float32)
    src[0] = center
    src[1] = center + src_dir
    src[2] = third(src[0], src[1])
    dst = np.zeros((3, 2), np.float32)
    dst[0] = [dst_w * 0.5, dst_h * 0.5]
    dst[1] = np.array([dst_w * 0.5, dst_h * 0.5]) + dst_dir
    dst[2] = third(dst[0], dst[1])
    return cv2.getAffineTransform(np.float32(src), np.float32(dst))


def crop_person(img: np.ndarray, bbox: np.ndarray, input_size: Tuple[int, int]
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Affine crop of one person box for RTMPose: (normalised float32 (3, h, w), center, aspect-fixed scale)."""
    w, h = input_size
    center, scale = bbox_xyxy2cs(bbox)
    scale = fix_aspect_ratio(scale, w / h)
    crop = cv2.warpAffine(img, warp_matrix(center, scale, (w, h)), (int(w), int(h)), flags=cv2.INTER_LINEAR)
    crop = (crop - POSE_MEAN) / POSE_STD  # (h, w, 3) float64, as the reference
    return np.ascontiguousarray(crop.transpose(2, 0, 1), dtype=np.float32), center, scale


def simcc_decode(simcc_x: np.ndarray, simcc_y: np.ndarray, split_ratio: float = SIMCC_SPLIT_RATIO
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """SimCC (N, K, Wx), (N, K, Wy) -> (locations (N, K, 2) in input pixels, scores (N, K)).

    Location = argmax / split ratio per axis; score = the smaller of the two maxima; a point whose score <= 0 gets
    location -1 (before the division, as the reference).
    """
    n, k, _ = simcc_x.shape
    sx, sy = simcc_x.reshape(n * k, -1), simcc_y.reshape(n * k, -1)
    locs = np.stack((np.argmax(sx, axis=1), np.argmax(sy, axis=1)), axis=-1).astype(np.float32)  # (N*K, 2)
    vals = np.minimum(np.amax(sx, axis=1), np.amax(sy, axis=1))  # (N*K,)
    locs[vals <= 0.0] = -1
    return (locs / split_ratio).reshape(n, k, 2), vals.reshape(n, k)


def crop_to_image(locs: np.ndarray, input_size: Tuple[int, int], center: np.ndarray, scale: np.ndarray
                  ) -> np.ndarray:
    """Crop-pixel keypoints (..., 2) -> image pixels (the reference's postprocess rescale)."""
    return locs / np.asarray(input_size, np.float64) * scale + center - scale / 2


def wholebody_to_mmgt(keypoints: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """COCO-WholeBody (N, 133, 2) + (N, 133) -> MMGT (N, 134, 3) (DWPose ``Wholebody.__call__``).

    The neck (mean of the two shoulders, score 1 when both shoulder scores > 0.3 else 0) is inserted at 17, then
    the 17 COCO body points are reordered to OpenPose-18; feet, face and hands follow unchanged.
    """
    info = np.concatenate((keypoints, scores[..., None]), axis=-1)  # (N, 133, 3)
    neck = np.mean(info[:, [5, 6]], axis=1)  # (N, 3)
    neck[:, 2] = np.logical_and(info[:, 5, 2] > NECK_THRESHOLD, info[:, 6, 2] > NECK_THRESHOLD).astype(int)
    out = np.insert(info, 17, neck, axis=1)  # (N, 134, 3)
    out[:, OPENPOSE_IDX] = out[:, MMPOSE_IDX]  # the right side is gathered before the write
    return out


_SESSIONS: dict = {}


def _session(path: Path, providers: Sequence[str]):
    """One onnxruntime session per (file, providers); the models are large, loading them once matters."""
    import onnxruntime as ort

    key = (str(path.resolve()), tuple(providers))
    if key not in _SESSIONS:
        _SESSIONS[key] = ort.InferenceSession(str(path), providers=list(providers))
    return _SESSIONS[key]


def _default_providers() -> List[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available] or available


def dwpose_keypoints(image_rgb: np.ndarray, det_path, pose_path, providers: Optional[Sequence[str]] = None
                     ) -> np.ndarray:
    """DWPose on a CANVAS x CANVAS RGB image -> (134, 3) pixel keypoints of the first detected person (the
    reference keeps ``whole_keypoints[:1]``; with no detection the whole image is the box)."""
    providers = list(providers) if providers else _default_providers()
    det, pose = _session(Path(det_path), providers), _session(Path(pose_path), providers)
    bgr = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)  # the reference detector works on BGR
    # 1. person boxes
    det_in, ratio = letterbox(bgr, DET_INPUT)
    raw = det.run(None, {det.get_inputs()[0].name: det_in[None]})[0]
    boxes = detection_boxes(raw, ratio, DET_INPUT)
    box = boxes[0] if len(boxes) else np.array([0, 0, bgr.shape[1], bgr.shape[0]], np.float64)
    logger.info("DWPose: %d person box(es); using %s", len(boxes), np.round(box, 1).tolist())
    # 2. whole-body keypoints in the crop; the model's input shape says the crop size
    h, w = pose.get_inputs()[0].shape[2:]
    if not (isinstance(h, int) and isinstance(w, int)):  # a dynamic-shape export: dw-ll_ucoco_384's own size
        h, w = POSE_INPUT[1], POSE_INPUT[0]
    crop, center, scale = crop_person(bgr, box, (w, h))
    simcc_x, simcc_y = pose.run(None, {pose.get_inputs()[0].name: crop[None]})[:2]
    locs, scores = simcc_decode(simcc_x, simcc_y)  # (1, 133, 2), (1, 133)
    keypoints = crop_to_image(locs, (w, h), center, scale)
    # 3. COCO-WholeBody -> the 134 layout
    return wholebody_to_mmgt(keypoints, scores)[0].astype(np.float32)  # (134, 3)


# ----------------------------------------------------------------------------------------------------------------
# Template fallback
# ----------------------------------------------------------------------------------------------------------------
def _face_landmarks(cx: float, cy: float, half_w: float, half_h: float) -> np.ndarray:
    """iBUG-68 face landmarks of a frontal face centred at (cx, cy): (68, 2) pixels."""
    pts = np.zeros((68, 2))
    # jaw 0-16: lower half-ellipse from the image-left ear level round the chin to the image right
    for k in range(17):
        phi = math.pi * (1.0 - k / 16.0)
        pts[k] = (cx + half_w * math.cos(phi), cy - 0.1 * half_h + 1.0 * half_h * math.sin(phi))
    # brows 17-21 (image left) and 22-26 (image right): shallow arcs
    for k in range(5):
        t = k / 4.0
        lift = 0.08 * half_h * math.sin(math.pi * t)
        pts[17 + k] = (cx - 0.80 * half_w + 0.65 * half_w * t, cy - 0.55 * half_h - lift)
        pts[22 + k] = (cx + 0.15 * half_w + 0.65 * half_w * t, cy - 0.55 * half_h - lift)
    # nose bridge 27-30, nostrils 31-35
    for k in range(4):
        pts[27 + k] = (cx, cy - 0.40 * half_h + 0.15 * half_h * k)
    for k in range(5):
        pts[31 + k] = (cx - 0.20 * half_w + 0.10 * half_w * k, cy + 0.20 * half_h + 0.03 * half_h * (k in (1, 3)))
    # eyes 36-41 (image left) and 42-47 (image right): corner, two upper, corner, two lower
    eye_shape = ((-1.0, 0.0), (-0.35, -0.45), (0.35, -0.45), (1.0, 0.0), (0.35, 0.45), (-0.35, 0.45))
    for side, start in ((-1, 36), (1, 42)):
        ex, ey, rw, rh = cx + side * 0.42 * half_w, cy - 0.35 * half_h, 0.20 * half_w, 0.10 * half_h
        for k, (u, v) in enumerate(eye_shape):
            pts[start + k] = (ex + u * rw, ey + v * rh)
    # mouth: outer 48-59 (corner, upper lip, corner, lower lip), inner 60-67
    my = cy + 0.50 * half_h
    outer_w, inner_w = 0.40 * half_w, 0.28 * half_w
    for k in range(7):  # 48..54 along the upper lip
        t = k / 6.0
        pts[48 + k] = (cx - outer_w + 2 * outer_w * t, my - 0.10 * half_h * math.sin(math.pi * t))
    for k in range(5):  # 55..59 back along the lower lip
        t = 1.0 - (k + 1) / 6.0
        pts[55 + k] = (cx - outer_w + 2 * outer_w * t, my + 0.14 * half_h * math.sin(math.pi * t))
    for k in range(5):  # 60..64 inner upper
        t = k / 4.0
        pts[60 + k] = (cx - inner_w + 2 * inner_w * t, my - 0.03 * half_h * math.sin(math.pi * t))
    for k in range(3):  # 65..67 inner lower
        t = 1.0 - (k + 1) / 4.0
        pts[65 + k] = (cx - inner_w + 2 * inner_w * t, my + 0.04 * half_h * math.sin(math.pi * t))
    return pts


def _hand(wrist: Tuple[float, float], thumb_dir: float, length: float) -> np.ndarray:
    """A relaxed hand hanging down from the wrist: (21, 2) pixels; thumb_dir = +1 points the thumb to the right."""
    pts = np.zeros((21, 2))
    pts[0] = wrist
    wx, wy = wrist
    seg = length / 7.0
    # thumb 1-4 goes down and sideways, fingers 5-20 straight down, fanned across the palm
    for j in range(4):
        pts[1 + j] = (wx + thumb_dir * seg * (0.8 + 0.6 * j), wy + seg * (0.6 + 0.7 * j))
    for f in range(4):
        base_x = wx + thumb_dir * seg * (1.2 - 0.8 * f)
        for j in range(4):
            pts[5 + 4 * f + j] = (base_x, wy + seg * (2.5 + 1.0 * j) - seg * 0.3 * abs(f - 1.5))
    return pts


def template_pose_512() -> np.ndarray:
    """The built-in frontal upper-body pose on the 512 canvas: (134, 3) pixels, score 1 (0 and -1 when invalid).

    Person centred, head top at y ~ 60, shoulders at y ~ 250, hands hanging by the hips, legs and feet invalid.
    """
    kps = np.full((N_KEYPOINTS, 3), INVALID, np.float32)
    kps[:, 2] = 0.0
    body = {  # OpenPose-18; R = the subject's right = image left
        0: (256, 153), 1: (256, 250), 2: (178, 252), 3: (152, 350), 4: (170, 432), 5: (334, 252),
        6: (360, 350), 7: (342, 432), 8: (210, 480), 11: (302, 480), 14: (238, 130), 15: (274, 130),
        16: (214, 142), 17: (298, 142),
    }
    for i, (x, y) in body.items():
        kps[i] = (x, y, 1.0)
    kps[24:92, :2] = _face_landmarks(256.0, 150.0, 44.0, 56.0)
    kps[24:92, 2] = 1.0
    kps[92:113, :2] = _hand(body[7], -1.0, 70.0)  # hand 1 = COCO-WholeBody left hand = image right
    kps[113:134, :2] = _hand(body[4], +1.0, 70.0)  # hand 2 = right hand = image left
    kps[92:134, 2] = 1.0
    return kps


TEMPLATE_EXTENT = (140.0, 60.0, 372.0, 512.0)  # x0, y0, x1, y1 of the template person (head top to frame bottom)


def foreground_box(image_rgb: np.ndarray, threshold: float = 40.0, min_fraction: float = 0.05
                   ) -> Optional[Tuple[float, float, float, float]]:
    """Box (x0, y0, x1, y1) of the pixels that differ from the border colour, or None when that region is too
    small (< min_fraction of the image) or covers nearly everything (no usable background)."""
    h, w = image_rgb.shape[:2]
    step = max(1, max(h, w) // 128)  # a coarse grid is enough for a box and keeps this cheap
    small = image_rgb[::step, ::step].astype(np.float32)
    border = np.concatenate([small[0], small[-1], small[:, 0], small[:, -1]])  # (n, 3)
    diff = np.abs(small - np.median(border, axis=0)).max(axis=2)  # (h', w')
    fg = diff > threshold
    frac = fg.mean()
    if frac < min_fraction or frac > 0.95:
        return None
    rows, cols = np.where(fg.any(axis=1))[0], np.where(fg.any(axis=0))[0]
    return (cols[0] * step, rows[0] * step, min(w, (cols[-1] + 1) * step), min(h, (rows[-1] + 1) * step))


def template_pose(image: np.ndarray) -> np.ndarray:
    """The template fitted to the image: (134, 3) pixels on the 512 canvas.

    With a foreground box (background taken as the border colour), the template person is scaled uniformly to fit
    inside it, centred horizontally and top-aligned (head at the top of the box); otherwise the template is used
    as drawn for a centred 512 x 512 upper-body shot.
    """
    img = _as_rgb(image)
    h, w = img.shape[:2]
    kps = template_pose_512()
    box = foreground_box(img)
    if box is None:
        logger.info("template pose: no clear foreground, template used as drawn")
        return kps
    # 1. fit in image pixels: uniform scale, horizontal centre, top edge
    tx0, ty0, tx1, ty1 = TEMPLATE_EXTENT
    bx0, by0, bx1, by1 = box
    s = min((bx1 - bx0) / (tx1 - tx0), (by1 - by0) / (ty1 - ty0))
    valid = kps[:, 2] > 0
    x_img = (bx0 + bx1) / 2.0 + s * (kps[:, 0] - (tx0 + tx1) / 2.0)
    y_img = by0 + s * (kps[:, 1] - ty0)
    # 2. image pixels -> canvas pixels (the image is resized to the square canvas downstream)
    kps[:, 0] = np.where(valid, x_img * CANVAS / w, INVALID)
    kps[:, 1] = np.where(valid, y_img * CANVAS / h, INVALID)
    logger.info("template pose fitted to foreground box %s (scale %.3f)", [int(v) for v in box], s)
    return kps


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------
def initial_pose(image: np.ndarray, weights_dir=None, pose_file=None,
                 providers: Optional[Sequence[str]] = None) -> Tuple[np.ndarray, str]:
    """Initial pose of a reference image (uint8 RGB HxWx3): ((134, 3) float32 pixel keypoints on the 512 canvas,
    method) with method one of "pose_file", "dwpose", "template"; order pose_file > DWPose > template."""
    img = _as_rgb(image)
    # 1. a pose given by the user wins
    if pose_file is not None:
        kps = load_pose_file(pose_file)[0]  # (134, 3)
        logger.info("initial pose: from pose file %s", pose_file)
        return kps.astype(np.float32), "pose_file"
    # 2. DWPose when its two ONNX files are in the weights folder
    if weights_dir is not None:
        det_path, pose_path = Path(weights_dir) / DET_FILE, Path(weights_dir) / POSE_FILE
        if det_path.is_file() and pose_path.is_file():
            try:
                import onnxruntime  # noqa: F401  (optional dependency)
            except ImportError as e:
                logger.warning("initial pose: DWPose weights found but onnxruntime is missing (%s); using the "
                               "template", e)
            else:
                kps = dwpose_keypoints(_to_canvas(img), det_path, pose_path, providers)
                logger.info("initial pose: DWPose (%s, %s)", det_path, pose_path)
                return kps, "dwpose"
        else:
            logger.warning("initial pose: no DWPose in %s (need %s and %s); using the template",
                           weights_dir, DET_FILE, POSE_FILE)
    # 3. the template fallback
    kps = template_pose(img)
    logger.info("initial pose: built-in upper-body template")
    return kps, "template"
