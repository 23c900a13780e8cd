"""``attention-unet evaluate``: score segmentations against reference labels.

Per case and label: Dice, the 95th-percentile Hausdorff distance (mm) and the volume difference (mL, prediction
minus reference, and relative to the reference); per label the mean over cases. Predictions come from a folder
(``<case>_seg.nii.gz``, ``<case>.nii.gz``, ... as written by ``attention-unet segment``) or from running a model
bundle through ``inference.predictor.Predictor``. References are a label folder or a dataset (MSD folder, .json
or .csv).

Conventions: Dice is undefined (``None``) when a label is absent from both maps. HD95 follows MONAI: the larger
of the two directed 95th-percentile distances between the boundary voxels of prediction and reference (boundary =
voxels of the mask with a face neighbour outside it), measured in mm on the reference grid; it is ``None`` when
either mask is empty.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..errors import DatasetError, InputImageError, OutputExistsError
from ..fileio.atomic import atomic_output
from ..fileio.imageio import READ_EXTENSIONS, image_stem, read_image, read_label
from ..fileio.jsonfile import read_json, read_text
from ..training.datasets import grid_differences, load_dataset

METRICS = ("dice", "hd95_mm", "volume_prediction_ml", "volume_reference_ml", "volume_difference_ml",
           "volume_difference_percent")


def dice_score(prediction: np.ndarray, reference: np.ndarray) -> Optional[float]:
    """Dice of two boolean masks; ``None`` when both are empty."""
    total = int(prediction.sum()) + int(reference.sum())
    if total == 0:
        return None
    return 2.0 * int(np.logical_and(prediction, reference).sum()) / total


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with at least one face neighbour outside it (the image border counts as outside)."""
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1), border_value=0)
    return mask & ~eroded


def hausdorff95(prediction: np.ndarray, reference: np.ndarray, spacing_zyx: Sequence[float]) -> Optional[float]:
    """Symmetric 95th-percentile boundary distance in mm (see the module docstring); ``None`` if a mask is
    empty. ``spacing_zyx`` is the voxel size along the array axes."""
    if not prediction.any() or not reference.any():
        return None
    # Both boundaries lie in the masks' joint bounding box, and voxels outside it belong to neither mask, so the
    # distances are the same there; the float64 distance maps then cover the structure, not the whole scan.
    box = ndimage.find_objects((prediction | reference).astype(np.uint8))[0]
    prediction, reference = prediction[box], reference[box]
    prediction_boundary, reference_boundary = _boundary(prediction), _boundary(reference)
    to_reference = ndimage.distance_transform_edt(~reference_boundary, sampling=spacing_zyx)
    to_prediction = ndimage.distance_transform_edt(~prediction_boundary, sampling=spacing_zyx)
    return float(max(np.percentile(to_reference[prediction_boundary], 95),
                     np.percentile(to_prediction[reference_boundary], 95)))


def label_metrics(prediction: np.ndarray, reference: np.ndarray, value: int,
                  spacing_zyx: Sequence[float]) -> Dict[str, Optional[float]]:
    """All metrics of one label value between two ``(z, y, x)`` label maps."""
    predicted, expected = prediction == value, reference == value
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    predicted_ml, expected_ml = int(predicted.sum()) * voxel_ml, int(expected.sum()) * voxel_ml
    return {
        "dice": dice_score(predicted, expected),
        "hd95_mm": hausdorff95(predicted, expected, spacing_zyx),
        "volume_prediction_ml": predicted_ml,
        "volume_reference_ml": expected_ml,
        "volume_difference_ml": predicted_ml - expected_ml,
        "volume_difference_percent": None if expected_ml == 0 else 100.0 * (predicted_ml - expected_ml) / expected_ml,
    }


@dataclass
class EvaluationCase:
    """A reference label file and (optionally) its image, named by the case."""

    name: str
    reference: Path
    image: Optional[Path] = None


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def summarize(results: Sequence[Dict[str, Any]], labels: Mapping[int, str]) -> Dict[str, Dict[str, Any]]:
    """Per label name: the mean of every metric over the cases where it is defined, and the case count."""
    summary = {}
    for name in labels.values():
        rows = [r["labels"][name] for r in results]
        summary[name] = {metric: _mean([row[metric] for row in rows]) for metric in METRICS}
        summary[name]["cases"] = len(rows)
    return summary


def evaluate_case(prediction: sitk.Image, reference: sitk.Image, labels: Mapping[int, str],
                  case: EvaluationCase) -> Dict[str, Any]:
    """Metrics of every label for one case; the prediction must lie on the reference's grid."""
    problems = grid_differences(reference, prediction)
    if problems:
        raise DatasetError(f"case {case.name}: the prediction does not lie on the reference label's grid ("
                           + "; ".join(problems) + " of the reference); segment the reference's own image or "
                           "resample the prediction onto it (nearest neighbour)")
    spacing_zyx = tuple(reference.GetSpacing())[::-1]
    predicted = sitk.GetArrayViewFromImage(prediction)
    expected = sitk.GetArrayViewFromImage(reference)
    return {"case": case.name,
            "labels": {name: label_metrics(predicted, expected, value, spacing_zyx) for value, name in labels.items()}}


def find_prediction(directory: Path, name: str) -> Path:
    """``<name>_seg<ext>`` or ``<name><ext>`` in ``directory`` (any readable image extension); also
    ``<name>_0000_seg<ext>``, what ``segment`` writes for an nnU-Net v2 image ``<name>_0000``."""
    for stem in (f"{name}_seg", name, f"{name}_0000_seg"):
        for extension in READ_EXTENSIONS:
            candidate = directory / f"{stem}{extension}"
            if candidate.is_file():
                return candidate
    raise DatasetError(f"case {name}: no prediction {name}_seg.nii.gz (or {name}.nii.gz, {name}_0000_seg.nii.gz, "
                       f".nrrd, ...) in {directory}; segment it first or remove it from the evaluation")


def reference_cases(reference: Path, images: Optional[Path] = None,
                    label_names: Optional[Mapping[int, str]] = None) -> Tuple[List[EvaluationCase], Dict[int, str]]:
    """Cases and label names from a dataset (MSD folder / .json / .csv) or a plain label folder (names then
    empty: they come from the model or the label values). ``label_names`` (``{value: name}``) override the
    dataset's; a .csv pairs file has none of its own."""
    if reference.is_dir() and not (reference / "dataset.json").is_file():
        files = sorted(p for p in reference.iterdir() if p.is_file() and p.name.lower().endswith(READ_EXTENSIONS))
        if not files:
            raise DatasetError(f"{reference} holds no label images (.nii.gz, .nrrd, ...)")
        cases = []
        for path in files:
            name = image_stem(path)
            image = None
            if images is not None:
                matches = [images / f"{name}{ext}" for ext in READ_EXTENSIONS if (images / f"{name}{ext}").is_file()]
                if not matches:
                    raise DatasetError(f"case {name}: no image named {name}.nii.gz (or .nrrd, ...) in {images}")
                image = matches[0]
            cases.append(EvaluationCase(name, path, image))
        return cases, dict(label_names or {})
    dataset = load_dataset(reference, label_names)
    return [EvaluationCase(c.name, c.label, c.image) for c in dataset.cases], dict(dataset.labels)


def read_label_map(path: Path, case: str, what: str = "reference label") -> sitk.Image:
    """A 3D scalar label map (``what`` names it in messages: reference label or prediction)."""
    if not path.is_file():
        raise DatasetError(f"case {case}: {what} file {path} does not exist")
    try:
        label = read_label(path)
    except InputImageError as error:
        raise DatasetError(f"case {case}: {error}") from None
    if label.GetDimension() != 3 or label.GetNumberOfComponentsPerPixel() != 1:
        raise DatasetError(f"case {case}: the {what} {path} is a {label.GetDimension()}D image with "
                           f"{label.GetNumberOfComponentsPerPixel()} component(s) per voxel (size {label.GetSize()}); "
                           "evaluate compares 3D label maps of one value per voxel")
    return label


def evaluate(cases: Sequence[EvaluationCase], labels: Mapping[int, str], predictions: Optional[Path] = None,
             predictor: Any = None, progress: Any = None) -> Dict[str, Any]:
    """Score every case; predictions are read from ``predictions`` or computed with ``predictor``
    (an ``inference.predictor.Predictor``). Returns ``{"labels", "cases": [...], "mean": {...}}``."""
    if (predictions is None) == (predictor is None):
        raise ValueError("give exactly one of predictions (a folder) or predictor")
    results = []
    for index, case in enumerate(cases):
        reference = read_label_map(case.reference, case.name)
        if predictor is not None:
            if case.image is None:
                raise DatasetError(f"case {case.name}: running a model needs its image; pass --images DIR")
            prediction = predictor.predict(read_image(case.image), attention=False).labels
        else:
            prediction = read_label_map(find_prediction(predictions, case.name), case.name, "prediction")
        results.append(evaluate_case(prediction, reference, labels, case))
        if progress is not None:
            progress("evaluate", (index + 1) / len(cases), case.name)
    return {"labels": {str(v): n for v, n in labels.items()}, "cases": results, "mean": summarize(results, labels)}


def _rows(report: Mapping[str, Any]) -> List[Dict[str, Any]]:
    rows = []
    for result in report["cases"]:
        for name, metrics in result["labels"].items():
            rows.append({"case": result["case"], "label": name, **metrics})
    for name, metrics in report["mean"].items():
        rows.append({"case": "mean", "label": name, **{m: metrics[m] for m in METRICS}})
    return rows


def write_report(report: Mapping[str, Any], prefix: Path, force: bool = False) -> Tuple[Path, Path]:
    """Write ``<prefix>.csv`` (one row per case and label, then the means) and ``<prefix>.json``, atomically."""
    targets = (prefix.with_name(prefix.name + ".csv"), prefix.with_name(prefix.name + ".json"))
    for target in targets:
        if target.exists() and not force:
            raise OutputExistsError(f"{target} already exists; choose another --output or pass --force")
    with contextlib.ExitStack() as stack:  # both files or neither
        partial_csv, partial_json = (stack.enter_context(atomic_output(target, force)) for target in targets)
        with open(partial_csv, "w", newline="", encoding="utf-8") as stream:
            writer = csv.DictWriter(stream, fieldnames=["case", "label", *METRICS])
            writer.writeheader()
            for row in _rows(report):
                writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
        partial_json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return targets


def select_cases(cases: List[EvaluationCase], names: Optional[Sequence[str]], names_file: Optional[str]):
    wanted: Optional[List[str]] = list(names) if names else None
    if names_file:
        path = Path(names_file)
        if path.suffix.lower() == ".json":
            data = read_json(path, "case list", DatasetError)
            wanted = data.get("validation_cases") if isinstance(data, dict) else data
            if not isinstance(wanted, list) or not all(isinstance(name, str) for name in wanted):
                raise DatasetError(f"{path} is not a case list: expected a JSON list of case names or a training "
                                   "plan.json with 'validation_cases'")
        else:
            text = read_text(path, "case list", DatasetError)
            wanted = [line.strip() for line in text.splitlines() if line.strip()]
    if wanted is None:
        return cases
    by_name = {case.name: case for case in cases}
    missing = [name for name in wanted if name not in by_name]
    if missing:
        raise DatasetError(f"cases {missing[:5]} are not in the reference set; check --cases/--cases-file")
    return [by_name[name] for name in wanted]


def held_out_cases(bundle: Any) -> List[str]:
    """The test cases ``bundle``'s training never saw, as its ``model.json`` records them."""
    if bundle is None:
        raise DatasetError("--held-out takes the cases from the model: give --model")
    def section(parent: Any, key: str) -> Dict[str, Any]:
        value = parent.get(key) if isinstance(parent, dict) else None
        return value if isinstance(value, dict) else {}

    metrics = section(bundle.metadata, "metrics")
    cases = section(section(metrics, "training"), "split").get("held_out_cases") \
        or section(metrics, "held_out").get("cases")
    if not isinstance(cases, list) or not cases or not all(isinstance(name, str) for name in cases):
        raise DatasetError(f"model {bundle.name} ({bundle.path}) records no held-out cases (it was trained without "
                           "train --held-out); choose the cases with --cases or --cases-file")
    return cases


