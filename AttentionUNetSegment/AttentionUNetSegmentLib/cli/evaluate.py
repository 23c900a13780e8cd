"""``attention-unet evaluate``: its options and the run they start (``evaluation.evaluate`` does the work)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..constants import DEVICES
from ..errors import OutputExistsError
from ..evaluation.evaluate import evaluate, held_out_cases, read_label_map, reference_cases, select_cases, write_report
from ..progress import PROGRESS_KINDS, default_progress_kind, make_progress
from .arguments import label_name, label_names as parse_label_names


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``attention-unet evaluate``."""
    parser.add_argument("reference", help="reference labels: a label folder, an MSD dataset folder or a .json/.csv "
                        "pairs file")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--predictions", help="folder of predicted label maps (<case>_seg.nii.gz or <case>.nii.gz)")
    source.add_argument("--model", help="run this model (installed name or bundle directory) on the images")
    parser.add_argument("--images", help="image folder (when the reference is a plain label folder and --model is "
                        "used; file names as the labels)")
    parser.add_argument("--label-names", nargs="+", type=label_name, metavar="VALUE=NAME",
                        help="label names, e.g. 1=Liver 2=Tumour (needed for a .csv pairs file without --model); "
                        "they override the dataset's and the model's names")
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument("--cases", nargs="+", help="evaluate only these cases")
    chosen.add_argument("--cases-file", help="a text file of case names, or a training plan.json (its "
                        "validation_cases)")
    chosen.add_argument("--held-out", action="store_true", help="evaluate only the cases --model's training held "
                        "out (train --held-out: metrics.training.split.held_out_cases, or metrics.held_out.cases)")
    parser.add_argument("--output", "-o", required=True, help="output prefix: writes PREFIX.csv and PREFIX.json")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="where --model runs; auto = CUDA when available (default: auto)")
    parser.add_argument("--tta", action="store_true", help="mirror test-time augmentation (with --model)")
    parser.add_argument("--progress", choices=PROGRESS_KINDS, default=None)
    parser.add_argument("--force", action="store_true", help="overwrite existing output files")


def run_from_args(args: argparse.Namespace) -> int:
    """Entry point of ``attention-unet evaluate``; prints the mean metrics per label."""
    names = parse_label_names(args.label_names)
    bundle = None
    if args.model:
        from ..model.bundle import ModelRegistry

        bundle = ModelRegistry().resolve(args.model)
        if names is None:
            names = {label.value: label.name for label in bundle.labels}
    cases, labels = reference_cases(Path(args.reference), Path(args.images) if args.images else None, names)
    cases = select_cases(cases, held_out_cases(bundle) if args.held_out else args.cases, args.cases_file)
    progress = make_progress(args.progress or default_progress_kind())
    try:
        predictor = None
        if bundle is not None:
            from ..inference.predictor import Predictor

            predictor = Predictor(bundle, device=args.device, tta=args.tta,
                                  log=lambda line: progress.log(f"warning: {line}"))
        if not labels:
            values = set()
            for case in cases:
                values |= set(np.unique(sitk.GetArrayFromImage(read_label_map(case.reference, case.name))).tolist())
            labels = {int(v): f"label_{int(v)}" for v in sorted(values) if v != 0}
        prefix = Path(args.output)
        for suffix in (".csv", ".json"):  # refuse before the (possibly long) evaluation, not after
            if prefix.with_name(prefix.name + suffix).exists() and not args.force:
                raise OutputExistsError(f"{prefix}{suffix} already exists; choose another --output or pass --force")
        report = evaluate(cases, labels, Path(args.predictions) if args.predictions else None, predictor, progress)
    finally:
        progress.close()
    write_report(report, prefix, force=args.force)
    for name, metrics in report["mean"].items():
        parts = [f"{m} {metrics[m]:.4f}" for m in ("dice", "hd95_mm", "volume_difference_ml")
                 if metrics[m] is not None]
        print(f"{name}: " + ", ".join(parts) + f" ({metrics['cases']} cases)", file=sys.stderr)
    return 0

