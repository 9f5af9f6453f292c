"""``fastinsight train``: its flags and how they map onto ``fastinsight.train``."""

from __future__ import annotations

import argparse
import sys

from fastinsight.text import terminal_text
from fastinsight.train import TrainConfig, train_from_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fastinsight train``."""
    d = TrainConfig()
    parser.add_argument(
        "features", help="folder of <slide_id>.h5 feature files (INSIGHT, CLAM or TRIDENT)"
    )
    parser.add_argument(
        "labels", help="labels CSV: slide_id,<class>,... with 0/1 (optional split column)"
    )
    parser.add_argument("--out", required=True, help="model file to write (.safetensors)")
    g = parser.add_argument_group("features")
    g.add_argument("--patches-dir", default=None, help="CLAM patches/ folder (tile geometry)")
    g.add_argument("--patch-size-l0", type=int, default=None, help="tile side in level-0 px")
    g.add_argument(
        "--snap-to-grid",
        action="store_true",
        help="round tile coordinates to the nearest grid cell (CLAM multi-contour slides)",
    )
    g.add_argument(
        "--encoder", default=None, help="encoder that made the features (recorded in the model)"
    )
    g.add_argument(
        "--tile-size", type=int, default=None, help="tile side in px at the encoder's resolution"
    )
    g.add_argument("--mpp", type=float, default=None, help="um/px of the tiles the encoder saw")
    g.add_argument(
        "--skip-missing", action="store_true", help="train without labelled slides lacking features"
    )
    m = parser.add_argument_group("model")
    m.add_argument("--pooling", choices=("smoothmax", "lse_lba", "max", "mean"), default=None)
    m.add_argument("--smoothmax-a", type=float, default=None)
    m.add_argument("--lse-r0", type=float, default=None)
    m.add_argument("--pool-input", choices=("heatmap", "logit"), default=None)
    m.add_argument("--norm", choices=("tile", "channel"), default=None)
    m.add_argument("--context", choices=("tile", "slide"), default=None)
    t = parser.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=d.epochs)
    t.add_argument("--lr", type=float, default=d.lr)
    t.add_argument("--weight-decay", type=float, default=d.weight_decay)
    t.add_argument("--optimizer", choices=("adam", "adamw"), default=d.optimizer)
    t.add_argument(
        "--sd-lambda", type=float, default=d.sd_lambda, help="spectral-decoupling weight"
    )
    t.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    t.add_argument("--pos-weight", type=float, nargs="+", default=list(d.pos_weight))
    t.add_argument("--neg-weight", type=float, nargs="+", default=list(d.neg_weight))
    t.add_argument("--class-weights", type=float, nargs="+", default=list(d.class_weights))
    t.add_argument(
        "--chunk-size", type=int, default=d.chunk_size, help="tiles per checkpointed chunk"
    )
    t.add_argument(
        "--grad-checkpoint", choices=("auto", "always", "never"), default=d.grad_checkpoint
    )
    t.add_argument(
        "--train-threshold", choices=("chunk", "slide", "none"), default=d.train_threshold
    )
    t.add_argument("--val-fraction", type=float, default=d.val_fraction)
    t.add_argument("--patience", type=int, default=d.patience)
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--accumulate", type=int, default=d.accumulate, help="slides per optimizer step")
    t.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1, ...")
    t.add_argument("--resume", action="store_true", help="continue from <out>.train.pt")
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh over a previous run's --out, .train.pt and .metrics.* (without it, "
        "a fresh run refuses to replace them)",
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run ``fastinsight train`` from parsed arguments."""
    from tqdm.auto import tqdm

    cfg = TrainConfig(
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        optimizer=args.optimizer,
        sd_lambda=args.sd_lambda,
        label_smoothing=args.label_smoothing,
        pos_weight=tuple(args.pos_weight),
        neg_weight=tuple(args.neg_weight),
        class_weights=tuple(args.class_weights),
        chunk_size=args.chunk_size,
        grad_checkpoint=args.grad_checkpoint,
        train_threshold=args.train_threshold,
        val_fraction=args.val_fraction,
        patience=args.patience,
        seed=args.seed,
        accumulate=args.accumulate,
        device=args.device,
    )
    options = {
        "pooling": args.pooling,
        "smoothmax_a": args.smoothmax_a,
        "lse_r0": args.lse_r0,
        "pool_input": args.pool_input,
        "norm": args.norm,
        "context": args.context,
    }
    result = train_from_folder(
        args.features,
        args.labels,
        args.out,
        cfg,
        model_options={k: v for k, v in options.items() if v is not None},
        patches_dir=args.patches_dir,
        patch_size_l0=args.patch_size_l0,
        snap_to_grid=args.snap_to_grid,
        encoder=args.encoder,
        tile_size_px=args.tile_size,
        mpp=args.mpp,
        resume=args.resume,
        overwrite=args.overwrite,
        skip_missing=args.skip_missing,
        progress=not args.no_progress,
        log=tqdm.write,
    )
    for note in result.notes:  # beside the error lines, not in the output a script reads
        print(f"fastinsight: note: {terminal_text(note)}", file=sys.stderr)
    best = "n/a" if result.best_val_loss is None else f"{result.best_val_loss:.4f}"
    print(
        f"wrote {result.model_path} (epoch {result.best_epoch}, val loss {best}); metrics in "
        f"{result.metrics_csv}; resume state {result.state_path}"
    )
    return 0
