"""``attention-unet ensemble``: its options and the run they start (``model.ensemble`` does the work)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import OutputExistsError
from ..model.bundle import ModelRegistry
from ..model.ensemble import combine_folds, cross_validation_table


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``attention-unet ensemble``."""
    parser.add_argument("folds", nargs="+", metavar="FOLD", help="the fold bundles (directories or installed "
                        "model names) of one `train --fold K --folds N` cross-validation, every fold once")
    parser.add_argument("--output", "-o", required=True, type=Path, help="ensemble bundle directory to write")
    parser.add_argument("--name", help="model name (default: the folds')")
    parser.add_argument("--model-version", help="model version (default: the folds')")
    parser.add_argument("--force", action="store_true", help="replace an existing bundle at --output")


def run_from_args(args: argparse.Namespace) -> int:
    """Entry point of ``attention-unet ensemble``: prints the cross-validation table (errors: exit status 2)."""
    if (args.output.exists() or args.output.is_symlink()) and not args.force:
        raise OutputExistsError(f"{args.output} already exists; choose another --output or pass --force to replace "
                                "it (only a model bundle or an empty folder is replaced)")
    registry = ModelRegistry()
    bundles = [registry.resolve(fold) for fold in args.folds]
    ensemble = combine_folds(bundles, args.output, args.name, args.model_version, args.force)
    print(f"wrote {ensemble.path}: {ensemble.name} {ensemble.version}, {ensemble.fold_count} folds", file=sys.stderr)
    print(cross_validation_table(ensemble.metadata["metrics"]))
    return 0

