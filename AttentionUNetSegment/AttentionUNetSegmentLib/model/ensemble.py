"""``attention-unet ensemble``: combine the fold bundles of one cross-validation into a fold-ensemble bundle.

``train --fold K --folds N`` writes one bundle per fold, each recording the split (``metrics.training.split``:
seed, held-out cases, every fold's cases). ``combine_folds`` checks that the bundles are the N folds of one
cross-validation (same architecture, labels, preprocessing, inference settings, plan and split; each fold once)
and writes one bundle holding every fold's weights (``bundle.save_ensemble``), whose ``metrics.cross_validation``
is the table of every fold's validation Dice and their mean (``cross_validation_table`` prints it). Inference
averages the folds inside the sliding window (``inference.predictor.FoldEnsemble``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from ..errors import AttentionUNetError, ModelBundleError
from .bundle import ModelBundle, create_metadata, save_ensemble

#: Sections every fold must share: what inference runs, and how the folds were planned and split.
_SHARED = ("architecture", "labels", "preprocessing", "inference", "localization")


def _split_of(bundle: ModelBundle) -> Dict[str, Any]:
    training = (bundle.metadata.get("metrics") or {}).get("training") or {}
    split = training.get("split") if isinstance(training, dict) else None
    if bundle.fold_count != 1 or not isinstance(split, dict) or not isinstance(split.get("folds"), int) \
            or not isinstance(split.get("fold"), int):
        raise ModelBundleError(f"{bundle.path} is not one fold of a cross-validation (a bundle written by `train "
                               "--fold K --folds N`); give the fold bundles of one run")
    return split


def _shared_split(split: Mapping[str, Any]) -> Dict[str, Any]:
    """What every fold of a cross-validation records alike (the split without the fold's own choice)."""
    return {key: value for key, value in split.items() if key not in ("fold", "validation_cases")}


def check_folds(bundles: Sequence[ModelBundle]) -> List[ModelBundle]:
    """``bundles`` sorted by fold, after checking they are every fold of one cross-validation exactly once.

    Raises ``ModelBundleError`` naming the bundle that differs and in what.
    """
    splits = [_split_of(bundle) for bundle in bundles]
    first, reference = bundles[0], splits[0]
    for bundle, split in zip(bundles[1:], splits[1:]):
        differing = [key for key in _SHARED if bundle.metadata.get(key) != first.metadata.get(key)]
        if bundle.metadata["metrics"]["training"].get("plan") != first.metadata["metrics"]["training"].get("plan"):
            differing.append("training plan")
        if _shared_split(split) != _shared_split(reference):
            differing.append("split (seed, held-out cases or fold cases)")
        if differing:
            raise ModelBundleError(f"{bundle.path} and {first.path} differ in {', '.join(differing)}: they are not "
                                   "folds of one cross-validation; train every fold with the same dataset and "
                                   "options (only --fold changes)")
    folds = reference["folds"]
    by_fold: Dict[int, ModelBundle] = {}
    for bundle, split in zip(bundles, splits):
        if split["fold"] in by_fold:
            raise ModelBundleError(f"{bundle.path} and {by_fold[split['fold']].path} are both fold {split['fold']}; "
                                   "give each fold once")
        by_fold[split["fold"]] = bundle
    missing = [k for k in range(folds) if k not in by_fold]
    if missing:
        raise ModelBundleError(f"fold(s) {', '.join(map(str, missing))} of {folds} are missing; give the bundles of "
                               f"all {folds} folds")
    return [by_fold[k] for k in range(folds)]


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    known = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return round(sum(known) / len(known), 5) if known else None


def cross_validation(folds: Sequence[ModelBundle]) -> Dict[str, Any]:
    """``metrics.cross_validation`` of an ensemble: every fold's validation Dice per label on its own validation
    cases at the epoch its weights come from (``train --checkpoint``: best or final), and the mean over the folds."""
    rows = []
    for index, bundle in enumerate(folds):
        validation = bundle.metadata["metrics"].get("validation") or {}
        rows.append({"fold": index, "cases": validation.get("cases"), "epoch": validation.get("epoch"),
                     "checkpoint": validation.get("checkpoint", "best"),
                     "dice": dict(validation.get("dice") or {}), "mean_dice": validation.get("mean_dice")})
    names = [label.name for label in folds[0].labels]
    return {
        "folds": len(folds),
        "method": "each fold's validation Dice on its own validation cases at the epoch its weights come from (the "
                  "best or the final one: the row's checkpoint), sliding-window inference on the preprocessed grid, "
                  "mean of per-case Dice",
        "per_fold": rows,
        "mean": {"dice": {name: _mean([row["dice"].get(name) for row in rows]) for name in names},
                 "mean_dice": _mean([row["mean_dice"] for row in rows])},
    }


def cross_validation_table(metrics: Mapping[str, Any]) -> str:
    """The Markdown table of ``metrics.cross_validation`` (one row per fold, then the mean), or ``""``."""
    table = metrics.get("cross_validation") if isinstance(metrics, Mapping) else None
    if not isinstance(table, Mapping):
        return ""
    names = list(table["mean"]["dice"])

    def cell(value: Any) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = ["| fold | validation cases | " + " | ".join(names) + " | mean |",
             "|---|---|" + "---|" * (len(names) + 1)]
    for row in table["per_fold"]:
        lines.append(f"| {row['fold']} | {row['cases']} | "
                     + " | ".join(cell(row["dice"].get(name)) for name in names) + f" | {cell(row['mean_dice'])} |")
    lines.append("| **mean** | | " + " | ".join(cell(table["mean"]["dice"][name]) for name in names)
                 + f" | {cell(table['mean']['mean_dice'])} |")
    return "\n".join(lines)


def combine_folds(bundles: Sequence[ModelBundle], output: Path, name: Optional[str] = None,
                  version: Optional[str] = None, force: bool = False) -> ModelBundle:
    """Write the fold ensemble of ``bundles`` (loaded, verified fold bundles, any order) at ``output``."""
    output = Path(output).expanduser()
    for bundle in bundles:
        path = bundle.path.resolve()
        if path == output.resolve() or path in output.resolve().parents or output.resolve() in path.parents:
            raise AttentionUNetError(f"--output {output} is (or holds, or lies in) the fold bundle {bundle.path}, "
                                     "which it would replace; choose another --output (nothing was changed)")
    folds = check_folds(bundles)
    base = folds[0].metadata
    training = base["metrics"]["training"]
    metrics = {
        "cross_validation": cross_validation(folds),
        "training": {"plan": training.get("plan"), "split": _shared_split(training["split"]),
                     "seconds": round(sum(float(f.metadata["metrics"]["training"].get("seconds") or 0)
                                          for f in folds), 1),
                     "folds": [{key: value for key, value in f.metadata["metrics"]["training"].items()
                                if key not in ("plan", "split")} for f in folds]},
    }
    extras = {}
    localization = base.get("localization")
    if isinstance(localization, dict):
        extras = {key: folds[0].path / localization[key] for key in ("template", "template_notice")
                  if isinstance(localization.get(key), str)}
    metadata = create_metadata(
        name=name or base["name"], version=version or base["version"], labels=base["labels"],
        patch_size=base["inference"]["patch_size"], preprocessing=base["preprocessing"],
        overlap=base["inference"].get("overlap", 0.5), description=base.get("description", ""),
        license=base.get("license", ""), citation=base.get("citation", ""),
        training_data=base.get("training_data", ""), metrics=metrics,
        mirror_axes=base["inference"].get("mirror_axes"), domain=base.get("domain"), localization=localization)
    return save_ensemble(folds, metadata, output, force=force, extra_files=extras)


