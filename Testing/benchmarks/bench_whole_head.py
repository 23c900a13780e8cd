"""Whole-head T1s: our ``segment`` (automatic localisation) vs hippodeep, on the same heads, in one run.

For every head of ``../shared/data/whole-head`` (reference labels: 1 = left, 2 = right hippocampus), alternating
between the two tools (ours first on even heads, hippodeep first on odd ones) so machine load hits both alike:

- ``ours``: the full process ``python -m AttentionUNetSegmentLib segment HEAD --output-dir DIR`` with default
  options (``--localize auto``, attention maps written), start-up included; per side the union of that side's
  segments (1-2 left, 3-4 right) against the reference.
- ``hippodeep``: ``python ../shared/peers/hippodeep/hippodeep.py COPY`` on a copy of the head in a temporary
  folder (it writes next to its input; never copied into this repository); ``COPY_mask_L/R.nii.gz`` > 127.
- ``oracle``: the same model with the box placed by hand: ``--roi`` of 44 x 60 x 44 mm centred on the reference
  hippocampus of that side (in-process ``Predictor``, no timing); union of its two segments against that side.
  An ROI of about the model's size is segmented in one window centred on it, upright in the input's own axes (no
  registration): a Region placed by hand in Slicer.
- ``centred``: the localised pipeline itself with each box centre moved onto the reference centroid (the
  registration's rotation and scaling kept): auto minus this is what imperfect box placement costs.
- box containment: the share of the reference hippocampus of each side that lies inside the localisation box
  the report records (the template-space box mapped through ``template_to_input``).

``--held-out`` names the heads the model never trained on (the shipped model trained on crops of
``nichart_subj01``-``05``): their median Dice is reported on its own, next to the median over every head.

Wall time (whole process) and peak memory (maximum resident set size from ``/usr/bin/time -v``) per tool::

    PYTHONPATH=AttentionUNetSegment python Testing/benchmarks/bench_whole_head.py \\
        --held-out nichart_subj06 nichart_subj07 nichart_subj08 ixi012 colin27 \\
        --json Testing/benchmarks/results/cpu-2core/whole_head.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED = REPO_ROOT.parent / "shared"
HEADS = SHARED / "data" / "whole-head"
HIPPODEEP = SHARED / "peers" / "hippodeep" / "hippodeep.py"
ORACLE_BOX_MM = (44.0, 60.0, 44.0)
SIDES = {"left": (1, (1, 2)), "right": (2, (3, 4))}  # reference value, our per-side label values


def timed(command: List[str], cwd: Optional[Path] = None) -> Tuple[float, float, subprocess.CompletedProcess]:
    """Run ``command`` under ``/usr/bin/time -v``: (wall seconds, peak RSS in MB, result)."""
    started = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-v", *command], cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT / "AttentionUNetSegment")})
    wall = time.perf_counter() - started
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    return wall, (int(match.group(1)) / 1024.0 if match else float("nan")), result


def dice(a: np.ndarray, b: np.ndarray) -> Optional[float]:
    total = int(a.sum()) + int(b.sum())
    return round(2.0 * float(np.logical_and(a, b).sum()) / total, 4) if total else None


def on_grid(image: sitk.Image, reference: sitk.Image) -> np.ndarray:
    """``image``'s voxels on ``reference``'s grid (nearest neighbour; identity when the grids agree)."""
    resampled = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(resampled)


def reference_points(reference: sitk.Image, value: int) -> np.ndarray:
    index = np.argwhere(sitk.GetArrayViewFromImage(reference) == value)[:, ::-1].astype(float)
    direction = np.array(reference.GetDirection()).reshape(3, 3)
    return (direction @ (index * np.array(reference.GetSpacing())).T).T + np.array(reference.GetOrigin())


def box_containment(report: Dict[str, Any], reference: sitk.Image) -> Dict[str, Optional[float]]:
    """Share of each side's reference voxels inside that side's template-space box mapped into the input."""
    localization = report.get("localization")
    if not localization:
        return {side: None for side in SIDES}
    affine = localization["registration"]["template_to_input"]
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(affine["matrix"])
    transform.SetTranslation(affine["translation"])
    transform.SetCenter(affine["center"])
    inverse = transform.GetInverse()
    shares = {}
    for side, (value, _) in SIDES.items():
        points = reference_points(reference, value)
        template = np.array([inverse.TransformPoint(tuple(p)) for p in points]) * np.array([-1.0, -1.0, 1.0])
        box = np.array(localization["template_boxes"][side], float)
        inside = np.all((template >= box[0::2]) & (template <= box[1::2]), axis=1)
        shares[side] = round(float(inside.mean()), 4) if len(points) else None
    return shares


def per_side(reference: sitk.Image, score_side) -> Dict[str, Optional[float]]:
    """``score_side(side, points, value, values)`` per side with reference voxels (their LPS points), else None."""
    result: Dict[str, Optional[float]] = {}
    for side, (value, values) in SIDES.items():
        points = reference_points(reference, value)
        result[side] = score_side(side, points, value, values) if len(points) else None
    return result


def oracle_dice(predictor, image: sitk.Image, reference: sitk.Image) -> Dict[str, Optional[float]]:
    """Per side: Dice of the model run with a 44 x 60 x 44 mm ROI centred on the reference hippocampus."""
    array = sitk.GetArrayViewFromImage(reference)

    def score(side: str, points: np.ndarray, value: int, values) -> Optional[float]:
        centre = points.mean(axis=0) * np.array([-1.0, -1.0, 1.0])
        roi = [c + sign * size / 2.0 for c, size in zip(centre, ORACLE_BOX_MM) for sign in (-1, 1)]
        labels = sitk.GetArrayFromImage(predictor.predict(image, roi=roi, attention=False).labels)
        return dice(labels > 0, array == value)

    return per_side(reference, score)


def centred_oracle_dice(predictor, image: sitk.Image, reference: sitk.Image, report: Dict[str, Any]
                        ) -> Dict[str, Optional[float]]:
    """Per side: Dice of the localised pipeline itself (the model's one view per box) with the box centre moved
    onto the reference hippocampus's centroid, keeping the registration's rotation and scaling: what perfect
    placement of the box would give, so auto minus this is what localisation costs."""
    from types import SimpleNamespace

    localization = (report or {}).get("localization")
    if not localization:
        return {side: None for side in SIDES}
    affine = localization["registration"]["template_to_input"]
    spec = predictor.bundle.localization
    array = sitk.GetArrayViewFromImage(reference)

    def score(side: str, points: np.ndarray, value: int, values) -> Optional[float]:
        transform = sitk.AffineTransform(3)
        transform.SetMatrix(affine["matrix"])
        transform.SetCenter(affine["center"])
        transform.SetTranslation(affine["translation"])
        box = spec.boxes[side]
        centre_lps = (-(box[0] + box[1]) / 2.0, -(box[2] + box[3]) / 2.0, (box[4] + box[5]) / 2.0)
        shift = points.mean(axis=0) - np.array(transform.TransformPoint(centre_lps))
        transform.SetTranslation([float(t + d) for t, d in zip(affine["translation"], shift)])
        labels = sitk.GetArrayFromImage(predictor.predict_localized(
            image, spec, SimpleNamespace(transform=transform), attention=False).labels)
        return dice(np.isin(labels, values), array == value)

    return per_side(reference, score)


def run_ours(head: Path, work: Path, model: Optional[str]) -> Dict[str, Any]:
    out = work / "ours" / head.name.split(".")[0]
    wall, peak, result = timed([sys.executable, "-m", "AttentionUNetSegmentLib", "segment", str(head),
                                "--output-dir", str(out), "--progress", "none", "--force",
                                *(["--model", model] if model else [])])
    row: Dict[str, Any] = {"seconds": round(wall, 2), "peak_mb": round(peak, 1), "exit": result.returncode}
    if result.returncode != 0:
        row["error"] = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "?"
        return row
    stem = head.name[:-len(".nii.gz")]
    report = json.loads((out / f"{stem}_report.json").read_text(encoding="utf-8"))
    row.update(report=report, labels=out / f"{stem}_seg.nii.gz")
    return row


def run_hippodeep(head: Path, work: Path, model: Optional[str]) -> Dict[str, Any]:
    folder = work / "hippodeep" / head.name.split(".")[0]
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / head.name
    shutil.copyfile(head, copy)
    wall, peak, result = timed([sys.executable, str(HIPPODEEP), str(copy)], cwd=folder)
    stem = head.name[:-len(".nii.gz")]
    masks = {"left": folder / f"{stem}_mask_L.nii.gz", "right": folder / f"{stem}_mask_R.nii.gz"}
    return {"seconds": round(wall, 2), "peak_mb": round(peak, 1), "exit": result.returncode, "masks": masks}


def score(case: str, ours: Dict[str, Any], peer: Dict[str, Any], oracle: Dict[str, Optional[float]],
          reference: Optional[sitk.Image]) -> Dict[str, Any]:
    row: Dict[str, Any] = {"case": case}
    for name, result in (("ours", ours), ("hippodeep", peer)):
        row[name] = {"seconds": result["seconds"], "peak_mb": result["peak_mb"], "exit": result["exit"]}
        if "error" in result:
            row[name]["error"] = result["error"]
    if "report" in ours:
        report = ours["report"]
        sides = report["sides"] or {}
        row["ours"]["volume_ml"] = {side: round(total["volume_ml"], 3) for side, total in sides.items()}
        row["ours"]["registration"] = {k: report["localization"]["registration"][k]
                                       for k in ("interior_mutual_information", "determinant", "seconds")}
        row["ours"]["boxes_ras"] = report["localization"]["boxes"]
    row["hippodeep"]["volume_ml"] = {}
    for side, path in peer["masks"].items():
        if path.is_file():
            mask = sitk.ReadImage(str(path))
            row["hippodeep"]["volume_ml"][side] = round(float((sitk.GetArrayViewFromImage(mask) > 127).sum())
                                                         * float(np.prod(mask.GetSpacing())) / 1000.0, 3)
    if reference is None:
        return row
    ref = sitk.GetArrayViewFromImage(reference)
    row["reference_ml"] = {side: round(float((ref == value).sum()) * float(np.prod(reference.GetSpacing())) / 1000,
                                       3) for side, (value, _) in SIDES.items()}
    if "report" in ours:
        labels = on_grid(sitk.ReadImage(str(ours["labels"])), reference)
        row["ours"]["dice"] = {side: dice(np.isin(labels, values), ref == value)
                               for side, (value, values) in SIDES.items()}
        row["ours"]["box_contains"] = box_containment(ours["report"], reference)
    row["oracle_dice"] = oracle
    row["hippodeep"]["dice"] = {}
    for side, (value, _) in SIDES.items():
        path = peer["masks"][side]
        row["hippodeep"]["dice"][side] = (dice(on_grid(sitk.ReadImage(str(path)), reference) > 127, ref == value)
                                          if path.is_file() else None)
    return row


def fmt(value: Any) -> str:
    return "-" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", help="case names (default: every image in the whole-head folder)")
    parser.add_argument("--model", help="our model (name or bundle folder; default: the shipped default)")
    parser.add_argument("--held-out", nargs="*", default=[], metavar="CASE",
                        help="heads the model never trained on: their median Dice is reported separately")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if not HEADS.is_dir() or not HIPPODEEP.is_file():
        print(f"needs {HEADS} and {HIPPODEEP}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO_ROOT / "AttentionUNetSegment"))
    from AttentionUNetSegmentLib.model.bundle import ModelRegistry
    from AttentionUNetSegmentLib.fileio.imageio import read_image
    from AttentionUNetSegmentLib.inference.predictor import Predictor

    predictor = Predictor(ModelRegistry().resolve(args.model), device="cpu")
    heads = sorted((HEADS / "images").glob("*.nii.gz"))
    if args.cases:
        heads = [h for h in heads if h.name[:-len(".nii.gz")] in args.cases]
    unknown = set(args.held_out) - {h.name[:-len(".nii.gz")] for h in heads}
    if unknown:
        parser.error(f"--held-out: no such head among those benchmarked: {', '.join(sorted(unknown))}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-whole-head-") as scratch:
        work = Path(scratch)
        for number, head in enumerate(heads):
            case = head.name[:-len(".nii.gz")]
            order = (run_ours, run_hippodeep) if number % 2 == 0 else (run_hippodeep, run_ours)
            results = {function.__name__: function(head, work, args.model) for function in order}
            label_path = HEADS / "labels" / head.name
            reference = sitk.ReadImage(str(label_path)) if label_path.is_file() else None
            image = read_image(head)
            oracle = oracle_dice(predictor, image, reference) if reference is not None else {}
            row = score(case, results["run_ours"], results["run_hippodeep"], oracle, reference)
            if reference is not None:
                row["centred_oracle_dice"] = centred_oracle_dice(predictor, image, reference,
                                                                 results["run_ours"].get("report"))
            rows.append(row)
            print(json.dumps(row), flush=True)

    header = ("case", "side", "ref mL", "ours mL", "hd mL", "Dice auto", "Dice centred", "Dice oracle", "Dice hd",
              "in box", "ours s", "hd s", "ours MB", "hd MB")
    table = [header]
    for row in rows:
        for side in SIDES:
            ours, peer = row["ours"], row["hippodeep"]
            table.append((row["case"], side, fmt(row.get("reference_ml", {}).get(side)),
                          fmt(ours.get("volume_ml", {}).get(side)), fmt(peer.get("volume_ml", {}).get(side)),
                          fmt(ours.get("dice", {}).get(side)), fmt(row.get("centred_oracle_dice", {}).get(side)),
                          fmt(row.get("oracle_dice", {}).get(side)),
                          fmt(peer.get("dice", {}).get(side)), fmt(ours.get("box_contains", {}).get(side)),
                          fmt(ours["seconds"]), fmt(peer["seconds"]), fmt(ours["peak_mb"]), fmt(peer["peak_mb"])))
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)))
    ours_time = statistics.median(r["ours"]["seconds"] for r in rows)
    peer_time = statistics.median(r["hippodeep"]["seconds"] for r in rows)
    labelled = [r for r in rows if "dice" in r["ours"]]
    gaps = [r["oracle_dice"][s] - r["ours"]["dice"][s] for r in labelled for s in SIDES
            if r["oracle_dice"].get(s) is not None and r["ours"]["dice"].get(s) is not None]
    centred_gaps = [r["centred_oracle_dice"][s] - r["ours"]["dice"][s] for r in labelled for s in SIDES
                    if r.get("centred_oracle_dice", {}).get(s) is not None and r["ours"]["dice"].get(s) is not None]
    contains = [r["ours"]["box_contains"][s] for r in labelled for s in SIDES
                if r["ours"]["box_contains"].get(s) is not None]
    def median_dice(subset: List[Dict[str, Any]]) -> Optional[Dict[str, float]]:
        if not subset:
            return None
        return {name: statistics.median(v for r in subset for v in r[name]["dice"].values() if v is not None)
                for name in ("ours", "hippodeep")}

    summary = {
        "median_seconds": {"ours": ours_time, "hippodeep": peer_time, "ratio": round(ours_time / peer_time, 3)},
        "peak_mb_max": {"ours": max(r["ours"]["peak_mb"] for r in rows),
                        "hippodeep": max(r["hippodeep"]["peak_mb"] for r in rows)},
        "min_box_contains": min(contains) if contains else None,
        "max_oracle_minus_auto_dice": round(max(gaps), 4) if gaps else None,
        "max_centred_oracle_minus_auto_dice": round(max(centred_gaps), 4) if centred_gaps else None,
        "median_dice": median_dice(labelled),
        "held_out": sorted(args.held_out),
        "median_dice_held_out": median_dice([r for r in labelled if r["case"] in args.held_out]),
        "median_oracle_dice": statistics.median(v for r in labelled for v in r["oracle_dice"].values()
                                                if v is not None) if labelled else None,
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "machine": f"{platform.machine()}, {os.cpu_count()} logical cores (shared with other jobs)",
            "command": " ".join(["python Testing/benchmarks/bench_whole_head.py", *sys.argv[1:]]), "summary": summary, "heads": rows},
            indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
