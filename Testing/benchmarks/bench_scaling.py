"""Scaling: end-to-end inference time and peak memory against the number of voxels.

Synthetic scenes already at the bundle's 1.5 mm spacing, growing along z by default (96x96x96 ... 96x96x768), are
segmented end to end (file in -> label file out) by our engine and, alternating, by the MONAI pipeline of
``bench_inference.py`` (same workers, same fixed-seed bundle, fresh process per run). Reported per size: voxels,
sliding windows, pipeline seconds, seconds per window and per million voxels, peak RSS and its growth over the
process's RSS before the run (``mem_growth_mb``), which shows how memory grows with the volume: our accumulators
hold ``classes x voxels`` float32 plus one weight map; nothing grows with the number of windows.

    .venv/bin/python Testing/benchmarks/bench_scaling.py [--pipelines ours monai] [--json out.json]
    .venv/bin/python Testing/benchmarks/bench_scaling.py --quick      # 32^3 patch, small sizes: smoke test
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_inference as bi  # noqa: E402
import benchcommon as bc  # noqa: E402

DEFAULT_SIZES = ["96x96x96", "96x96x192", "96x96x384", "96x96x768"]
QUICK_SIZES = ["32x32x32", "32x32x64", "32x32x128", "32x32x256"]


def windows(size: List[int], patch: int, overlap: float = 0.5) -> int:
    """Sliding windows per volume (MONAI's and our count agree for these sizes)."""
    step = patch * (1 - overlap)
    return math.prod(1 if n <= patch else math.ceil((n - patch) / step) + 1 for n in size)


def scene_path(work_dir: Path, size: List[int], spacing: float) -> Path:
    import SimpleITK as sitk

    path = work_dir / "inputs" / f"scaling_{'x'.join(map(str, size))}_s{spacing:g}.nii.gz"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name.replace(".nii.gz", ".partial.nii.gz"))
        sitk.WriteImage(bi.synthetic_scene(size, (spacing,) * 3, "mr", seed=7)[0], str(partial), useCompression=True)
        partial.replace(path)
    return path


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, help="volumes as XxYxZ voxels")
    parser.add_argument("--pipelines", nargs="+", default=["ours", "monai"], choices=list(bi.PIPELINES))
    parser.add_argument("--patch", type=int, default=96)
    parser.add_argument("--spacing", type=float, default=1.5)
    parser.add_argument("--threads", type=int, help="torch threads in every worker (default: torch's own)")
    parser.add_argument("--work-dir", default=str(bi.DEFAULT_WORK_DIR))
    parser.add_argument("--quick", action="store_true", help="32^3 patch and small sizes (smoke test)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.patch = QUICK_SIZES, 32
    work_dir = Path(args.work_dir)
    bundle = bi.fixed_seed_bundle(work_dir, args.patch, args.spacing, (16, 32, 64, 128))
    extra: Dict[str, Any] = {"threads": args.threads}

    rows: List[Dict[str, Any]] = []
    for text in args.sizes:
        size = [int(v) for v in text.lower().split("x")]
        image = scene_path(work_dir, size, args.spacing)
        for pipeline in args.pipelines:
            output = work_dir / "outputs" / "scaling" / pipeline / f"{text}_labels.nii.gz"
            spec = {"pipeline": pipeline, "image": str(image), "bundle": str(bundle), "output": str(output), **extra}
            result = bc.run_worker(Path(bi.__file__), spec)
            print(f"[{text}] {pipeline}: {result}", flush=True)
            voxels = math.prod(size)
            row: Dict[str, Any] = {"size": text, "pipeline": pipeline, "mvoxels": round(voxels / 1e6, 2),
                                   "windows": windows(size, args.patch)}
            if "pipeline_s" in result:
                row.update(
                    pipeline_s=result["pipeline_s"],
                    s_per_window=round(result["pipeline_s"] / row["windows"], 2),
                    s_per_mvoxel=round(result["pipeline_s"] / (voxels / 1e6), 2),
                    peak_rss_mb=result["peak_rss_mb"],
                    mem_growth_mb=round(result["peak_rss_mb"] - result["rss_before_mb"], 1),
                )
            else:
                row["error"] = result.get("error")
            rows.append(row)
    columns = ["size", "pipeline", "mvoxels", "windows", "pipeline_s", "s_per_window", "s_per_mvoxel",
               "peak_rss_mb", "mem_growth_mb", "error"]
    print()
    print(bc.format_table(rows, columns, f"Scaling (patch {args.patch}^3, overlap 0.5, {args.spacing:g} mm)"))
    bc.write_json(args.json, {"benchmark": "scaling", "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
