"""Hostile GeoJSON ground truth (fuzz audit D9, D14): a JSON integer too large for a float is
one ``InputError`` (exit 4) like ``1e400``, and a UTF-8 byte-order mark (Windows exports) is
read, not refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fastinsight.errors import InputError
from fastinsight.evaluate import read_geojson_polygons

BIG = "1" + "0" * 400  # a valid JSON integer; float() of it overflows


def _doc(coords: str, geometry: str = "Polygon") -> str:
    return (
        '{"type":"FeatureCollection","features":[{"type":"Feature","id":"a1","geometry":'
        f'{{"type":"{geometry}","coordinates":{coords}}},"properties":{{}}}}]}}'
    )


@pytest.mark.parametrize(
    "text",
    [
        _doc(f"[[[0,0],[{BIG},0],[5000,5000],[0,0]]]"),
        _doc(f"[[[0,0],[10,-{BIG}],[5000,5000],[0,0]]]"),
        _doc(f"[[[[0,0],[10,0],[10,10],[0,0]]],[[[0,0],[{BIG},0],[9,9],[0,0]]]]", "MultiPolygon"),
        _doc(f"[[[0,0],[10,0],[10,10],[0,0]],[[1,1],[2,1],[{BIG},2],[1,1]]]"),  # a hole
    ],
    ids=["x", "negative-y", "multipolygon", "hole"],
)
def test_integer_too_large_for_a_float_is_an_input_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "s1.geojson"
    path.write_text(text)
    with pytest.raises(InputError, match=r"s1\.geojson' feature 0 \(id 'a1'\).*not finite") as e:
        read_geojson_polygons(path)
    assert "\n" not in str(e.value) and len(str(e.value)) < 400


def test_a_utf8_bom_is_accepted(tmp_path: Path) -> None:
    doc = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [8, 0], [8, 8], [0, 0]]]},
                "properties": {"classification": {"name": "Tumör"}},
            }
        ],
    }
    path = tmp_path / "windows.geojson"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(doc, ensure_ascii=False).encode("utf-8"))
    polys = read_geojson_polygons(path, classes=["Tumör"])
    assert len(polys) == 1
    np.testing.assert_array_equal(polys[0][0][1], [8.0, 0.0])


def test_a_bom_in_the_middle_is_still_an_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.geojson"
    path.write_bytes(b'{"type": \xef\xbb\xbf"FeatureCollection", "features": []}')
    with pytest.raises(InputError, match="cannot read .* as GeoJSON"):
        read_geojson_polygons(path)
