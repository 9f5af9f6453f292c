"""Where the radiograph arg-max lands: the bookkeeping is exact; PYLON's /32 path is not.

Diagnosis of the demo's 20-40 px down-right arg-max: the predict path maps a CAM peak to the
right image pixel in ``(x, y)`` order (test 1), the synthetic boxes frame the pasted nodules
(test 2); the offset comes from PYLON's own decoder, whose ``align_corners=True`` upsampling of
the /32 pyramid-attention feature places the feature seen at ``32 c`` px at ``36 c`` px (test 3).
"""

from __future__ import annotations

import numpy as np
import torch

from fastinsight.models.pylon import PylonConfig, PylonModel
from fastinsight.radiograph.evaluate import Box, evaluate_localisation
from fastinsight.radiograph.io import Radiograph
from fastinsight.radiograph.predict import RadiographResult
from fastinsight.radiograph.synthetic import synthetic_cxr


def test_cam_peak_maps_to_its_image_pixel_in_x_y_order() -> None:
    cam = torch.zeros(1, 64, 64)
    cam[0, 10, 40] = 1.0  # row 10, column 40 of a /4 map
    image = np.zeros((300, 200), np.uint8)  # non-square: H 300, W 200
    r = RadiographResult(Radiograph("a.png", image), np.array([0.9]), cam, ("Nodule",))
    x, y, v = r.argmax_point(0)
    # align_corners=True: index c of n spans the image as c (S - 1) / (n - 1).
    assert (x, y) == (round(40 * 199 / 63), round(10 * 299 / 63)) and v > 0.5
    hit = Box("Nodule", x - 3, y - 3, 6, 6)
    swapped = Box("Nodule", y - 3, x - 3, 6, 6)
    for box, want in ((hit, 1), (swapped, 0)):
        loc = evaluate_localisation(lambda i, c: r.heatmap(0), {"a.png": [box]}, ("Nodule",))
        assert loc.point_hits.get("Nodule", 0) == want


def test_synthetic_boxes_frame_the_pasted_nodules() -> None:
    rng = np.random.default_rng(3)
    plain = synthetic_cxr(np.random.default_rng(3), nodule=False)
    case = synthetic_cxr(rng, nodule=True)
    assert case.boxes
    # The same draws up to the nodule: the difference is the nodules (plus noise).
    diff = case.image.astype(np.float32) - plain.image.astype(np.float32)
    for x, y, w, h in case.boxes:
        cy, cx = int(round(y + h / 2)), int(round(x + w / 2))
        patch = diff[cy - 2 : cy + 3, cx - 2 : cx + 3]
        assert patch.mean() > 60  # the disc's bright centre is at the box centre


def test_pylon_pyramid_attention_path_is_placed_down_right() -> None:
    torch.manual_seed(0)
    model = PylonModel(
        PylonConfig(num_classes=1, stem_width=4, layers=(1, 1, 1, 1), dec_channels=8)
    )
    model.eval()
    for up in (model.net.decoder.up3, model.net.decoder.up2, model.net.decoder.up1):
        for m in up.modules():  # silence the skips: only the /32 path reaches the head
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.data.zero_()
                m.bias.data.zero_()
    x = (0.01 * torch.randn(1, 1, 256, 256)).requires_grad_(True)
    model(x)[0, 0, 56, 56].backward()  # the CAM cell at pixel (224, 224)
    g = x.grad[0, 0].abs()
    coords = torch.arange(256.0)
    seen_y = float((g.sum(1) * coords).sum() / g.sum())
    seen_x = float((g.sum(0) * coords).sum() / g.sum())
    # It sees about 200 px, not 224: a ~24 px shift down-right in the map, as the demo measured.
    assert 185 < seen_y < 212 and 185 < seen_x < 212
