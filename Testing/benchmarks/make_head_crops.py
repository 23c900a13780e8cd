"""Training crops from labelled whole heads, on the grid the localised pipeline shows the model.

For each head (``images/<case>.nii.gz`` with ``labels/<case>.nii.gz``: 1 = left, 2 = right whole hippocampus, as in
``../shared/data/whole-head``) the bundle's localiser registers the head to its template
(``localization.register``), and each side's box plus ``ROI_MARGIN_VOXELS`` of context is resampled through the
registration onto the model's grid (its spacing, upright in template space, as ``Predictor.predict_localized``
resamples the one window it segments, centred on the box; the context lets training sample patches around it). The image is resampled linearly as inference
does; the side's label linearly as a mask, kept where above one half (the 2 mm references stay smooth on the 1 mm
grid). Each crop becomes one case ``<case>_<side>`` of an MSD-layout dataset whose ``dataset.json`` declares the
coarse label: ``1 = hippocampus``, ``"label_groups": {"1": ["Anterior", "Posterior"]}`` (the model's classes), so
``attention-unet train MSD_FOLDER CROPS_FOLDER`` trains on both::

    PYTHONPATH=AttentionUNetSegment python Testing/benchmarks/make_head_crops.py /work/runs/headcrops \\
        --cases nichart_subj01 nichart_subj02 nichart_subj03 nichart_subj04 nichart_subj05

The output folder must lie outside the repository (the heads' licences do not allow copying them into it) and
is refused when it holds anything but what this script wrote (``--force`` replaces that). Cases whose registration
is implausible are reported and skipped (exit status 1 when any was).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import SimpleITK as sitk

REPO_ROOT = Path(__file__).resolve().parents[2]
HEADS = REPO_ROOT.parent / "shared" / "data" / "whole-head"
SIDES = {"left": 1, "right": 2}  # side -> reference label value
MARKER = ".made-by-make_head_crops"


def crop_side(image: sitk.Image, label: sitk.Image, transform: sitk.Transform, box: Sequence[float],
              spacing: Sequence[float], value: int) -> "tuple[sitk.Image, sitk.Image]":
    """Template box ``box`` plus its context margin on the grid ``predict_localized`` resamples onto, and the
    side's label (``value`` -> 1) on the same grid."""
    from AttentionUNetSegmentLib.inference.predictor import ROI_MARGIN_VOXELS
    from AttentionUNetSegmentLib.preprocessing.localization import box_grid

    margin = np.repeat(np.asarray(spacing, float) * ROI_MARGIN_VOXELS, 2)
    context = [v - m if i % 2 == 0 else v + m for i, (v, m) in enumerate(zip(box, margin))]
    grid = box_grid(context, spacing)
    region = sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), grid, transform, sitk.sitkLinear, 0.0,
                           sitk.sitkFloat32)
    mask = sitk.Cast(label == value, sitk.sitkFloat32)
    soft = sitk.Resample(mask, grid, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    side_label = sitk.Cast(soft > 0.5, sitk.sitkUInt8)
    return region, side_label


def build(output: Path, cases: Sequence[str], heads: Path, model: Optional[str], force: bool) -> int:
    from AttentionUNetSegmentLib.model.bundle import ModelRegistry
    from AttentionUNetSegmentLib.errors import AttentionUNetError
    from AttentionUNetSegmentLib.fileio.imageio import read_image, read_label
    from AttentionUNetSegmentLib.preprocessing.localization import check_plausible, read_template, register

    output = output.resolve()
    if REPO_ROOT == output or REPO_ROOT in output.parents:
        sys.exit(f"error: {output} is inside the repository; write the crops outside it (e.g. /work/runs/headcrops)")
    if output.exists():
        if not (output / MARKER).is_file():
            sys.exit(f"error: {output} exists and was not written by this script; choose another folder")
        if not force:
            sys.exit(f"error: {output} already holds head crops; pass --force to rebuild them")
        shutil.rmtree(output)
    bundle = ModelRegistry().find(model or "hippocampus")
    spec = bundle.localization
    template = read_template(spec)
    spacing = bundle.preprocessing.target_spacing
    staging = output.with_name(f".{output.name}.partial")
    if staging.exists():
        shutil.rmtree(staging)
    (staging / "imagesTr").mkdir(parents=True)
    (staging / "labelsTr").mkdir()
    training: List[Dict[str, str]] = []
    records = []
    failed = 0
    for case in cases:
        started = time.perf_counter()
        image = read_image(heads / "images" / f"{case}.nii.gz")
        label = read_label(heads / "labels" / f"{case}.nii.gz")
        registration = register(image, template)
        try:
            check_plausible(registration, image, spec)
        except AttentionUNetError as error:
            print(f"{case}: skipped ({error})", file=sys.stderr)
            failed += 1
            continue
        for side, box in spec.boxes.items():
            region, side_label = crop_side(image, label, registration.transform, box, spacing, SIDES[side])
            name = f"{case}_{side}"
            sitk.WriteImage(region, str(staging / "imagesTr" / f"{name}.nii.gz"), True)
            sitk.WriteImage(side_label, str(staging / "labelsTr" / f"{name}.nii.gz"), True)
            training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
            voxels = int(sitk.GetArrayViewFromImage(side_label).sum())
            records.append({"case": name, "source": case, "side": side, "template_space_ml": round(
                voxels * float(np.prod(spacing)) / 1000.0, 2), "reference_ml": round(float(
                    (sitk.GetArrayViewFromImage(label) == SIDES[side]).sum() * np.prod(label.GetSpacing())) / 1000, 2)})
        print(f"{case}: {time.perf_counter() - started:.1f} s, interior MI {registration.interior_information:.3f}",
              file=sys.stderr)
    listing = {
        "name": "whole-head hippocampus crops",
        "description": "Each side's localisation box (plus context) of labelled whole heads, resampled as "
                       "attention-unet's localised inference does; label 1 = the whole hippocampus of that side.",
        "source": str(heads), "model": f"{bundle.name} {bundle.version}", "heads": list(cases),
        "labels": {"0": "background", "1": "hippocampus"},
        "label_groups": {"1": [label.name for label in bundle.labels]},
        "modality": {"0": "MRI"}, "numTraining": len(training), "training": training, "crops": records,
    }
    (staging / "dataset.json").write_text(json.dumps(listing, indent=1) + "\n", encoding="utf-8")
    (staging / MARKER).write_text("", encoding="utf-8")
    staging.rename(output)
    print(f"wrote {len(training)} crops of {len(cases) - failed} heads to {output}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="dataset folder to write (outside the repository)")
    parser.add_argument("--cases", nargs="+", required=True, help="head names (images/<case>.nii.gz)")
    parser.add_argument("--heads", type=Path, default=HEADS, help=f"whole-head folder (default {HEADS})")
    parser.add_argument("--model", help="bundle whose localiser and grid to use (default: the shipped hippocampus)")
    parser.add_argument("--force", action="store_true", help="rebuild a folder this script wrote")
    args = parser.parse_args(argv)
    return build(args.output, args.cases, args.heads, args.model, args.force)


if __name__ == "__main__":
    sys.exit(main())
