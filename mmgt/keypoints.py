"""The 134-keypoint layout of MMGT and its coordinate spaces (MMGT_SPEC.md sections 1-2).

Layout (index ranges into the 134 keypoints):
    0-17 body (OpenPose-18 order), 18-23 feet, 24-91 face (68; lips 72-91), 92-112 hand 1, 113-133 hand 2.

Three coordinate spaces appear in the model; arrays are always (F, 134, 3) = (x, y, score):
    * pixel  -- pixel coordinates on a CANVAS x CANVAS (512) canvas, score in [0, 1]; invalid points are -1.
    * unit   -- pixel / CANVAS, what the pose renderer and the mask builder read (px = int(x * 512)).
    * smga   -- normalise(v) = ((v + 200) / 1000) * 2 - 1 applied to pixel x, y AND score, legs zeroed,
                flattened to (F, 402): what the SMGA network predicts.
"""
from __future__ import annotations

import numpy as np

CANVAS = 512  # SMGA's pixel canvas side
N_KEYPOINTS = 134
SCORE_THRESHOLD = 0.3  # below this a point is invalid
INVALID = -1.0  # coordinate value of an invalid point

BODY = np.arange(0, 18)
FEET = np.arange(18, 24)
FACE = np.arange(24, 92)
LIPS = np.arange(72, 92)
HAND_1 = np.arange(92, 113)
HAND_2 = np.arange(113, 134)
LEGS = np.array([9, 10, 12, 13])  # knees and ankles: zeroed in SMGA space (upper-body model)
R_SHOULDER, NECK, L_SHOULDER = 2, 1, 5

# SMGA's split streams: the face stream sees keypoints 24-91 only, the body stream sees the complement.
FACE_STREAM = np.zeros(N_KEYPOINTS, dtype=bool)
FACE_STREAM[FACE] = True
BODY_STREAM = ~FACE_STREAM


def _check(kps: np.ndarray) -> np.ndarray:
    kps = np.asarray(kps, dtype=np.float32)
    if kps.ndim == 2:
        kps = kps[None]
    if kps.ndim != 3 or kps.shape[1:] != (N_KEYPOINTS, 3):
        raise ValueError(f"keypoints must be (F, {N_KEYPOINTS}, 3), got {tuple(kps.shape)}")
    return kps


def apply_validity(kps: np.ndarray, threshold: float = SCORE_THRESHOLD) -> np.ndarray:
    """Mark points whose score < threshold invalid (x = y = -1); recompute the neck from the shoulders."""
    kps = _check(kps).copy()  # (F, 134, 3)
    # 1. the neck is the mean of the shoulders, valid only when both shoulders are confident
    shoulders_ok = (kps[:, R_SHOULDER, 2] > threshold) & (kps[:, L_SHOULDER, 2] > threshold)  # (F,)
    neck = (kps[:, R_SHOULDER] + kps[:, L_SHOULDER]) / 2  # (F, 3)
    neck[:, 2] = np.minimum(kps[:, R_SHOULDER, 2], kps[:, L_SHOULDER, 2])
    kps[:, NECK] = np.where(shoulders_ok[:, None], neck, np.array([INVALID, INVALID, 0.0], np.float32))
    # 2. low-confidence points are invalid
    bad = kps[..., 2] < threshold  # (F, 134)
    kps[..., 0][bad] = INVALID
    kps[..., 1][bad] = INVALID
    return kps


def normalize(v: np.ndarray) -> np.ndarray:
    """SMGA normalisation of pixel values (x, y and score alike)."""
    return ((np.asarray(v, np.float32) + 200.0) / 1000.0) * 2.0 - 1.0


def denormalize(v: np.ndarray) -> np.ndarray:
    """Inverse of :func:`normalize`."""
    return (np.asarray(v, np.float32) + 1.0) / 2.0 * 1000.0 - 200.0


def pixel_to_smga(kps: np.ndarray) -> np.ndarray:
    """(F, 134, 3) pixel keypoints -> (F, 402) SMGA vectors with the legs zeroed."""
    kps = _check(kps)
    out = normalize(kps)  # (F, 134, 3)
    out[:, LEGS] = 0.0  # legs are zeroed in normalised space
    return out.reshape(len(out), N_KEYPOINTS * 3)  # (F, 402)


def smga_to_pixel(vec: np.ndarray) -> np.ndarray:
    """(F, 402) SMGA vectors -> (F, 134, 3) pixel keypoints (scores back in [0, 1] space; legs marked invalid)."""
    vec = np.asarray(vec, np.float32)
    if vec.ndim == 1:
        vec = vec[None]
    kps = denormalize(vec.reshape(len(vec), N_KEYPOINTS, 3))  # (F, 134, 3)
    kps[:, LEGS] = np.array([INVALID, INVALID, 0.0], np.float32)
    return kps


def pixel_to_unit(kps: np.ndarray, canvas: int = CANVAS) -> np.ndarray:
    """Pixel keypoints -> unit coordinates (x / canvas); invalid points stay -1."""
    kps = _check(kps).copy()
    valid = (kps[..., 0] >= 0) & (kps[..., 1] >= 0)  # (F, 134)
    kps[..., :2] = np.where(valid[..., None], kps[..., :2] / canvas, INVALID)
    return kps


def unit_to_pixel(kps: np.ndarray, canvas: int = CANVAS) -> np.ndarray:
    """Unit keypoints -> pixel coordinates; invalid points stay -1."""
    kps = _check(kps).copy()
    valid = (kps[..., 0] >= 0) & (kps[..., 1] >= 0)
    kps[..., :2] = np.where(valid[..., None], kps[..., :2] * canvas, INVALID)
    return kps


def load_pose_file(path) -> np.ndarray:
    """Read keypoints from .npy / .npz (key 'keypoints', else the only array) / .json ({"keypoints": [...]}).

    Returns (F, 134, 3) float32 PIXEL keypoints on the 512 canvas. A single pose (134, 3) becomes F = 1.
    """
    import json
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"pose file not found: {p}")
    try:
        if p.suffix == ".npy":
            arr = np.load(p, allow_pickle=False)
        elif p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                if "keypoints" in z:
                    arr = z["keypoints"]
                elif len(z.files) == 1:
                    arr = z[z.files[0]]
                else:
                    raise ValueError(f"has arrays {z.files}; expected one named 'keypoints'")
        elif p.suffix == ".json":
            data = json.loads(p.read_text())
            arr = np.asarray(data["keypoints"] if isinstance(data, dict) else data, np.float32)
        else:
            raise ValueError("unknown extension (use .npy, .npz or .json)")
        return _check(arr)
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"pose file {p}: {e}") from e


def save_pose_file(path, kps: np.ndarray) -> None:
    """Write (F, 134, 3) pixel keypoints as .npz (key 'keypoints') or .npy."""
    from pathlib import Path

    p = Path(path)
    kps = _check(kps)
    if p.suffix == ".npy":
        np.save(p, kps)
    else:
        np.savez(p, keypoints=kps)
