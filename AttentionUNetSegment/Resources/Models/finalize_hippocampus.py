"""Turn the trained hippocampus bundle into the shipped default model (``Models/hippocampus/``).

It scores the trained bundle on its held-out validation cases exactly as users run it (``inference.Predictor`` on
the original images, Dice/HD95/volume on the original grids via ``evaluation``), then re-saves the weights with
the model card metadata (licence, citation, training data, those held-out metrics)::

    python AttentionUNetSegment/Resources/Models/finalize_hippocampus.py \
        work-dirs/hippo/model work-dirs/hippo/work ../shared/data/msd-hippocampus

Arguments: the bundle written by ``attention-unet train``, its work directory (``plan.json`` holds the split and
``training_log.json`` the curves) and the MSD Task04 folder.

After any edit of the shipped ``model.json`` (a new key, a merged branch), refresh its ``metadata_sha256`` and the
digest ``bundle.SHIPPED_DIGESTS`` pins for it, leaving the weights (and their sha256) untouched::

    python AttentionUNetSegment/Resources/Models/finalize_hippocampus.py --refresh-digest
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Optional

from AttentionUNetSegmentLib import bundle as bundle_module
from AttentionUNetSegmentLib.bundle import (BUNDLED_MODELS_DIR, DIGEST_KEY, FORMAT_VERSION, METADATA_FILE,
                                            create_metadata, file_sha256, load_bundle, metadata_digest, save_bundle)
from AttentionUNetSegmentLib.errors import ModelBundleError
from AttentionUNetSegmentLib.imageio import atomic_output
from AttentionUNetSegmentLib.jsonfile import read_json
from AttentionUNetSegmentLib.evaluation import EvaluationCase, evaluate, write_report
from AttentionUNetSegmentLib.inference import Predictor

LICENSE = ("Weights: CC-BY-SA 4.0, because they are derived from the Medical Segmentation Decathlon Task04 "
           "Hippocampus training data (CC-BY-SA 4.0; data from Vanderbilt University Medical Center). Credit the "
           "Decathlon when you use or redistribute them. Engine code: Apache-2.0. Research use only, not a "
           "medical device.")
CITATION = ("Simpson AL, Antonelli M, Bakas S, et al. A large annotated medical image dataset for the development "
            "and evaluation of segmentation algorithms. arXiv:1902.09063, 2019. "
            "Antonelli M, Reinke A, Bakas S, et al. The Medical Segmentation Decathlon. Nature Communications "
            "13:4128, 2022. "
            "Oktay O, Schlemper J, Le Folgoc L, et al. Attention U-Net: Learning Where to Look for the Pancreas. "
            "MIDL 2018, arXiv:1804.03999.")
TRAINING_DATA = ("Medical Segmentation Decathlon Task04 Hippocampus: {n} labelled mono-modal T1-weighted MRI crops "
                 "(1 mm, RAS, about 35 x 50 x 36 voxels) around the left or right hippocampus of adults (healthy "
                 "and with a psychotic disorder, Vanderbilt University Medical Center); labels 1 = anterior "
                 "(hippocampus head), 2 = posterior (body and tail). {train} cases trained, {val} held out "
                 "(seeded split recorded in metrics.held_out.cases).")
DESCRIPTION = ("Anterior and posterior hippocampus on T1-weighted brain MRI: a small 3D Attention U-Net "
               "(channels {channels}, instance norm) trained on MSD Task04. Expects a T1 crop (or ROI) around one "
               "hippocampus at about 1 mm; whole-brain volumes need an ROI.")


def refresh_digest(directory: Path, name: str = "hippocampus", pin_file: Optional[Path] = None) -> str:
    """Rewrite ``directory/model.json`` with the current format version and a fresh ``metadata_sha256`` (the
    weights must still match their recorded sha256), pin that digest for ``name`` in ``pin_file`` (default: the
    engine's ``bundle.py``, ``SHIPPED_DIGESTS``), and return it."""
    metadata = read_json(directory / METADATA_FILE, "model metadata", ModelBundleError)
    weights = directory / metadata["weights"]["file"]
    if file_sha256(weights) != metadata["weights"]["sha256"]:
        raise ModelBundleError(f"{weights} does not match weights.sha256 in {directory / METADATA_FILE}; restore the "
                               "weights (this command never changes them)")
    metadata["format_version"] = FORMAT_VERSION
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
    return digest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trained", type=Path, nargs="?")
    parser.add_argument("work_dir", type=Path, nargs="?")
    parser.add_argument("dataset", type=Path, nargs="?")
    parser.add_argument("--output", type=Path, default=BUNDLED_MODELS_DIR / "hippocampus")
    parser.add_argument("--refresh-digest", action="store_true",
                        help="only refresh --output's metadata digest and its pin in bundle.py")
    args = parser.parse_args()
    if args.refresh_digest:
        digest = refresh_digest(args.output, args.output.name)
        print(f"{args.output / METADATA_FILE}: {DIGEST_KEY} {digest} (pinned in {bundle_module.__file__})",
              file=sys.stderr)
        return 0
    if args.dataset is None:
        parser.error("give the trained bundle, its work directory and the dataset (or --refresh-digest)")

    trained = load_bundle(args.trained)
    plan = json.loads((args.work_dir / "plan.json").read_text(encoding="utf-8"))
    validation_names = plan["validation_cases"]
    cases = [EvaluationCase(name, args.dataset / "labelsTr" / f"{name}.nii.gz",
                            args.dataset / "imagesTr" / f"{name}.nii.gz") for name in validation_names]
    labels = {label.value: label.name for label in trained.labels}
    report = evaluate(cases, labels, predictor=Predictor(trained, device="cpu"))
    write_report(report, args.work_dir / "held_out_evaluation", force=True)

    metrics = dict(trained.metadata.get("metrics", {}))
    metrics["held_out"] = {
        "method": "attention-unet evaluate: Predictor (sliding window, overlap 0.5, no TTA) on the original "
                  "images; metrics on the original label grids; mean over cases",
        "cases": validation_names,
        "dice": {name: round(values["dice"], 4) for name, values in report["mean"].items()},
        "hd95_mm": {name: round(values["hd95_mm"], 3) for name, values in report["mean"].items()
                    if values["hd95_mm"] is not None},
        "volume_difference_ml": {name: round(values["volume_difference_ml"], 4)
                                 for name, values in report["mean"].items()},
    }
    n_train, n_val = len(plan["training_cases"]), len(validation_names)
    metadata = create_metadata(
        name="hippocampus", version="1.0.0", labels=[label.to_dict() for label in trained.labels],
        patch_size=trained.patch_size, preprocessing=trained.metadata["preprocessing"], overlap=trained.overlap,
        description=DESCRIPTION.format(channels=tuple(trained.architecture["channels"])), license=LICENSE,
        citation=CITATION, training_data=TRAINING_DATA.format(n=n_train + n_val, train=n_train, val=n_val),
        metrics=metrics, mirror_axes=plan["plan"]["flip_axes"])
    bundle = save_bundle(trained.build_model(), metadata, args.output, force=True)
    refresh_digest(bundle.path, bundle.path.name)
    print(f"wrote {bundle.path}: held-out Dice {metrics['held_out']['dice']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
