"""Peak memory of ``predict-radiograph`` on a large image, and the row-block heatmap coding.

The whole run once peaked at ~48 bytes per input pixel (float64 / int64 temporaries of the
image-size heatmap while quantising it); it now stays a few bytes per pixel: the decoded image,
one float32 map at image size while a class is upsampled, the uint8 codes. Measured in a child
process as the peak of its anonymous resident memory (``RssAnon``, sampled every 2 ms) during a
large run minus its value just before it (after a small run: imports, model, allocator and
thread pools warm), so the difference is what the large image costs; anonymous memory, unlike
``ru_maxrss``, does not move when a loaded machine drops and refaults library pages.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastinsight.models.pylon import PylonConfig, PylonModel, save_pylon
from fastinsight.radiograph import predict as rp
from fastinsight.slide.heatmap_tiff import encode_scores

REPO = Path(__file__).resolve().parents[2]
SIDE = 4096  # 16.8 MP: large enough that a per-pixel regression stands far above the noise

CHILD = textwrap.dedent(
    """
    import json, sys, threading, time
    from fastinsight.cli.main import main

    if len(sys.argv) > 6:  # the whole-map coding the blocks replaced: the test must see it
        import fastinsight.slide.heatmap_tiff as ht

        ht.ENCODE_BLOCK_PIXELS = 1 << 40

    def anon_kib():
        # Anonymous resident memory: what the run allocates. Unlike the total (VmHWM,
        # ru_maxrss) it does not move when a busy machine drops and refaults library pages.
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
        raise RuntimeError("no RssAnon in /proc/self/status")

    def run(image, out):
        peak, stop = [anon_kib()], threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], anon_kib())
                time.sleep(0.002)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            rc = main(["predict-radiograph", image, "--model", sys.argv[1], "--out", out,
                       "--device", "cpu", "--quiet"])
        finally:
            stop.set()
            sampler.join()
        assert rc == 0, rc
        return max(peak[0], anon_kib())

    small = run(sys.argv[2], sys.argv[4])  # imports, model, allocator and thread pools warm
    resident = anon_kib()
    large = run(sys.argv[3], sys.argv[5])
    print(json.dumps({"small_kib": small, "resident_kib": resident, "large_kib": large}))
    """
)


def _peak_bytes_per_pixel(tmp_path: Path, *, old_coding: bool = False) -> float:
    """Anonymous memory a ``SIDE`` x ``SIDE`` picture costs above a warm process, per pixel."""
    torch.manual_seed(0)
    cfg = PylonConfig(
        num_classes=2, stem_width=4, layers=(1, 1, 1, 1), dec_channels=8, class_names=("A", "B")
    )
    model = tmp_path / "m.safetensors"
    save_pylon(PylonModel(cfg), model)
    small, large = _png(tmp_path / "small.png", 256), _png(tmp_path / "large.png", SIDE)
    argv = [str(model), str(small), str(large), str(tmp_path / "s.tif"), str(tmp_path / "l.tif")]
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *argv, *(["old"] if old_coding else [])],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "l.tif").stat().st_size > 0
    sizes = json.loads(proc.stdout.strip().splitlines()[-1])
    return (sizes["large_kib"] - sizes["resident_kib"]) * 1024 / SIDE**2


def _png(path: Path, side: int) -> Path:
    """A smooth grey picture (cheap to compress and decode), uint8 ``[side, side]``."""
    y = np.linspace(0.0, 20.0, side, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 17.0, side, dtype=np.float32)[None, :]
    img = (127 + 60 * np.sin(x) * np.cos(y)).astype(np.uint8)
    Image.fromarray(img).save(path, compress_level=1)
    return path


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
def test_large_image_peak_memory_is_a_few_bytes_per_pixel(tmp_path: Path) -> None:
    per_pixel = _peak_bytes_per_pixel(tmp_path)
    # Now ~6 bytes/pixel (1 decoded image + 4 float32 map or resize input + 1 codes); with the
    # whole-map coding it was ~38 (checked below). The bound leaves room for library changes.
    assert per_pixel < 16, f"{per_pixel:.1f} B/px of anonymous memory above the warm process"


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
def test_the_measure_sees_the_whole_map_coding(tmp_path: Path) -> None:
    """The measurement above can fail: the coding it replaced costs well over its bound."""
    assert _peak_bytes_per_pixel(tmp_path, old_coding=True) > 24


def test_block_coding_equals_whole_map_coding(monkeypatch: pytest.MonkeyPatch) -> None:
    import fastinsight.slide.heatmap_tiff as ht

    rng = np.random.default_rng(0)
    hm = rng.random((37, 29), dtype=np.float32)
    # exact ends, out-of-range values, NaN, and values on the rounding boundaries
    hm[0, :6] = [0.0, 1.0, -0.5, 1.5, np.nan, 0.5 / 254]
    hm[1, :4] = np.array([1.5, 2.5, 100.5, 253.5], dtype=np.float32) / 254
    monkeypatch.setattr(ht, "ENCODE_BLOCK_PIXELS", 1 << 40)
    whole = encode_scores(hm, (0.0, 1.0))  # one block: the coding as it was
    for block in (1, 29, 30, 100, 10_000):  # one value, whole rows, ragged last block, one block
        monkeypatch.setattr(ht, "ENCODE_BLOCK_PIXELS", block)
        codes = encode_scores(hm, (0.0, 1.0))
        assert codes.dtype == np.uint8 and codes.shape == hm.shape
        np.testing.assert_array_equal(codes, whole)
    assert encode_scores(np.float32(0.5)).shape == ()  # a scalar stays a scalar


def test_written_heatmap_is_the_whole_map_coding(tmp_path: Path) -> None:
    """The TIFF holds exactly ``encode_scores`` of the image-size map (multi-block image)."""
    import tifffile

    torch.manual_seed(1)
    cfg = PylonConfig(
        num_classes=2, stem_width=4, layers=(1, 1, 1, 1), dec_channels=8, class_names=("A", "B")
    )
    path = tmp_path / "m.safetensors"
    save_pylon(PylonModel(cfg), path)
    model = rp.load_radiograph_model(path, device="cpu")
    img = _png(tmp_path / "cxr.png", 700)  # > ENCODE_BLOCK_PIXELS: several blocks
    result = next(iter(rp.predict_radiographs([img], model)))
    assert isinstance(result, rp.RadiographResult)
    rp.write_heatmap(tmp_path / "hm.tif", result, 1, "test")
    np.testing.assert_array_equal(
        tifffile.imread(tmp_path / "hm.tif"), encode_scores(result.heatmap(1), (0.0, 1.0))
    )
