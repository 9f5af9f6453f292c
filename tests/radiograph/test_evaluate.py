"""Localisation metrics against brute-force pixel loops; NIH CSV layouts; AUROC."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fastinsight.errors import InputError
from fastinsight.radiograph.evaluate import (
    Box,
    evaluate_auroc,
    evaluate_localisation,
    read_bbox_list,
    read_data_entry,
)

CLASSES = ("Nodule", "Mass", "Effusion")


def _brute(heatmaps, boxes, classes, t_mask=0.5, thresholds=(0.1, 0.25, 0.5)):
    pairs, point = {}, {}
    iou = {t: {} for t in thresholds}
    iobb = {t: {} for t in thresholds}
    for image, bs in boxes.items():
        for c in classes:
            cb = [b for b in bs if b.label == c]
            if not cb:
                continue
            pairs[c] = pairs.get(c, 0) + 1
            hm = heatmaps[(image, c)]
            H, W = hm.shape
            best, bx, by = -math.inf, -1, -1
            for yy in range(H):
                for xx in range(W):
                    if hm[yy, xx] > best:
                        best, bx, by = hm[yy, xx], xx, yy
            hit = any(b.x <= bx <= b.x + b.w and b.y <= by <= b.y + b.h for b in cb)
            point[c] = point.get(c, 0) + hit
            best_iou = best_iobb = 0.0
            for b in cb:
                inter = union = npred = 0
                for yy in range(H):
                    for xx in range(W):
                        p = hm[yy, xx] >= t_mask
                        g = b.x <= xx <= b.x + b.w and b.y <= yy <= b.y + b.h
                        inter += p and g
                        union += p or g
                        npred += p
                best_iou = max(best_iou, inter / union if union else 0.0)
                best_iobb = max(best_iobb, inter / npred if npred else 0.0)
            for t in thresholds:
                iou[t][c] = iou[t].get(c, 0) + (best_iou >= t)
                iobb[t][c] = iobb[t].get(c, 0) + (best_iobb >= t)
    return pairs, point, iou, iobb


def test_localisation_matches_brute_force() -> None:
    rng = np.random.default_rng(3)
    boxes, heatmaps = {}, {}
    for i in range(12):
        name = f"{i:08d}_000.png"
        H, W = int(rng.integers(18, 30)), int(rng.integers(18, 30))
        bs = []
        for _ in range(int(rng.integers(1, 4))):
            c = CLASSES[int(rng.integers(0, 3))]
            bs.append(
                Box(
                    c,
                    float(rng.uniform(0, W - 5)),
                    float(rng.uniform(0, H - 5)),
                    float(rng.uniform(2, 12)),
                    float(rng.uniform(2, 12)),
                )
            )
        boxes[name] = bs
        for c in CLASSES:
            hm = rng.random((H, W)) * 0.8
            if rng.random() < 0.5:  # a blob inside a box of the class (when it has one)
                b = next((b for b in bs if b.label == c), None)
                if b is not None:
                    hm[int(b.y) + 1, int(b.x) + 1] = 1.0
            hm[0, 0] = hm.max() if rng.random() < 0.2 else hm[0, 0]  # a tie: first one wins
            heatmaps[(name, c)] = hm
    res = evaluate_localisation(lambda i, c: heatmaps[(i, c)], boxes, CLASSES)
    pairs, point, iou, iobb = _brute(heatmaps, boxes, CLASSES)
    assert res.pairs == pairs
    assert {c: res.point_hits.get(c, 0) for c in pairs} == point
    for t in (0.1, 0.25, 0.5):
        assert {c: res.iou_hits[t].get(c, 0) for c in pairs} == iou[t]
        assert {c: res.iobb_hits[t].get(c, 0) for c in pairs} == iobb[t]
    d = res.as_dict()["point_accuracy"]
    assert d["micro"] == pytest.approx(sum(point.values()) / sum(pairs.values()))
    assert d["macro"] == pytest.approx(np.mean([point[c] / pairs[c] for c in pairs]))
    assert 0 < sum(point.values()) < sum(pairs.values())  # the data exercise both outcomes


def test_missing_prediction_counts_as_a_miss() -> None:
    boxes = {"a.png": [Box("Mass", 0, 0, 5, 5)]}
    res = evaluate_localisation(lambda i, c: None, boxes, CLASSES)
    assert res.pairs == {"Mass": 1} and res.as_dict()["point_accuracy"]["micro"] == 0.0


def test_nih_csv_layouts_and_auroc(tmp_path) -> None:
    (tmp_path / "BBox_List_2017.csv").write_text(
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
        "00013118_008.png,Atelectasis,225.084745762712,547.019216763771,86.7796610169491,79.1864406779661\n"
        "00014716_007.png,Nodule,686.101694915254,708.474576271186,29.8305084745763,30.5084745762712\n"
        "00014716_007.png,Mass,100,200,50,60\n"
    )
    boxes = read_bbox_list(tmp_path / "BBox_List_2017.csv")
    assert boxes["00014716_007.png"][0] == Box(
        "Nodule", 686.101694915254, 708.474576271186, 29.8305084745763, 30.5084745762712
    )
    assert len(boxes["00014716_007.png"]) == 2
    (tmp_path / "Data_Entry_2017.csv").write_text(
        "Image Index,Finding Labels,Follow-up #,Patient ID\n"
        "a.png,Nodule|Mass,0,1\nb.png,No Finding,0,2\nc.png,Nodule,1,3\nd.png,Effusion,0,4\n"
    )
    labels = read_data_entry(tmp_path / "Data_Entry_2017.csv")
    assert labels["a.png"] == {"Nodule", "Mass"} and labels["b.png"] == set()
    scores = {
        "a.png": {"Nodule": 0.9, "Mass": 0.2, "Effusion": 0.1},
        "b.png": {"Nodule": 0.1, "Mass": 0.3, "Effusion": 0.1},
        "c.png": {"Nodule": 0.5, "Mass": 0.1, "Effusion": 0.2},
        "d.png": {"Nodule": 0.5, "Mass": 0.4, "Effusion": 0.9},
    }
    auc = evaluate_auroc(scores, labels, CLASSES)
    # Nodule: positives {0.9, 0.5} vs negatives {0.1, 0.5}: pairs 1 + 1 + 1 + 0.5 = 3.5 of 4.
    assert auc["Nodule"] == pytest.approx(3.5 / 4)
    assert auc["Mass"] == pytest.approx(1 / 3) and auc["Effusion"] == pytest.approx(1.0)
    (tmp_path / "bad.csv").write_text("name,label\n")
    with pytest.raises(InputError, match="BBox_List_2017"):
        read_bbox_list(tmp_path / "bad.csv")
