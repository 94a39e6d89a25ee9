import json

import numpy as np
import pytest

from mmgt import keypoints as K


def _pose(frames=2, seed=0):
    rng = np.random.default_rng(seed)
    kps = rng.uniform(10, 500, size=(frames, K.N_KEYPOINTS, 3)).astype(np.float32)
    kps[..., 2] = rng.uniform(0.5, 1.0, size=(frames, K.N_KEYPOINTS))
    return kps


def test_layout_ranges():
    assert len(K.BODY) == 18 and len(K.FEET) == 6 and len(K.FACE) == 68
    assert len(K.HAND_1) == 21 and len(K.HAND_2) == 21
    assert K.LIPS[0] == 72 and K.LIPS[-1] == 91
    assert K.FACE_STREAM.sum() == 68 and (K.FACE_STREAM ^ K.BODY_STREAM).all()


def test_normalise_values():
    # ((v + 200) / 1000) * 2 - 1: 0 -> -0.6, 300 -> 0.0, 800 -> 1.0
    assert np.allclose(K.normalize(np.array([0.0, 300.0, 800.0])), [-0.6, 0.0, 1.0])
    assert np.allclose(K.denormalize(np.array([-0.6, 0.0, 1.0])), [0.0, 300.0, 800.0], atol=1e-4)


def test_smga_round_trip_and_legs_zeroed():
    kps = _pose()
    vec = K.pixel_to_smga(kps)
    assert vec.shape == (2, 402)
    legs = vec.reshape(2, 134, 3)[:, K.LEGS]
    assert np.all(legs == 0.0)
    back = K.smga_to_pixel(vec)
    keep = np.ones(134, bool)
    keep[K.LEGS] = False
    np.testing.assert_allclose(back[:, keep], kps[:, keep], atol=1e-3)
    assert np.all(back[:, K.LEGS, :2] == K.INVALID)


def test_validity_and_neck():
    kps = _pose(1)
    kps[0, K.R_SHOULDER] = [100, 200, 0.9]
    kps[0, K.L_SHOULDER] = [300, 220, 0.8]
    kps[0, 30, 2] = 0.1  # a low-confidence face point
    out = K.apply_validity(kps)
    np.testing.assert_allclose(out[0, K.NECK, :2], [200, 210])
    assert tuple(out[0, 30, :2]) == (K.INVALID, K.INVALID)
    kps[0, K.L_SHOULDER, 2] = 0.2  # one shoulder unsure -> no neck
    out = K.apply_validity(kps)
    assert tuple(out[0, K.NECK, :2]) == (K.INVALID, K.INVALID)


def test_unit_pixel_round_trip_keeps_invalid():
    kps = _pose()
    kps[0, 5, :2] = K.INVALID
    unit = K.pixel_to_unit(kps)
    assert unit[0, 5, 0] == K.INVALID and 0 < unit[1, 5, 0] < 1
    np.testing.assert_allclose(K.unit_to_pixel(unit), kps, atol=1e-4)


@pytest.mark.parametrize("suffix", [".npz", ".npy", ".json"])
def test_pose_file_round_trip(tmp_path, suffix):
    kps = _pose(3)
    p = tmp_path / f"pose{suffix}"
    if suffix == ".json":
        p.write_text(json.dumps({"keypoints": kps.tolist()}))
    else:
        K.save_pose_file(p, kps)
    np.testing.assert_allclose(K.load_pose_file(p), kps, atol=1e-5)


def test_pose_file_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        K.load_pose_file(tmp_path / "nope.npz")
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((4, 17, 2), np.float32))
    with pytest.raises(ValueError, match=r"bad\.npy.*\(F, 134, 3\)"):
        K.load_pose_file(bad)
