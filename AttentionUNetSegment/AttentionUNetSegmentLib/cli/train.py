"""``attention-unet train``: its options and the run they start (``training.trainer`` does the work)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Union

import torch.distributed as dist

from ..constants import AMP_MODES, DEVICES
from ..errors import AttentionUNetError
from ..progress import PROGRESS_KINDS, default_progress_kind
from ..training.planning import NORMALIZATION_PLANS
from ..training.trainer import AUGMENTATION_SETS, CHECKPOINTS, TrainingConfig, train, train_folds
from .arguments import label_name, label_names as parse_label_names


def parse_duration(text: str) -> float:
    """Seconds from ``"3600"``, ``"90m"``, ``"1.5h"`` or ``"2h30m"``."""
    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", text)
    if not parts or "".join(n + u for n, u in parts) != text.replace(" ", ""):
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: use seconds or e.g. 90m, 1.5h, 2h30m")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``attention-unet train``."""
    parser.add_argument("dataset", nargs="+", help="MSD/nnU-Net folder (imagesTr/, labelsTr/, dataset.json) or a "
                        ".json/.csv file of image/label pairs; more than one trains on them together: the first "
                        "names the model's classes and gives the validation split, the others add training cases "
                        "(their dataset.json may declare coarser labels in 'label_groups')")
    parser.add_argument("--output", "-o", required=True, help="bundle directory to write (model.json + weights)")
    parser.add_argument("--work-dir", help="checkpoints, logs, plan and cache (default: <output>.work)")
    parser.add_argument("--name", default=None, help="model name (default: the output folder's name)")
    parser.add_argument("--model-version", default="1.0.0")
    parser.add_argument("--description", default="")
    parser.add_argument("--license", default="", help="licence note for the weights (and the data they came from)")
    parser.add_argument("--citation", default="")
    parser.add_argument("--training-data", default="", help="what the model was trained on (for the model card)")
    parser.add_argument("--label-names", nargs="+", type=label_name, metavar="VALUE=NAME",
                        help="label names, e.g. 1=Liver 2=Tumour (required for a .csv pairs file; overrides "
                        "dataset.json)")
    group = parser.add_argument_group("plan overrides (derived from the dataset unless given)")
    group.add_argument("--channels", type=int, nargs="+", help="network widths per level, e.g. 16 32 64 128")
    group.add_argument("--patch-size", type=int, nargs=3, metavar=("X", "Y", "Z"))
    group.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), help="target spacing in mm")
    group.add_argument("--batch-size", type=int)
    group.add_argument("--flip-axes", nargs="*", choices=["x", "y", "z"],
                       help="axes where mirroring is allowed (default: all that no label name ties to a side; "
                            "give none to disable mirroring)")
    group.add_argument("--normalization", choices=NORMALIZATION_PLANS,
                       help="zscore (per case), zscore-nonzero (statistics of non-zero voxels), zscore-central "
                            "(statistics of the central block of the median case size only: a larger box around the "
                            "structure, e.g. a localised head, is normalised like the crops), ct (clip to the "
                            "dataset's foreground 0.5-99.5 percentiles, then its mean/std); default: ct for CT "
                            "datasets, else zscore")
    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=int, default=100)
    group.add_argument("--iterations-per-epoch", type=int, default=250)
    group.add_argument("--learning-rate", type=float, default=3e-3)
    group.add_argument("--weight-decay", type=float, default=3e-5)
    group.add_argument("--validation", type=float, default=None,
                       help="validation cases: a fraction (<1) or a count (default 0.2; with --folds the fold is the "
                            "validation set)")
    group.add_argument("--held-out", type=float, default=0.0, metavar="COUNT|FRACTION",
                       help="test cases no run (and no fold) trains or validates on, drawn first with --seed (the "
                            "same cases --validation COUNT would pick); recorded in plan.json and the bundle")
    group.add_argument("--folds", type=int, help="k-fold cross-validation: the number of folds (with --fold)")
    group.add_argument("--fold", type=_fold_choice, help="the fold this run validates on, 0..FOLDS-1 (the other folds "
                       "train), or 'all': every fold in turn (in WORK_DIR/fold<K>/), then their ensemble at --output. "
                       "Runs with the same dataset, --seed, --held-out and --folds agree on every fold's cases")
    group.add_argument("--checkpoint", choices=CHECKPOINTS, default="best",
                       help="the weights the bundle gets: the best validation epoch, or the final epoch (as nnU-Net "
                            "ships; for a validation set too small to choose an epoch by). May change on --resume")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--amp", choices=AMP_MODES, default="none",
                       help="mixed precision: fp16 (CUDA, with gradient scaling) or bf16 (CPU or CUDA)")
    group.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for activation memory")
    group.add_argument("--no-deep-supervision", action="store_true")
    group.add_argument("--attention-loss-weight", type=float, default=0.0,
                       help="weight of the auxiliary attention-supervision BCE (0 = off)")
    group.add_argument("--foreground-fraction", type=float, default=0.33)
    group.add_argument("--elastic", action="store_true", help="add random elastic deformation")
    group.add_argument("--augmentation", choices=list(AUGMENTATION_SETS), default="default",
                       help="default (nnU-Net-like); robust: adds simulated low resolution (for coarser scans "
                            "than the training set's); strong: also bias field, blur, wider and anisotropic "
                            "scaling, stronger noise/contrast and inverted gamma")
    group = parser.add_argument_group("run control")
    group.add_argument("--max-time", type=parse_duration, help="stop after this long (e.g. 3600, 90m, 1.5h), "
                       "keeping the best checkpoint and exporting the bundle")
    group.add_argument("--resume", action="store_true", help="continue the run in --work-dir exactly")
    group.add_argument("--force", action="store_true", help="replace an existing output bundle / work dir run")
    group.add_argument("--device", choices=DEVICES, default="auto")
    group.add_argument("--threads", type=int, help="torch intra-op threads per process")
    group.add_argument("--progress", choices=PROGRESS_KINDS, default=None)


def _fold_choice(text: str) -> Union[int, str]:
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid fold {text!r}: give a number 0..FOLDS-1 or 'all'") from None


def _count_or_fraction(value: float) -> Union[int, float]:
    """A whole number >= 1 as a case count, anything else as given (a fraction)."""
    return int(value) if value >= 1 and value.is_integer() else value


def run_from_args(args: argparse.Namespace) -> int:
    """Entry point of ``attention-unet train``; errors propagate as ``AttentionUNetError`` (exit status 2)."""
    if args.folds is not None and args.validation is not None:
        raise AttentionUNetError("--validation and --folds exclude each other: with --folds the validation cases "
                                 "are fold --fold's; use --held-out for cases no fold sees")
    output = Path(args.output)
    progress = args.progress or default_progress_kind()
    config = TrainingConfig(
        dataset=args.dataset[0], extra_datasets=tuple(args.dataset[1:]), output=str(output),
        work_dir=args.work_dir or f"{output}.work",
        name=args.name or output.name, version=args.model_version, description=args.description,
        license=args.license, citation=args.citation, training_data=args.training_data,
        label_names=parse_label_names(args.label_names), epochs=args.epochs,
        iterations_per_epoch=args.iterations_per_epoch, learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        validation=_count_or_fraction(0.2 if args.validation is None else args.validation),
        seed=args.seed, held_out=_count_or_fraction(args.held_out), folds=args.folds,
        fold=0 if args.fold == "all" else args.fold,
        amp=args.amp, gradient_checkpointing=args.gradient_checkpointing,
        deep_supervision=not args.no_deep_supervision, attention_loss_weight=args.attention_loss_weight,
        foreground_fraction=args.foreground_fraction, elastic=args.elastic,
        augmentation=args.augmentation, checkpoint=args.checkpoint, max_time=args.max_time,
        resume=args.resume, force=args.force, device=args.device, threads=args.threads, progress=progress,
        channels=tuple(args.channels) if args.channels else None,
        patch_size=tuple(args.patch_size) if args.patch_size else None,
        target_spacing=tuple(args.spacing) if args.spacing else None, batch_size=args.batch_size,
        flip_axes=tuple(args.flip_axes) if args.flip_axes is not None else None,
        normalization=args.normalization)
    try:
        (train_folds if args.fold == "all" else train)(config)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0

