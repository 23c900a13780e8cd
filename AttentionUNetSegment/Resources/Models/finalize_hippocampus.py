"""Turn the trained hippocampus bundle into the shipped default model (``Models/hippocampus/``).

It scores the trained bundle on its held-out validation cases exactly as users run it (``inference.predictor.Predictor``
on the original images, Dice/HD95/volume on the original grids via ``evaluation.evaluate``), then re-saves the weights with
the model card metadata (licence, citation, training data, those held-out metrics)::

    python AttentionUNetSegment/Resources/Models/finalize_hippocampus.py \\
        work-dirs/hippo/model work-dirs/hippo/work ../shared/data/msd-hippocampus \\
        --whole-head whole_head.json --nilearn-template mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz

Arguments: the bundle written by ``attention-unet train``, its work directory (``plan.json`` holds the split and
``training_log.json`` the curves) and the MSD Task04 folder; ``--whole-head`` adds the whole-head benchmark's
figures (``Testing/benchmarks/bench_whole_head.py --model <trained bundle> --held-out ... --json``).

It also adds the domain guard's ``domain`` (measured on the MSD cases trained on, ``metrics.training.case_names``)
and the localiser (``localization``: the MNI ICBM152 2009a template from the nilearn wheel at 2 mm, the
template-space boxes of both hippocampi and the per-side labels). ``--refresh`` redoes only that on the shipped
bundle, keeping its weights (same sha256) and metrics::

    python AttentionUNetSegment/Resources/Models/finalize_hippocampus.py --refresh \\
        --dataset ../shared/data/msd-hippocampus \\
        --nilearn-template /tmp/nilearn/nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz

(the template file is inside the nilearn wheel: ``pip download --no-deps nilearn`` and unzip
``nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz``).

After any edit of the shipped ``model.json`` (a new key, a merged branch), refresh its ``metadata_sha256`` and the
digest ``bundle.SHIPPED_DIGESTS`` pins for it, leaving the weights (and their sha256) untouched::

    python AttentionUNetSegment/Resources/Models/finalize_hippocampus.py --refresh-digest
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from AttentionUNetSegmentLib.model import bundle as bundle_module
from AttentionUNetSegmentLib.model.bundle import (BUNDLED_MODELS_DIR, DIGEST_KEY, METADATA_FILE,
                                            SINGLE_WEIGHTS_FORMAT_VERSION, create_metadata, file_sha256, load_bundle,
                                            metadata_digest, save_bundle)
from AttentionUNetSegmentLib.preprocessing.domain import measure_domain
from AttentionUNetSegmentLib.errors import ModelBundleError
from AttentionUNetSegmentLib.fileio.atomic import atomic_output
from AttentionUNetSegmentLib.fileio.jsonfile import read_json
from AttentionUNetSegmentLib.evaluation.evaluate import EvaluationCase, evaluate, write_report
from AttentionUNetSegmentLib.inference.predictor import Predictor
from AttentionUNetSegmentLib.training.trainer import read_plan

TEMPLATE_FILE, TEMPLATE_LICENSE_FILE = "template.nii.gz", "LICENSE-MNI152.txt"
VERSION = "2.0.0"
#: MSD case names (the head crops are named ``<head>_<side>``).
MSD_PREFIX = "hippocampus_"
#: Template voxel size (mm): registration works at 2 mm, and the file stays ~250 KB.
TEMPLATE_SPACING_MM = 2.0
#: Hippocampus centroids in the (symmetric) template, RAS mm (the sample's crop centre and its mirror).
CENTROIDS_RAS = {"left": (-26.0, -22.0, -14.0), "right": (26.0, -22.0, -14.0)}
#: Box size (mm, R-L A-P S-I): the training crops' median field of view (~35 x 50 x 36 mm) plus ~4-5 mm a side
#: for registration error.
BOX_SIZE_MM = (44.0, 60.0, 44.0)
#: Per-side segments with localisation (model label value -> value, name, colour per side).
SIDE_LABELS = (
    {"value": 1, "name": "Left anterior hippocampus", "color": [0.9, 0.6, 0.2], "side": "left", "source": 1},
    {"value": 2, "name": "Left posterior hippocampus", "color": [0.2, 0.6, 0.9], "side": "left", "source": 2},
    {"value": 3, "name": "Right anterior hippocampus", "color": [0.85, 0.3, 0.55], "side": "right", "source": 1},
    {"value": 4, "name": "Right posterior hippocampus", "color": [0.3, 0.8, 0.4], "side": "right", "source": 2},
)
#: 3D Slicer terminology: SNOMED CT hippocampus (5976002) with laterality Left (7771000) / Right (24028007).
TERMINOLOGY = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
               "~SCT^5976002^Hippocampus~{modifier}~Anatomic codes - DICOM master list~^^~^^")
LATERALITY = {"left": "SCT^7771000^Left", "right": "SCT^24028007^Right"}
TEMPLATE_NOTICE = """template.nii.gz
===============

What it is: the MNI ICBM152 2009a nonlinear symmetric T1-weighted template, as distributed (skull-stripped and
rescaled to 0..255) inside the nilearn Python package (nilearn/datasets/data/
mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz), reoriented to RAS, smoothed (sigma 0.8 mm) and resampled to
2 mm by finalize_hippocampus.py in the extension's Resources/Models folder. The engine registers whole-head
inputs to it to locate both hippocampi. It is an average of 152 brains and holds no patient information.

"""


def template_notice() -> str:
    """The notice shipped next to the template: what it is, then the sample's ICBM copyright notice."""
    sample_notice = (BUNDLED_MODELS_DIR.parent / "SampleData" / "LICENSE-MNI152.txt").read_text(encoding="utf-8")
    return TEMPLATE_NOTICE + sample_notice[sample_notice.index("Copyright notice"):]


def make_template(nilearn_template: Path, output: Path) -> None:
    """The nilearn ICBM152 2009a T1 at ``TEMPLATE_SPACING_MM`` (RAS, uint8), covering the same extent."""
    image = sitk.DICOMOrient(sitk.ReadImage(str(nilearn_template)), "RAS")
    spacing = TEMPLATE_SPACING_MM
    smoothed = sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), 0.8)
    size = [int(n // spacing) for n in image.GetSize()]
    direction = np.array(image.GetDirection()).reshape(3, 3)
    origin = np.array(image.GetOrigin()) + direction @ np.full(3, (spacing - 1.0) / 2.0)
    reduced = sitk.Resample(smoothed, size, sitk.Transform(), sitk.sitkLinear, origin.tolist(), [spacing] * 3,
                            image.GetDirection(), 0.0)
    reduced = sitk.Cast(sitk.Clamp(sitk.Round(reduced), lowerBound=0, upperBound=255), sitk.sitkUInt8)
    sitk.WriteImage(reduced, str(output), useCompression=True)


def localization_section() -> Dict[str, Any]:
    """The bundle's ``localization``: template, per-side boxes (template RAS mm) and per-side labels."""
    boxes = {side: [round(c + sign * s / 2.0, 2) for c, s in zip(centre, BOX_SIZE_MM) for sign in (-1, 1)]
             for side, centre in CENTROIDS_RAS.items()}
    labels = [dict(label, terminology=TERMINOLOGY.format(modifier=LATERALITY[label["side"]]))
              for label in SIDE_LABELS]
    return {"method": "template-affine", "template": TEMPLATE_FILE, "template_notice": TEMPLATE_LICENSE_FILE,
            "sides": {side: {"box_ras": box} for side, box in boxes.items()}, "labels": labels}


def training_domain(dataset: Path, trained: Sequence[str]) -> Dict[str, Any]:
    """``measure_domain`` over the MSD cases the model trained on (``trained``: names), from their headers."""
    sizes, spacings, directions = [], [], []
    for path in sorted((dataset / "imagesTr").glob("*.nii.gz")):
        if path.name.startswith(".") or path.name[:-len(".nii.gz")] not in trained:
            continue
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        sizes.append(reader.GetSize())
        spacings.append(reader.GetSpacing())
        directions.append(reader.GetDirection())
    return measure_domain(sizes, spacings, directions, modality="MRI (T1-weighted)")


def localizer_files(nilearn_template: Path, folder: Path) -> Dict[str, Path]:
    """The localiser's template and its notice, written into ``folder``: a bundle's ``extra_files``."""
    template, notice = folder / TEMPLATE_FILE, folder / TEMPLATE_LICENSE_FILE
    make_template(nilearn_template, template)
    notice.write_text(template_notice(), encoding="utf-8")
    return {TEMPLATE_FILE: template, TEMPLATE_LICENSE_FILE: notice}


def refresh(bundle_dir: Path, dataset: Path, nilearn_template: Path) -> None:
    """Rewrite the shipped bundle with ``domain`` and ``localization``, the same weights and metrics."""
    bundle = load_bundle(bundle_dir)
    metadata = {key: value for key, value in bundle.metadata.items()
                if key not in ("architecture", "engine_version", "weights")}
    metadata["domain"] = training_domain(dataset, metadata["metrics"]["training"]["case_names"])
    metadata["localization"] = localization_section()
    metadata["description"] = DESCRIPTION.format(channels=tuple(bundle.architecture["channels"]))
    with tempfile.TemporaryDirectory() as scratch:
        saved = save_bundle(bundle.build_model(), metadata, bundle_dir, force=True,
                            extra_files=localizer_files(nilearn_template, Path(scratch)))
    if saved.sha256 != bundle.sha256:
        raise SystemExit(f"the weights' sha256 changed ({bundle.sha256} -> {saved.sha256})")
    print(f"wrote {saved.path}: domain from {len(metadata['domain'])} keys, weights {saved.sha256[:12]} kept",
          file=sys.stderr)

LICENSE = ("Weights: derived from the Medical Segmentation Decathlon Task04 Hippocampus training data (CC-BY-SA "
           "4.0; data from Vanderbilt University Medical Center) and from five NiChart_Project demo heads (UPenn SBIA "
           "software licence; automatic DLMUSE labels), so they are shared under CC-BY-SA 4.0 and that licence's "
           "terms: credit the Decathlon and NiChart when you use or redistribute them. Engine code: Apache-2.0. "
           "Research use only, not a medical device.")
CITATION = ("Simpson AL, Antonelli M, Bakas S, et al. A large annotated medical image dataset for the development "
            "and evaluation of segmentation algorithms. arXiv:1902.09063, 2019. "
            "Antonelli M, Reinke A, Bakas S, et al. The Medical Segmentation Decathlon. Nature Communications "
            "13:4128, 2022. "
            "Oktay O, Schlemper J, Le Folgoc L, et al. Attention U-Net: Learning Where to Look for the Pancreas. "
            "MIDL 2018, arXiv:1804.03999. "
            "NiChart_Project demo dataset, CBICA, University of Pennsylvania (github.com/CBICA/NiChart_Project).")
TRAINING_DATA = ("Medical Segmentation Decathlon Task04 Hippocampus: {msd} labelled mono-modal T1-weighted MRI crops "
                 "(1 mm, RAS, about 35 x 50 x 36 voxels) around the left or right hippocampus of adults (healthy "
                 "and with a psychotic disorder, Vanderbilt University Medical Center); labels 1 = anterior "
                 "(hippocampus head), 2 = posterior (body and tail); {msd_train} trained, {msd_selection}{msd_held} "
                 "held out (seeded split: metrics.held_out.cases). Plus {crops} crops (both sides) of the whole heads "
                 "{heads} (NiChart_Project demo data: older adults, 2 mm, with skull), cut where the localised "
                 "pipeline segments and resampled to its 1 mm grid, labelled with the whole hippocampus only "
                 "(DLMUSE, automatic): trained as a coarse label (anterior + posterior merged in the loss). "
                 "Whole heads never trained on: {held_out_heads}.")
DESCRIPTION = ("Anterior and posterior hippocampus on T1-weighted brain MRI: a 3D Attention U-Net (channels "
               "{channels}, instance norm) trained on MSD Task04 plus crops of real whole heads. On a T1 crop (or "
               "ROI) around one hippocampus at about 1 mm it segments that hippocampus (1 Anterior, 2 Posterior); "
               "on a whole head it locates both hippocampi by affine registration to the MNI ICBM152 template and "
               "segments each side (1-2 left, 3-4 right anterior/posterior).")
#: How the weights and options were chosen: for a run that validated on its held-out cases (``--validation 40``),
#: for one with cases held apart from its validation cases (``--held-out 40 --validation N``), and for one that
#: shipped its final epoch (``--checkpoint final``).
SELECTION_ON_HELD_OUT = (
    "The weights are the epoch with the best mean Dice on the {held} MSD validation cases, which are also the "
    "held-out MSD cases reported here (no fold trained on them; the choice of epoch makes that figure slightly "
    "optimistic). ")
SELECTION_APART = (
    "The weights are the epoch with the best mean Dice on {validation} MSD validation cases, which are neither "
    "trained on nor held out; the {held} held-out MSD cases reported here played no part in choosing the epoch. ")
SELECTION_FINAL = (
    "The weights are the final epoch of the training schedule (--checkpoint final, fixed before training); the "
    "{validation} MSD validation cases only monitored the run, and the {held} held-out MSD cases reported here "
    "played no part in choosing the weights. ")
SELECTION_OPTIONS = (
    "The training options (robust augmentation, central z-score) and the channels {channels} were chosen from "
    "earlier runs scored on the same {held} held-out MSD cases and on crops of the held-out heads. The whole-head "
    "figures come from Testing/benchmarks/bench_whole_head.py on the shared whole heads; the heads trained on are "
    "reported apart from the held-out ones.")


def msd_case_roles(plan: Dict[str, Any]) -> Tuple[List[str], List[str]]:
    """``(held_out, validation)`` case names of a training run's ``plan.json``: the cases held apart
    (``split.held_out_cases``) and those validated on, or, for a run without held-out cases, its validation
    cases as both."""
    held_out = list((plan.get("split") or {}).get("held_out_cases") or [])
    return (held_out or list(plan["validation_cases"])), list(plan["validation_cases"])


def selection_text(held_out: Sequence[str], validation: Sequence[str], channels: Sequence[int],
                   checkpoint: str = "best") -> str:
    """``metrics.selection``: which cases chose the weights (``checkpoint``: the trained bundle's
    ``metrics.validation.checkpoint``) and the options."""
    if checkpoint == "final":
        first = SELECTION_FINAL
    else:
        first = SELECTION_ON_HELD_OUT if list(held_out) == list(validation) else SELECTION_APART
    return (first.format(held=len(held_out), validation=len(validation))
            + SELECTION_OPTIONS.format(held=len(held_out), channels="-".join(map(str, channels))))


def whole_head_metrics(results: Path) -> Dict[str, Any]:
    """``metrics.whole_head`` from a ``bench_whole_head.py --json`` file (medians, the heads, the machine)."""
    data = read_json(results, "whole-head benchmark results")
    summary = data["summary"]
    return {"method": "attention-unet segment (automatic localisation) vs hippodeep on the same heads in one run: "
                      "per-side Dice of the whole hippocampus (median over sides); " + data["command"],
            "heads": [row["case"] for row in data["heads"]], "held_out_heads": summary["held_out"],
            "median_dice": summary["median_dice"], "median_dice_held_out": summary["median_dice_held_out"],
            "median_seconds": summary["median_seconds"], "machine": data["machine"]}


def refresh_digest(directory: Path, name: str = "hippocampus", pin_file: Optional[Path] = None) -> str:
    """Rewrite ``directory/model.json`` with the current format version and a fresh ``metadata_sha256`` (the
    weights must still match their recorded sha256), pin that digest for ``name`` in ``pin_file`` (default: the
    engine's ``bundle.py``, ``SHIPPED_DIGESTS``), and return it."""
    metadata = read_json(directory / METADATA_FILE, "model metadata", ModelBundleError)
    weights = directory / metadata["weights"]["file"]
    if file_sha256(weights) != metadata["weights"]["sha256"]:
        raise ModelBundleError(f"{weights} does not match weights.sha256 in {directory / METADATA_FILE}; restore the "
                               "weights (this command never changes them)")
    metadata["format_version"] = SINGLE_WEIGHTS_FORMAT_VERSION
    metadata.pop(DIGEST_KEY, None)
    metadata[DIGEST_KEY] = digest = metadata_digest(metadata)
    with atomic_output(directory / METADATA_FILE, force=True) as partial:
        partial.write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    source = Path(pin_file or bundle_module.__file__)
    text, count = re.subn(rf'("{re.escape(name)}": )"[0-9a-f]{{64}}"', rf'\g<1>"{digest}"',
                          source.read_text(encoding="utf-8"))
    if count != 1:
        raise ModelBundleError(f"no SHIPPED_DIGESTS entry for {name!r} in {source}; add one by hand")
    with atomic_output(source, force=True) as partial:
        partial.write_text(text, encoding="utf-8")
    if pin_file is None:
        bundle_module.SHIPPED_DIGESTS[name] = digest  # this process checks against the new pin too
    return digest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trained", type=Path, nargs="?")
    parser.add_argument("work_dir", type=Path, nargs="?")
    parser.add_argument("dataset", type=Path, nargs="?")
    parser.add_argument("--output", type=Path, default=BUNDLED_MODELS_DIR / "hippocampus")
    parser.add_argument("--refresh-digest", action="store_true",
                        help="only refresh --output's metadata digest and its pin in bundle.py")
    parser.add_argument("--refresh", action="store_true",
                        help="only (re)write domain and localization of the bundle at --output")
    parser.add_argument("--dataset", dest="dataset_option", type=Path)
    parser.add_argument("--whole-head", type=Path, metavar="JSON",
                        help="bench_whole_head.py --json results of the trained bundle (metrics.whole_head)")
    parser.add_argument("--nilearn-template", type=Path,
                        help="the ICBM152 2009a T1 from the nilearn wheel (needed except with --refresh-digest)")
    args = parser.parse_args()
    if args.refresh_digest:
        digest = refresh_digest(args.output, args.output.name)
        print(f"{args.output / METADATA_FILE}: {DIGEST_KEY} {digest} (pinned in {bundle_module.__file__})",
              file=sys.stderr)
        return 0
    if args.nilearn_template is None:
        parser.error("give --nilearn-template (the localiser's template comes from it)")
    if args.refresh:
        refresh(args.output, args.dataset_option or args.dataset, args.nilearn_template)
        refresh_digest(args.output, args.output.name)
        return 0
    if args.dataset is None:
        parser.error("give the trained bundle, its work directory and the dataset (or --refresh / --refresh-digest)")

    trained = load_bundle(args.trained)
    plan = read_plan(args.work_dir)
    held_out_names, validation_names = msd_case_roles(plan)
    cases = [EvaluationCase(name, args.dataset / "labelsTr" / f"{name}.nii.gz",
                            args.dataset / "imagesTr" / f"{name}.nii.gz") for name in held_out_names]
    labels = {label.value: label.name for label in trained.labels}
    report = evaluate(cases, labels, predictor=Predictor(trained, device="cpu"))
    write_report(report, args.work_dir / "held_out_evaluation", force=True)

    metrics = dict(trained.metadata.get("metrics", {}))
    metrics["held_out"] = {
        "method": "attention-unet evaluate: Predictor (sliding window, overlap 0.5, no TTA) on the original "
                  "images; metrics on the original label grids; mean over cases",
        "cases": held_out_names,
        "dice": {name: round(values["dice"], 4) for name, values in report["mean"].items()},
        "hd95_mm": {name: round(values["hd95_mm"], 3) for name, values in report["mean"].items()
                    if values["hd95_mm"] is not None},
        "volume_difference_ml": {name: round(values["volume_difference_ml"], 4)
                                 for name, values in report["mean"].items()},
    }
    if args.whole_head is not None:
        metrics["whole_head"] = whole_head_metrics(args.whole_head)
    metrics["selection"] = selection_text(held_out_names, validation_names, trained.architecture["channels"],
                                          metrics.get("validation", {}).get("checkpoint", "best"))
    metrics["training"] = dict(metrics.get("training", {}), case_names=plan["training_cases"])
    msd_train = [name for name in plan["training_cases"] if name.startswith(MSD_PREFIX)]
    crops = [name for name in plan["training_cases"] if not name.startswith(MSD_PREFIX)]
    heads = sorted({name.rsplit("_", 1)[0] for name in crops})
    held_out_heads = metrics.get("whole_head", {}).get("held_out_heads") or ["not measured"]
    selection_only = [name for name in validation_names if name not in held_out_names]
    training_data = TRAINING_DATA.format(
        msd=len(msd_train) + len(selection_only) + len(held_out_names), msd_train=len(msd_train),
        msd_selection=f"{len(selection_only)} validated on, " if selection_only else "",
        msd_held=len(held_out_names), crops=len(crops), heads=", ".join(heads),
        held_out_heads=", ".join(held_out_heads))
    metadata = create_metadata(
        name="hippocampus", version=VERSION,
        # A crop's side is unknown: hippocampus without laterality (the localised labels carry it).
        labels=[dict(label.to_dict(), terminology=TERMINOLOGY.format(modifier="^^")) for label in trained.labels],
        patch_size=trained.patch_size, preprocessing=trained.metadata["preprocessing"], overlap=trained.overlap,
        description=DESCRIPTION.format(channels=tuple(trained.architecture["channels"])), license=LICENSE,
        citation=CITATION, training_data=training_data,
        metrics=metrics, mirror_axes=plan["plan"]["flip_axes"],
        domain=training_domain(args.dataset, plan["training_cases"]), localization=localization_section())
    # Saved once, outside the shipped folder (whose digest the engine pins), pinned, then put in place.
    with tempfile.TemporaryDirectory() as scratch:
        staged = save_bundle(trained.build_model(), metadata, Path(scratch) / "bundle" / args.output.name,
                             extra_files=localizer_files(args.nilearn_template, Path(scratch))).path
        refresh_digest(staged, args.output.name)
        if args.output.exists():
            shutil.rmtree(args.output)
        shutil.copytree(staged, args.output)
    print(f"wrote {args.output}: held-out Dice {metrics['held_out']['dice']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
