"""The container does not change the answer: the same pixels written as an Aperio SVS, a generic
pyramidal TIFF and an OME-TIFF with SubIFDs give the same tissue mask, heatmap and score."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from slide_containers import CONTAINERS, box_pyramid, write_container
from slide_testutil import synthetic_slide

from fastinsight.slide import TileGrid, detect_tissue, open_slide, read_overview, tissue_tiles

MPP = 0.25


@pytest.fixture(scope="module")
def containers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("containers")
    levels = box_pyramid(synthetic_slide(1800, 1200, seed=3), 3)
    return {k: write_container(folder / f"s.{k}.tif", levels, MPP, k) for k in CONTAINERS}


def test_same_levels_mpp_and_tissue_mask(containers: dict[str, Path]) -> None:
    masks = {}
    for kind, path in containers.items():
        with open_slide(path) as reader:
            assert reader.backend == "direct"
            assert reader.level_count == 3 and reader.mpp == pytest.approx(MPP)
            tissue = detect_tissue(reader, "brightfield")
            # a fixed physical pixel: 8 um, from level 2 (4 x 0.25 = 1 um <= 8 um), area average
            assert tissue.mask_mpp == pytest.approx(8.0)
            assert tissue.shape == (round(1200 * MPP / 8), round(1800 * MPP / 8))
            assert (tissue.level, tissue.reader, tissue.sampling) == (2, "direct", "area")
            masks[kind] = tissue
    for kind in CONTAINERS[1:]:
        np.testing.assert_array_equal(masks[kind].mask, masks["svs"].mask)
        assert masks[kind].threshold == masks["svs"].threshold
    assert 0.05 < masks["svs"].tissue_fraction < 0.6


def test_openslide_view_gives_the_same_mask_where_it_sees_the_pyramid(
    containers: dict[str, Path],
) -> None:
    with open_slide(containers["svs"], backend="direct") as d:
        ref = detect_tissue(d, "brightfield").mask
    for kind in ("svs", "tiff"):
        with open_slide(containers[kind], backend="openslide") as o:
            np.testing.assert_array_equal(detect_tissue(o, "brightfield").mask, ref)


def test_tissue_mask_does_not_depend_on_the_levels_present(tmp_path: Path) -> None:
    # Level 0 only vs level 0 + its 2x and 4x area reductions: the 8 um image is an area
    # average either way (from level 0 or from an exact reduction of it), so the masks agree.
    levels = box_pyramid(synthetic_slide(1536, 1024, seed=5), 3)
    one = write_container(tmp_path / "one.tif", levels[:1], MPP, "tiff")
    three = write_container(tmp_path / "three.tif", levels, MPP, "tiff")
    with open_slide(one) as a, open_slide(three) as b:
        ia = read_overview(a, 64, 32).image.astype(int)
        ib = read_overview(b, 64, 32).image.astype(int)
        assert np.abs(ia - ib).max() <= 1  # integer scales: only the rounding of the reductions
        ta, tb = detect_tissue(a, "brightfield"), detect_tissue(b, "brightfield")
        assert (ta.level, tb.level) == (0, 2)
        assert (ta.mask != tb.mask).mean() < 0.01


def test_same_heatmap_and_score_with_a_tiny_random_encoder(containers: dict[str, Path]) -> None:
    torch = pytest.importorskip("torch")
    from fastinsight import InsightConfig, InsightModel
    from fastinsight.encoders import build_encoder
    from fastinsight.predict.slide import PredictOptions, predict_slide

    torch.manual_seed(0)
    model = InsightModel(
        InsightConfig(in_dim=64, num_classes=2, class_names=("a", "b"), encoder="vit-tiny"),
        backend="reference",
    )
    encoder = build_encoder("vit-tiny")
    opts = PredictOptions(device="cpu", batch_size=8, num_workers=1, progress=False)
    results = {k: predict_slide(p, model, encoder, opts) for k, p in containers.items()}
    ref = results["svs"]
    assert ref.n_tiles > 4
    assert ref.slide_info["reading"]["reader"] == "direct"
    assert all(r.slide_info["reading"] == ref.slide_info["reading"] for r in results.values())
    for kind in CONTAINERS[1:]:
        got = results[kind]
        assert got.n_tiles == ref.n_tiles
        np.testing.assert_array_equal(got.cell_mask, ref.cell_mask)
        np.testing.assert_allclose(got.cells, ref.cells, atol=1e-4, equal_nan=True)
        np.testing.assert_allclose(got.scores, ref.scores, atol=1e-4)
    # the grids agree too (tiles read from the same level)
    grids = {k: TileGrid.from_dict(r.grid.to_dict()) for k, r in results.items()}
    assert len({(g.level, g.shape) for g in grids.values()}) == 1
    with open_slide(containers["ome"]) as reader:
        tissue = detect_tissue(reader, "brightfield")
        assert len(tissue_tiles(ref.grid, tissue, 0.1)) == ref.n_tiles


def test_reading_provenance_names_reader_and_levels(containers: dict[str, Path]) -> None:
    from fastinsight.slide import reading_provenance

    reports = []
    for path in containers.values():
        with open_slide(path) as reader:
            tissue = detect_tissue(reader, "brightfield")
            grid = TileGrid.for_slide(reader, target_mpp=1.0, tile_px=224)
            reports.append(reading_provenance(reader, grid, tissue))
    assert reports[0]["reader"] == "direct"
    assert reports[0]["tissue"]["level"] == 2 and reports[0]["tissue"]["sampling"] == "area"
    assert reports[0]["tiles"]["level"] == 2  # 1.0 um/px = 4 x 0.25: level 2 exactly
    assert reports[0]["tiles"]["level_dimensions"] == [450, 300]
    assert all(r == reports[0] for r in reports)  # the container does not change the answer
