"""``run_ct_demo(OUT_DIR)``: INSIGHT on synthetic chest CT end to end, nothing downloaded.

1. writes a cohort of NIfTI volumes (``fastinsight.volume.synthetic``: body, two lungs, vessels,
   ground-glass lesions with their masks) and ``labels.csv`` (``volume_id,label``);
2. encodes every slice with a small random-init ViT (``vit-tiny``, patch 8 on 96 px slices:
   12 x 12 cells per slice) with the official CT preprocessing (HU window, no ImageNet norm);
3. trains INSIGHT on volume labels only (the slide trainer; a volume is a bag of slice grids);
4. predicts the held-out volumes with ``predict_volume`` (heatmap NIfTI + report per volume);
5. scores them: volume AUC and voxel Dice of the kept voxels against the lesion masks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from fastinsight.atomic import atomic_path, claim_demo_folder
from fastinsight.errors import ConfigError
from fastinsight.models.config import InsightConfig

DEMO_TILE = 96
# The random-init ViT needs zero-centred input to give content-dominated tokens (in [0, 1] its
# tokens are mostly position embedding and training stalls at chance); a pretrained DINOv2 takes
# the official un-normalised [0, 1] slices. Stored with the model, so predict uses the same.
DEMO_ENCODER_OPTIONS: dict[str, Any] = {"patch_size_px": 8, "mean": (0.3,) * 3, "std": (0.2,) * 3}
DEMO_LESION_RADIUS = (0.12, 0.18)


def demo_model_config(in_dim: int, grid: int) -> InsightConfig:
    """INSIGHT narrowed (32/16/16) with the per-cell channel norm, as the slide demo."""
    return InsightConfig(
        in_dim=in_dim,
        reduce_dim=32,
        widths=(32, 16, 16),
        grid_size=(grid, grid),
        norm="channel",
        encoder="vit-tiny",
        tile_size_px=DEMO_TILE,
        patch_size_px=DEMO_TILE // grid,
        class_names=("lesion",),
    )


def run_ct_demo(
    out_dir: str | Path,
    volumes: int = 24,
    held_out: int = 8,
    shape: tuple[int, int, int] = (48, 48, 12),
    epochs: int = 15,
    seed: int = 0,
    slice_context: str = "2d",
    device: str | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Run the CT demo; returns (and writes to ``OUT_DIR/report.json``) its summary."""
    from fastinsight.train import Bag, TrainConfig
    from fastinsight.volume.checkpoint import VolumeModelInfo, save_volume_model
    from fastinsight.volume.io import read_nifti
    from fastinsight.volume.predict import (
        VolumeOptions,
        build_volume_encoder,
        encode_volume,
        predict_volume,
    )
    from fastinsight.volume.preprocess import PreprocessOptions
    from fastinsight.volume.synthetic import write_cohort
    from fastinsight.volume.train import (
        VolumeEval,
        summarise,
        train_volume_model,
        volume_dice,
    )

    if volumes < 8 or not 4 <= held_out <= volumes - 4:
        raise ConfigError(f"need >= 8 volumes and 4..volumes-4 held out; got {volumes}, {held_out}")
    if epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {epochs}")
    from fastinsight.inputs import resolve_device

    dev = str(resolve_device(device))  # before the folder is claimed: a bad device leaves none
    out = claim_demo_folder(out_dir)
    start = time.perf_counter()
    log(f"[1/4] writing {volumes} synthetic chest CT volumes {list(shape)} to {out / 'cohort'}")
    rows = write_cohort(
        out / "cohort", volumes, shape=shape, seed=seed, lesion_radius=DEMO_LESION_RADIUS
    )
    train_rows, test_rows = rows[: volumes - held_out], rows[volumes - held_out :]
    pre = PreprocessOptions(tile_size=DEMO_TILE, slices="all", lung_mask="auto")
    enc_opts = {**DEMO_ENCODER_OPTIONS, "seed": seed}
    encoder = build_volume_encoder("vit-tiny", DEMO_TILE, device=dev, options=enc_opts)
    log(f"[2/4] encoding {len(train_rows)} training volumes with {encoder.name} (random init)")
    bags = []
    for vid, label in train_rows:
        vol = read_nifti(out / "cohort" / "volumes" / f"{vid}.nii.gz")
        tokens, _, _ = encode_volume(vol.data, encoder, pre, batch_size=32)
        bags.append(Bag(tokens.cpu(), None, torch.tensor([float(label)]), vid))
    t_encode = time.perf_counter() - start
    log(f"[3/4] training INSIGHT ({slice_context} context) on volume labels, {epochs} epochs")
    mcfg = demo_model_config(encoder.embed_dim, encoder.grid_size[0])
    cfg = TrainConfig(epochs=epochs, lr=3e-3, patience=epochs, seed=seed, device=dev)
    model, _history = train_volume_model(bags, mcfg, cfg, slice_context=slice_context)
    info = VolumeModelInfo(
        encoder="vit-tiny",
        encoder_options=enc_opts,
        tile_size=DEMO_TILE,
        slices="all",
        lung_mask="auto",
    )
    save_volume_model(model, info, out / "model.safetensors")
    t_train = time.perf_counter() - start - t_encode
    log(f"[4/4] predicting {len(test_rows)} held-out volumes -> {out / 'predictions'}")
    evals = []
    for vid, label in test_rows:
        vol = read_nifti(out / "cohort" / "volumes" / f"{vid}.nii.gz")
        res = predict_volume(vol, model, encoder, VolumeOptions(pre, batch_size=32))
        d = out / "predictions" / vid
        d.mkdir(parents=True, exist_ok=True)
        res.write_heatmap(d / "heatmap.nii.gz")
        res.write_report(d / "report.json")
        mask = read_nifti(out / "cohort" / "masks" / f"{vid}.nii.gz").data
        dc = volume_dice(res.heatmap(0), mask, res.slice_indices) if label else None
        evals.append(VolumeEval(vid, label, float(res.scores[0]), dc))
    summary = summarise(evals)
    report = {
        **summary,
        "dice_definition": "voxels kept by the Otsu threshold vs the lesion mask (positives)",
        "slice_context": slice_context,
        "train_volumes": len(train_rows),
        "seconds": {
            "encode_train": round(t_encode, 1),
            "train": round(t_train, 1),
            "total": round(time.perf_counter() - start, 1),
        },
        "device": str(dev),
        "encoder": encoder.identity(),
        "model": str(out / "model.safetensors"),
    }
    with atomic_path(out / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2, default=float) + "\n")
    dm = summary["dice_mean"]
    log(
        f"held-out AUC {summary['auc']:.3f}   Dice {dm if dm is None else round(dm, 3)}   "
        f"({report['seconds']['total']:.0f} s on {dev})"
    )
    return report
