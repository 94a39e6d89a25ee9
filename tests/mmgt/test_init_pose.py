"""Initial pose: DWPose's pure pieces, the whole DWPose path on fake ONNX models, the pose file and the template."""
import math

import numpy as np
import pytest

from mmgt.init_pose import (
    DET_FILE, POSE_FILE, crop_person, crop_to_image, detection_boxes, initial_pose, letterbox, nms,
    simcc_decode, template_pose, template_pose_512, warp_matrix, wholebody_to_mmgt,
)
from mmgt.keypoints import N_KEYPOINTS, save_pose_file

# ------------------------------------------------------------------------------------------------ pure pieces


def test_wholebody_to_mmgt_reorders_and_inserts_neck():
    kps = np.stack([np.arange(133) * 2.0, 1000.0 + np.arange(133)], axis=-1)[None]  # (1, 133, 2): x = 2 * coco
    scores = np.full((1, 133), 0.9)
    out = wholebody_to_mmgt(kps, scores)
    assert out.shape == (1, 134, 3)
    coco_of_openpose = [0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3]
    for op, coco in enumerate(coco_of_openpose):
        if coco is not None:
            assert out[0, op, 0] == 2.0 * coco and out[0, op, 1] == 1000.0 + coco
    assert tuple(out[0, 1]) == (11.0, 1005.5, 1.0)  # neck: mean of coco 5 and 6, score 1 (both > 0.3)
    np.testing.assert_array_equal(out[0, 18:, 0], 2.0 * np.arange(17, 133))  # feet, face, hands unchanged
    scores[0, 6] = 0.3  # not > 0.3: the neck is not confident
    assert wholebody_to_mmgt(kps, scores)[0, 1, 2] == 0.0


def test_simcc_decode_synthetic_peaks():
    k = 133
    sx, sy = np.zeros((1, k, 576), np.float32), np.zeros((1, k, 768), np.float32)
    for i in range(k - 1):
        sx[0, i, 2 * i + 10] = 0.8
        sy[0, i, 3 * i + 5] = 0.6
    locs, vals = simcc_decode(sx, sy)
    assert locs.shape == (1, k, 2) and vals.shape == (1, k)
    assert tuple(locs[0, 7]) == (12.0, 13.0)  # (2*7+10)/2, (3*7+5)/2
    assert vals[0, 7] == pytest.approx(0.6)  # the smaller of the two maxima
    assert tuple(locs[0, k - 1]) == (-0.5, -0.5) and vals[0, k - 1] == 0.0  # no response: -1 / split ratio


def test_letterbox_round_trip():
    img = np.zeros((300, 200, 3), np.uint8)
    img[100:110, 50:60] = 255  # a marker
    padded, r = letterbox(img)
    assert padded.shape == (3, 640, 640) and padded.dtype == np.float32
    assert r == pytest.approx(640 / 300)
    new_w = int(200 * r)
    assert np.all(padded[:, :, new_w:] == 114) and np.all(padded[:, 0, :new_w] == 0)
    ys, xs = np.nonzero(padded[0] > 200)
    # letterbox coordinates / r give back the image coordinates of the marker
    assert xs.min() / r == pytest.approx(50, abs=1) and (xs.max() + 1) / r == pytest.approx(60, abs=1)
    assert ys.min() / r == pytest.approx(100, abs=1) and (ys.max() + 1) / r == pytest.approx(110, abs=1)


def yolox_raw(entries):
    """(8400, 85) YOLOX output with given anchors set: entries = [(anchor, dx, dy, w_px, h_px, obj, person)]."""
    raw = np.zeros((8400, 85), np.float32)
    for anchor, dx, dy, w, h, obj, person in entries:
        stride = 8 if anchor < 6400 else (16 if anchor < 8000 else 32)
        raw[anchor, :4] = (dx, dy, math.log(w / stride), math.log(h / stride))
        raw[anchor, 4], raw[anchor, 5] = obj, person
    return raw


def test_detection_boxes_decode_nms_and_filter():
    # anchor 30 * 80 + 40 at stride 8: centre ((40 + 0.5) * 8, (30 + 0.5) * 8) = (324, 244)
    raw = yolox_raw([
        (2440, 0.5, 0.5, 200, 400, 1.0, 0.9),  # person, score 0.9
        (2441, 0.5, 0.5, 200, 400, 1.0, 0.8),  # 8 px to the right: suppressed by NMS
        (6400 + 5 * 40 + 5, 0.0, 0.0, 64, 64, 1.0, 0.2),  # score 0.2: enters NMS, dropped by the 0.3 filter
        (8000 + 0, 0.0, 0.0, 96, 96, 0.5, 0.7),  # a separate person (stride 32 at (0, 0)), score 0.35
    ])
    boxes = detection_boxes(raw[None], ratio=2.0)
    assert boxes.shape == (2, 4)
    np.testing.assert_allclose(boxes[0], np.array([224, 44, 424, 444]) / 2.0, atol=1e-4)
    np.testing.assert_allclose(boxes[1], np.array([-48, -48, 48, 48]) / 2.0, atol=1e-4)
    assert detection_boxes(np.zeros((1, 8400, 85), np.float32), 1.0).shape == (0, 4)


def test_nms_keeps_best_of_overlaps():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], np.float64)
    assert nms(boxes, np.array([0.5, 0.9, 0.7]), 0.45) == [1, 2]


def test_crop_affine_round_trip():
    img = np.zeros((512, 512, 3), np.uint8)
    img[300:304, 200:204] = 255  # a bright marker around (201.5, 301.5)
    bbox = np.array([150.0, 100.0, 330.0, 460.0])
    crop, center, scale = crop_person(img, bbox, (288, 384))
    assert crop.shape == (3, 384, 288) and crop.dtype == np.float32
    assert scale[1] == pytest.approx(360 * 1.25) and scale[0] == pytest.approx(360 * 1.25 * 0.75)
    # image -> crop through the warp matrix, crop -> image through the postprocess rescale
    pts = np.array([[201.5, 301.5], [150.0, 100.0], [330.0, 460.0], [256.0, 10.0]])
    m = warp_matrix(center, scale, (288, 384))
    in_crop = pts @ m[:, :2].T + m[:, 2]
    np.testing.assert_allclose(crop_to_image(in_crop, (288, 384), center, scale), pts, atol=1e-3)
    # the marker lands where the matrix says (crop normalised: bright pixels are the maximum)
    ys, xs = np.nonzero(crop[0] > crop[0].min() + 1)
    assert xs.mean() == pytest.approx(in_crop[0, 0], abs=1.0) and ys.mean() == pytest.approx(in_crop[0, 1], abs=1.0)


# ------------------------------------------------------------------------------------------------ fake DWPose


def _constant_model(input_name, input_shape, outputs):
    """ONNX graph whose outputs are constants plus 0 * mean(input), so the input must be fed with the right
    name/shape/type and the outputs keep the real models' names and shapes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("ReduceMean", [input_name], ["m"], keepdims=0),
             helper.make_node("Mul", ["m", "zero"], ["z"])]
    inits = [numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    outs = []
    for name, value in outputs:
        inits.append(numpy_helper.from_array(value.astype(np.float32), f"{name}_const"))
        nodes.append(helper.make_node("Add", [f"{name}_const", "z"], [name]))
        outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape)))
    graph = helper.make_graph(nodes, "fake", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT,
                                                                            list(input_shape))], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


IX = 100 + 2 * np.arange(133)  # SimCC peak of keypoint k on x
IY = 200 + 3 * np.arange(133)


@pytest.fixture(scope="module")
def dwpose_dir(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    import onnx

    root = tmp_path_factory.mktemp("weights")
    (root / "DWPose").mkdir()
    det = yolox_raw([(2440, 0.5, 0.5, 200, 400, 1.0, 0.9)])[None]  # one person, letterbox box (224, 44, 424, 444)
    onnx.save(_constant_model("images", (1, 3, 640, 640), [("output", det)]), str(root / DET_FILE))
    sx, sy = np.zeros((1, 133, 576), np.float32), np.zeros((1, 133, 768), np.float32)
    sx[0, np.arange(133), IX] = 0.9
    sy[0, np.arange(133), IY] = 0.7
    onnx.save(_constant_model("input", (1, 3, 384, 288), [("simcc_x", sx), ("simcc_y", sy)]), str(root / POSE_FILE))
    return root


def expected_fake_pose():
    """By hand: a 512 image letterboxes with r = 1.25, so the person box is (179.2, 35.2, 339.2, 355.2); centre
    (259.2, 195.2), scale (160, 320) x 1.25 = (200, 400) -> aspect 0.75 -> (300, 400); keypoint = peak / 2 / crop
    size * scale + centre - scale / 2."""
    x = IX / 2.0 / 288 * 300 + 259.2 - 150.0
    y = IY / 2.0 / 384 * 400 + 195.2 - 200.0
    return wholebody_to_mmgt(np.stack([x, y], -1)[None], np.full((1, 133), 0.7))[0]


def test_dwpose_path_end_to_end(dwpose_dir):
    img = np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)
    kps, method = initial_pose(img, weights_dir=dwpose_dir)
    assert method == "dwpose"
    assert kps.shape == (N_KEYPOINTS, 3) and kps.dtype == np.float32
    np.testing.assert_allclose(kps, expected_fake_pose(), atol=1e-3)
    # another image size: DWPose runs on the image resized to the 512 canvas, so the canvas keypoints are the same
    big = np.random.default_rng(1).integers(0, 255, (768, 1024, 3), dtype=np.uint8)
    kps_big, _ = initial_pose(big, weights_dir=dwpose_dir)
    np.testing.assert_allclose(kps_big, kps, atol=1e-3)


def test_pose_file_wins_over_dwpose(dwpose_dir, tmp_path):
    pose = template_pose_512()[None].repeat(2, axis=0)
    pose[1] += 5.0
    path = tmp_path / "pose.npz"
    save_pose_file(path, pose)
    kps, method = initial_pose(np.zeros((64, 64, 3), np.uint8), weights_dir=dwpose_dir, pose_file=path)
    assert method == "pose_file"
    np.testing.assert_array_equal(kps, pose[0])


# ------------------------------------------------------------------------------------------------ template


def test_template_without_dwpose_or_foreground(tmp_path):
    img = np.full((512, 512, 3), 128, np.uint8)  # uniform: no foreground
    kps, method = initial_pose(img, weights_dir=tmp_path)  # no DWPose files there
    assert method == "template"
    np.testing.assert_array_equal(kps, template_pose_512())
    valid = kps[:, 2] > 0
    assert not valid[[9, 10, 12, 13]].any() and not valid[18:24].any()  # legs and feet invalid
    assert np.all(kps[~valid, :2] == -1.0)
    assert valid[:9].all() and valid[24:134].all()
    assert kps[0, 1] < kps[1, 1] < kps[8, 1]  # nose above neck above hips
    assert kps[2, 0] < kps[1, 0] < kps[5, 0]  # right shoulder on the image left
    face = kps[24:92]
    assert face[:, 0].min() > kps[2, 0] and face[:, 0].max() < kps[5, 0] and face[:, 1].max() < kps[1, 1]
    hand1, hand2 = kps[92:113], kps[113:134]
    assert np.linalg.norm(hand1[0, :2] - kps[7, :2]) < 1e-3 and np.linalg.norm(hand2[0, :2] - kps[4, :2]) < 1e-3


def test_template_fits_the_foreground_box():
    img = np.full((400, 800, 3), 20, np.uint8)
    img[100:400, 300:500] = 200  # a person-sized block: x 300..500, y 100..400 of an 800 x 400 image
    kps = template_pose(img)
    valid = kps[:, 2] > 0
    x_img, y_img = kps[valid, 0] * 800 / 512, kps[valid, 1] * 400 / 512  # back to image pixels
    assert x_img.min() >= 300 - 1 and x_img.max() <= 500 + 1
    assert y_img.min() >= 100 - 1 and y_img.max() <= 400 + 1
    assert (x_img.min() + x_img.max()) / 2 == pytest.approx(400, abs=10)  # centred on the block
    # the template's scale is min(200 / 232, 300 / 452): the face is much smaller than in the plain template
    width_ratio = (x_img.max() - x_img.min()) / np.ptp(template_pose_512()[valid, 0])
    assert width_ratio == pytest.approx(300 / 452, rel=0.02)


def test_bad_image_names_the_problem():
    with pytest.raises(ValueError, match="uint8"):
        initial_pose(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="HxW"):
        initial_pose(np.zeros((8, 8, 2), np.uint8))
