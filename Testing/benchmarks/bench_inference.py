"""End-to-end inference: our engine vs the MONAI pipeline a user would build, same weights, same run.

Both pipelines go from an image file to a label-map file: read, reorient, resample to the bundle's spacing,
z-score normalise, Gaussian-weighted sliding window (same patch, overlap 0.5), back to the input grid, argmax,
write ``.nii.gz``.

- ``ours``: ``fileio.imageio.read_image`` -> ``inference.predictor.Predictor(bundle, device, overlap=0.5)
  .predict(image, attention=False)`` -> ``fileio.imageio.write_image(prediction.labels)``.
- ``monai``: the MONAI tutorial recipe: ``LoadImaged -> EnsureChannelFirstd -> Orientationd("RAS") ->
  Spacingd(bilinear, scale_extent=True) -> NormalizeIntensityd``, ``monai.inferers.sliding_window_inference(roi_size=patch,
  sw_batch_size=1, overlap=0.5, mode="gaussian")`` on the same network (its windows permuted from MONAI's
  ``(x, y, z)`` arrays to the ``(z, y, x)`` tensors the bundle's network expects), ``Invertd`` (logits back to the input
  grid), ``AsDiscreted(argmax)``, ``SaveImaged``.
  ``scale_extent=True`` gives the resampled grid our engine uses (it spans the input's extent and shares its
  centre), so both pipelines compute the same thing.
- ``monai-default`` (``--pipelines``): the same with ``Spacingd``'s default grid, which keeps the first voxel centre
  and so sits up to half a target voxel away from ours (one more voxel per axis): a legitimate other grid, whose
  labels differ from ours at boundaries (e.g. Dice 0.966 on ``aniso``), not from an error in either.
- ``monai-sitk`` (``--pipelines``): a leaner hand-written alternative: SimpleITK read/resample (float32),
  ``sliding_window_inference`` as above, SimpleITK linear resampling of the logits back, argmax, SimpleITK write.

Every run is a fresh process (honest peak RSS; nothing warm from the previous run); pipelines alternate within
each repeat so machine load hits them alike. Reported per case and pipeline: median pipeline time (file in ->
file out, model already loaded), process time (including imports and model loading), peak RSS, and the Dice of
each foreground label between the two pipelines' label maps (plus voxel agreement).

Weights (identical in both pipelines: both load the same bundle):

- ``sample``, ``aniso`` and ``head`` use a trained model: the default model shipped in ``Resources/Models`` (hippocampus,
  8-16-32-64, patch 40x56x40, 1 mm) or ``--bundle PATH``. Label agreement is only meaningful with a trained
  network (see ``fixed_seed_bundle``).
- ``ct`` (and ``quick``) use an untrained fixed-seed ``AttentionUNet`` (16-32-64-128, patch 96^3, 1.5 mm
  isotropic, z-score) written with ``bundle.save_bundle`` and cached in ``--work-dir``: time and memory only.

Cases:

- ``sample``: the bundled sample image (``AttentionUNetSegment/Resources/SampleData``; an MSD hippocampus case
  when it is absent).
- ``aniso``: 192x192x160 voxels of 0.19 x 0.26 x 0.23 mm: the bundled sample's field of view (the left medial
  temporal lobe, 36 x 50 x 36 mm) resampled linearly, like a sub-millimetre hippocampus acquisition: a large
  anisotropic volume on which the hippocampus model is in its domain, so label agreement is meaningful (see
  ``hires_sample_volume``).
- ``head``: a 192x192x160 whole-head MRI at 0.9 x 1.1 x 1.2 mm: the MNI152 T1 template from the nilearn wheel,
  resampled (see ``head_volume``). The hippocampus model, trained on 36 x 50 x 36 mm crops, scatters labels over
  the whole brain there: time and memory are meaningful, label agreement is not (near-tie voxels flip).
- ``ct``: a synthetic CT-sized 512x512x300 int16 volume at 0.8 x 0.8 x 1.5 mm (body, organs, air).

    .venv/bin/python Testing/benchmarks/bench_inference.py --cases sample aniso head --repeats 2 --json out.json
    .venv/bin/python Testing/benchmarks/bench_inference.py --cases ct --repeats 1
    .venv/bin/python Testing/benchmarks/bench_inference.py --quick      # tiny volumes, 32^3 patch: smoke test
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchcommon as bc  # noqa: E402

DEFAULT_WORK_DIR = Path("/tmp/attention-unet-bench")
SAMPLE_DIR = bc.REPO_ROOT / "AttentionUNetSegment" / "Resources" / "SampleData"
MSD_CASE = bc.REPO_ROOT.parent / "shared" / "data" / "msd-hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"
DEFAULT_MODEL_DIRS = [bc.REPO_ROOT / "AttentionUNetSegment" / "Resources" / "Models"]

#: Synthetic cases: size (x, y, z), spacing (x, y, z) mm, kind.
SYNTHETIC = {
    "ct": ((512, 512, 300), (0.8, 0.8, 1.5), "ct"),
    "quick": ((60, 52, 40), (1.0, 1.0, 2.0), "mr"),
}
PIPELINES = ("ours", "monai", "monai-default", "monai-sitk")
#: Cases segmented with a trained model (default model or ``--bundle``), where label agreement is meaningful.
TRAINED_CASES = ("sample", "aniso", "head")


# --------------------------------------------------------------------------------------------- inputs and bundle
def synthetic_scene(size: Sequence[int], spacing: Sequence[float], kind: str, seed: int = 0):
    """A smooth random scene: ``(sitk.Image, labels)`` with ellipsoids of different intensity plus noise.

    ``mr``: float32 intensities around 100-600 with zero background. ``ct``: int16 Hounsfield units: air (-1000)
    around an elliptic body (~40 HU) holding organs (-100..300 HU). ``labels`` (uint8 ``(z, y, x)``) marks the
    ellipsoids of the second intensity as 1 and of the fourth as 2: what the benchmark network learns to find.
    """
    import numpy as np
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    nx, ny, nz = size
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in (nz, ny, nx)), indexing="ij",
                          sparse=True)
    if kind == "ct":
        array = np.full((nz, ny, nx), -1000, dtype=np.int16)
        body = np.broadcast_to((x / 0.85) ** 2 + (y / 0.65) ** 2 <= 1.0, array.shape)
        array[body] = 40
        values = (-100, 60, 150, 300)
    else:
        array = np.zeros((nz, ny, nx), dtype=np.float32)
        body = np.broadcast_to((x / 0.9) ** 2 + (y / 0.9) ** 2 + (z / 0.95) ** 2 <= 1.0, array.shape)
        array[body] = 200
        values = (100, 350, 450, 600)
    labels = np.zeros((nz, ny, nx), dtype=np.uint8)
    for index in range(12):
        centre = rng.uniform(-0.5, 0.5, 3).astype(np.float32)
        radii = rng.uniform(0.08, 0.3, 3).astype(np.float32)
        inside = ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + (
            (z - centre[2]) / radii[2]
        ) ** 2 <= 1.0
        inside = inside & body
        array[inside] = values[index % len(values)]
        labels[inside] = {1: 1, 3: 2}.get(index % len(values), 0)
    noise = rng.normal(0, 20, array.shape).astype(np.float32)
    array = (array + noise).astype(array.dtype)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([-0.5 * n * s for n, s in zip(size, spacing)])
    return image, labels


def case_image(case: str, work_dir: Path) -> Path:
    """Path of the case's input file (synthetic ones are generated once and cached)."""
    if case == "sample":
        found = sorted(SAMPLE_DIR.glob("*.nii.gz")) + sorted(SAMPLE_DIR.glob("*.nrrd")) if SAMPLE_DIR.is_dir() else []
        if found:
            return found[0]
        if MSD_CASE.is_file():
            return MSD_CASE
        raise SystemExit(f"no sample image: neither {SAMPLE_DIR} nor {MSD_CASE} exists")
    if case == "aniso":
        return hires_sample_volume(case_image("sample", work_dir), work_dir)
    if case == "head":
        return head_volume(work_dir)
    import SimpleITK as sitk

    size, spacing, kind = SYNTHETIC[case]
    path = work_dir / "inputs" / f"{case}_{'x'.join(map(str, size))}.nii.gz"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name.replace(".nii.gz", ".partial.nii.gz"))
        sitk.WriteImage(synthetic_scene(size, spacing, kind)[0], str(partial), useCompression=True)
        partial.replace(path)
    return path


def default_model_bundle() -> Optional[Path]:
    for folder in DEFAULT_MODEL_DIRS:
        for metadata in sorted(folder.glob("*/model.json")) if folder.is_dir() else []:
            return metadata.parent
    return None


def fixed_seed_bundle(work_dir: Path, patch: int, spacing: float, channels: Sequence[int]) -> Path:
    """A bundle with an untrained fixed-seed network, written with ``bundle.save_bundle`` once and cached.

    Used where only time and memory matter (CT-sized case, scaling): an untrained network's output depends
    chaotically on each window's context (instance norm), so two pipelines that place windows a few voxels apart
    disagree (label Dice ~0.5) whatever their quality; label agreement is measured with a trained model.
    """
    directory = work_dir / f"bundle_{'-'.join(map(str, channels))}_p{patch}_s{spacing:g}"
    if (directory / "model.json").is_file():
        return directory
    import torch

    from AttentionUNetSegmentLib.model.bundle import create_metadata, save_bundle
    from AttentionUNetSegmentLib.model.network import AttentionUNet

    torch.manual_seed(0)
    metadata = create_metadata(
        name="benchmark-fixed-seed",
        labels=[{"value": 1, "name": "A", "color": [1.0, 0.0, 0.0]}, {"value": 2, "name": "B", "color": [0.0, 1.0, 0.0]}],
        patch_size=[patch] * 3,
        preprocessing={"orientation": "RAS", "target_spacing": [spacing] * 3, "normalization": {"scheme": "zscore"}},
        overlap=0.5,
        description="Untrained fixed-seed network for the speed and memory benchmarks only.",
    )
    save_bundle(AttentionUNet(1, 3, tuple(channels)), metadata, directory, force=True)
    return directory


def hires_sample_volume(sample: Path, work_dir: Path) -> Path:
    """``sample``'s field of view (the whole extent of its voxels) resampled linearly to 192 x 192 x 160 voxels:
    0.19 x 0.26 x 0.23 mm for the bundled 36 x 50 x 36 mm sample, same orientation and world position."""
    path = work_dir / "inputs" / f"{sample.name.split('.')[0]}_192x192x160.nii.gz"
    if path.is_file():
        return path
    import numpy as np
    import SimpleITK as sitk

    image = sitk.ReadImage(str(sample), sitk.sitkFloat32)
    size = np.array((192, 192, 160))
    extent = np.array(image.GetSize()) * np.array(image.GetSpacing())
    spacing = extent / size
    direction = np.array(image.GetDirection()).reshape(3, 3)
    # First voxel centre half a new voxel inside the first old voxel's outer face.
    origin = np.array(image.GetOrigin()) + direction @ ((spacing - np.array(image.GetSpacing())) / 2)
    resampled = sitk.Resample(image, [int(n) for n in size], sitk.Transform(), sitk.sitkLinear,
                              [float(o) for o in origin], [float(s) for s in spacing], image.GetDirection(), 0.0,
                              sitk.sitkFloat32)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name("partial-" + path.name)
    sitk.WriteImage(resampled, str(partial), useCompression=True)
    partial.replace(path)
    return path


def head_volume(work_dir: Path) -> Path:
    """The MNI ICBM152 2009 T1 template shipped in the ``nilearn`` wheel (skull-stripped brain, 1 mm), resampled
    linearly to 192 x 192 x 160 voxels of 0.9 x 1.1 x 1.2 mm around its centre: a real anisotropic head MRI, far
    larger than the crops the hippocampus model knows."""
    path = work_dir / "inputs" / "mni152_192x192x160_aniso.nii.gz"
    if path.is_file():
        return path
    import importlib.util

    import numpy as np
    import SimpleITK as sitk

    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise SystemExit("the aniso case needs nilearn (its wheel ships the MNI152 template)")
    template = Path(spec.origin).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    brain = sitk.DICOMOrient(sitk.ReadImage(str(template), sitk.sitkFloat32), "RAS")
    size, spacing = (192, 192, 160), (0.9, 1.1, 1.2)
    centre = np.array(brain.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in brain.GetSize()]))
    direction = np.array(brain.GetDirection()).reshape(3, 3)
    origin = centre - direction @ ((np.array(size) - 1) * np.array(spacing) / 2)
    resampled = sitk.Resample(brain, size, sitk.Transform(), sitk.sitkLinear, [float(o) for o in origin], spacing,
                              brain.GetDirection(), 0.0, sitk.sitkFloat32)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name("partial-" + path.name)
    sitk.WriteImage(resampled, str(partial), useCompression=True)
    partial.replace(path)
    return path


# ---------------------------------------------------------------------------------------------------- workers
def run_ours(image_path: Path, bundle_path: Path, output: Path, spec: Dict[str, Any]) -> Dict[str, Any]:
    from AttentionUNetSegmentLib.model.bundle import load_bundle
    from AttentionUNetSegmentLib.fileio.imageio import read_image, write_image
    from AttentionUNetSegmentLib.inference.predictor import Predictor

    predictor = Predictor(load_bundle(bundle_path), device=spec.get("device", "cpu"), overlap=0.5)
    baseline = bc.current_rss_mb()
    started = time.perf_counter()
    prediction = predictor.predict(read_image(image_path), attention=bool(spec.get("attention", False)))
    write_image(prediction.labels, output, force=True)
    seconds = time.perf_counter() - started
    return {"pipeline_s": round(seconds, 3), "rss_before_mb": round(baseline, 1),
            "stages_s": {k: round(v, 3) for k, v in prediction.timings.items()}}


def run_monai(image_path: Path, bundle_path: Path, output: Path, spec: Dict[str, Any]) -> Dict[str, Any]:
    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference
    from monai.transforms import (AsDiscreted, Compose, EnsureChannelFirstd, Invertd, LoadImaged,
                                  NormalizeIntensityd, Orientationd, SaveImaged, Spacingd)

    from AttentionUNetSegmentLib.model.bundle import load_bundle

    bundle = load_bundle(bundle_path)
    model = bundle.build_model("cpu").eval()
    spacing = bundle.preprocessing.target_spacing
    # align_corners=True: MONAI warns that scale_extent=True needs it.
    grid = {} if spec["pipeline"] == "monai-default" else {"scale_extent": True, "align_corners": True}
    pre = Compose([
        LoadImaged(keys="image"),
        EnsureChannelFirstd(keys="image"),
        Orientationd(keys="image", axcodes="RAS"),
        Spacingd(keys="image", pixdim=spacing, mode="bilinear", **grid),
        NormalizeIntensityd(keys="image"),
    ])
    post = Compose([
        Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True),
        AsDiscreted(keys="pred", argmax=True),
        SaveImaged(keys="pred", output_dir=str(output.parent), output_postfix="seg", output_ext=".nii.gz",
                   separate_folder=False, output_dtype=np.uint8, resample=False, print_log=False),
    ])
    baseline = bc.current_rss_mb()
    started = time.perf_counter()
    data = pre({"image": str(image_path)})
    def network(windows: torch.Tensor) -> torch.Tensor:
        # MONAI arrays are (x, y, z); the bundle's network was trained on (z, y, x) tensors (DESIGN.md). Softmax per
        # window, as ours does: blended and resampled probabilities, not logits, decide the labels in both.
        return torch.softmax(model(windows.permute(0, 1, 4, 3, 2)), dim=1).permute(0, 1, 4, 3, 2)

    with torch.no_grad():
        data["pred"] = sliding_window_inference(data["image"][None], roi_size=bundle.patch_size, sw_batch_size=1,
                                                predictor=network, overlap=0.5, mode="gaussian")[0]
    post(data)
    seconds = time.perf_counter() - started
    return {"pipeline_s": round(seconds, 3), "rss_before_mb": round(baseline, 1)}


def run_monai_sitk(image_path: Path, bundle_path: Path, output: Path, spec: Dict[str, Any]) -> Dict[str, Any]:
    import numpy as np
    import SimpleITK as sitk
    import torch
    from monai.inferers import sliding_window_inference

    from AttentionUNetSegmentLib.model.bundle import load_bundle

    bundle = load_bundle(bundle_path)
    model = bundle.build_model("cpu").eval()
    spacing = bundle.preprocessing.target_spacing
    baseline = bc.current_rss_mb()
    started = time.perf_counter()
    original = sitk.ReadImage(str(image_path), sitk.sitkFloat32)
    oriented = sitk.DICOMOrient(original, "RAS")
    size = [max(1, round(n * s / t)) for n, s, t in zip(oriented.GetSize(), oriented.GetSpacing(), spacing)]
    resampled = sitk.Resample(oriented, size, sitk.Transform(), sitk.sitkLinear, oriented.GetOrigin(), spacing,
                              oriented.GetDirection(), 0.0, sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(resampled)
    array = (array - array.mean()) / max(float(array.std()), 1e-8)
    with torch.no_grad():
        logits = sliding_window_inference(torch.from_numpy(array)[None, None], roi_size=bundle.patch_size[::-1],
                                          sw_batch_size=1, predictor=model, overlap=0.5, mode="gaussian")[0]
    best = None
    labels = None
    for channel in range(logits.shape[0]):
        channel_image = sitk.GetImageFromArray(logits[channel].numpy())
        channel_image.CopyInformation(resampled)
        back = sitk.GetArrayFromImage(sitk.Resample(channel_image, original, sitk.Transform(), sitk.sitkLinear,
                                                    -1e4 if channel else 1e4, sitk.sitkFloat32))
        if best is None:
            best, labels = back, np.zeros(back.shape, dtype=np.uint8)
        else:
            better = back > best
            best[better] = back[better]
            labels[better] = channel
    result = sitk.GetImageFromArray(labels)
    result.CopyInformation(original)
    sitk.WriteImage(result, str(output), useCompression=True)
    seconds = time.perf_counter() - started
    return {"pipeline_s": round(seconds, 3), "rss_before_mb": round(baseline, 1)}


RUNNERS = {"ours": run_ours, "monai": run_monai, "monai-default": run_monai, "monai-sitk": run_monai_sitk}


def work(spec: Dict[str, Any]) -> Dict[str, Any]:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    output = Path(spec["output"])
    output.parent.mkdir(parents=True, exist_ok=True)
    result = RUNNERS[spec["pipeline"]](Path(spec["image"]), Path(spec["bundle"]), output, spec)
    if spec["pipeline"] in ("monai", "monai-default"):  # SaveImaged chose the name: <stem>_seg.nii.gz in the output folder
        written = sorted(output.parent.glob("*_seg.nii.gz"), key=lambda p: p.stat().st_mtime)[-1]
        written.replace(output)
    result["pipeline"] = spec["pipeline"]
    return result


# ------------------------------------------------------------------------------------------------- comparison
def label_agreement(first: Path, second: Path) -> Dict[str, Any]:
    """Dice per foreground label (and their mean) and the fraction of equal voxels of two label maps on one grid."""
    import numpy as np
    import SimpleITK as sitk

    a_image, b_image = sitk.ReadImage(str(first)), sitk.ReadImage(str(second))
    if a_image.GetSize() != b_image.GetSize() or not np.allclose(a_image.GetSpacing(), b_image.GetSpacing()):
        return {"dice_error": f"grids differ: {a_image.GetSize()} vs {b_image.GetSize()}"}
    a, b = sitk.GetArrayViewFromImage(a_image), sitk.GetArrayViewFromImage(b_image)
    dice = {}
    for value in sorted((set(np.unique(a).tolist()) | set(np.unique(b).tolist())) - {0}):
        in_a, in_b = a == value, b == value
        total = int(in_a.sum()) + int(in_b.sum())
        dice[int(value)] = round(2.0 * int((in_a & in_b).sum()) / total, 4) if total else 1.0
    return {
        "dice_per_label": dice,
        "dice_mean": round(sum(dice.values()) / len(dice), 4) if dice else 1.0,
        "voxel_agreement": round(float((a == b).mean()), 5),
        "foreground_fraction": {v: round(float((a == v).mean()), 4) for v in dice},
    }


def run_case(case: str, image: Path, bundle: Path, pipelines: Sequence[str], repeats: int, work_dir: Path,
             extra: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Alternate the pipelines ``repeats`` times on one case; one row per pipeline (median over repeats)."""
    runs: Dict[str, List[Dict[str, Any]]] = {p: [] for p in pipelines}
    outputs = {p: work_dir / "outputs" / case / p / f"{case}_labels.nii.gz" for p in pipelines}
    for repeat in range(repeats):
        for pipeline in pipelines:
            spec = {"pipeline": pipeline, "image": str(image), "bundle": str(bundle),
                    "output": str(outputs[pipeline]), **extra}
            result = bc.run_worker(Path(__file__), spec)
            print(f"[{case} #{repeat + 1}] {pipeline}: {result}", flush=True)
            runs[pipeline].append(result)
    rows = []
    for pipeline in pipelines:
        good = [r for r in runs[pipeline] if "pipeline_s" in r]
        row: Dict[str, Any] = {"case": case, "pipeline": pipeline, "runs": len(good)}
        if good:
            row["pipeline_s"] = round(bc.median(r["pipeline_s"] for r in good), 2)
            row["process_s"] = round(bc.median(r["process_wall_s"] for r in good), 2)
            row["peak_rss_mb"] = round(max(r["peak_rss_mb"] for r in good), 0)
            row["times_s"] = [r["pipeline_s"] for r in good]
            row["stages_s"] = good[-1].get("stages_s")
        else:
            row["error"] = runs[pipeline][-1].get("error") if runs[pipeline] else "not run"
        rows.append(row)
    ours = next((r for r in rows if r["pipeline"] == "ours" and "pipeline_s" in r), None)
    for row in rows:
        if ours is not None and row is not ours and "pipeline_s" in row:
            row["ours_speedup"] = round(row["pipeline_s"] / ours["pipeline_s"], 2)
            row["ours_memory_ratio"] = round(ours["peak_rss_mb"] / row["peak_rss_mb"], 2)
            if outputs["ours"].is_file() and outputs[row["pipeline"]].is_file():
                row.update(label_agreement(outputs["ours"], outputs[row["pipeline"]]))
    return rows


COLUMNS = ["case", "pipeline", "runs", "pipeline_s", "process_s", "peak_rss_mb", "ours_speedup",
           "ours_memory_ratio", "dice_mean", "voxel_agreement", "error"]


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=["sample", "aniso"],
                        choices=["sample", "aniso", "head", "ct", "quick"])
    parser.add_argument("--pipelines", nargs="+", default=["ours", "monai"], choices=list(PIPELINES))
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per pipeline (default 2)")
    parser.add_argument("--bundle", help="trained model bundle for the sample, aniso and head cases (default: the "
                        "default model shipped in Resources/Models)")
    parser.add_argument("--patch", type=int, default=96, help="patch of the fixed-seed bundle (default 96)")
    parser.add_argument("--spacing", type=float, default=1.5, help="target spacing of the fixed-seed bundle, mm")
    parser.add_argument("--attention", action="store_true", help="ours also computes attention maps")
    parser.add_argument("--threads", type=int, help="torch threads in every worker (default: torch's own)")
    parser.add_argument("--work-dir", default=str(DEFAULT_WORK_DIR), help="cache of inputs, bundles, outputs")
    parser.add_argument("--quick", action="store_true", help="a small synthetic case, 32^3 patch, one repeat")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.cases, args.patch, args.repeats = ["quick"], 32, 1
    work_dir = Path(args.work_dir)
    synthetic_bundle = fixed_seed_bundle(work_dir, args.patch, args.spacing, (16, 32, 64, 128))
    extra: Dict[str, Any] = {"attention": args.attention, "threads": args.threads}

    rows = []
    for case in args.cases:
        image = case_image(case, work_dir)
        bundle = synthetic_bundle
        if case in TRAINED_CASES:
            bundle = Path(args.bundle) if args.bundle else default_model_bundle()
            if bundle is None:
                raise SystemExit(f"case {case} needs a trained model: ship the default model or pass --bundle PATH")
        print(f"case {case}: {image} with bundle {bundle}", flush=True)
        for row in run_case(case, image, bundle, args.pipelines, args.repeats, work_dir, extra):
            row["bundle"] = bundle.name
            rows.append(row)
    print()
    print(bc.format_table(rows, COLUMNS, "End-to-end inference (file in -> label file out), median over runs"))
    bc.write_json(args.json, {"benchmark": "inference", "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    if not bc.worker_main(sys.argv[1:], work):
        sys.exit(main(sys.argv[1:]))
