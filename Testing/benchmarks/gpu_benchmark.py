"""GPU benchmark in one command (under 8 minutes on one H100): end-to-end CT inference and training, bf16 vs fp32.

1. Inference: a synthetic CT-sized 512x512x300 int16 volume at 0.8 x 0.8 x 1.5 mm segmented end to end (read
   ``.nii.gz`` -> reorient, resample to 1.5 mm, normalise -> sliding window -> probabilities back to the input
   grid, argmax -> write ``.nii.gz``) by ``Predictor`` with the design tutorial's network (64-128-256-512,
   untrained fixed-seed weights in a bundle written by ``bundle.save_bundle``), patch 128^3, overlap 0.5, in bf16
   autocast (the engine's CUDA default) and in fp32. Each precision runs in a fresh process: one cold run, then
   ``--repeats`` warm runs. Reported: wall time (target: under 3 s warm in bf16 on one H100), per-stage times,
   network TFLOP (FLOPs per window counted with ``FlopCounterMode`` on the meta device, times the number of
   windows) and achieved TFLOP/s of the inference stage as a fraction of the GPU's dense peak.
2. Training: ``bench_training_step.py`` on CUDA with the tutorial network (patch ``--train-patch``, batch 2):
   fp32 vs fp16 AMP (GradScaler) vs bf16 AMP vs gradient checkpointing: step time and peak GPU memory.

Peak figures used (dense, no sparsity): H100 SXM bf16 989 TFLOP/s, fp32 67 TFLOP/s (TF32 tensor cores: 495);
H100 PCIe bf16 756, fp32 51; H200 as H100 SXM; A100 bf16 312, fp32 19.5. Unknown GPUs: ``--peak-tflops``.

Writes ``<out>/gpu_benchmark.md`` and ``<out>/gpu_benchmark.json`` (default ``--out $OUT`` or ``gpu-benchmark``).

    .venv/bin/python Testing/benchmarks/gpu_benchmark.py                      # on a CUDA machine
    .venv/bin/python Testing/benchmarks/gpu_benchmark.py --device cpu --quick # CPU smoke test of the same code
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_inference as bi  # noqa: E402
import bench_training_step as bt  # noqa: E402
import benchcommon as bc  # noqa: E402

#: Dense peak TFLOP/s (bf16, fp32) by a substring of the CUDA device name, most specific first.
PEAK_TFLOPS: List[Tuple[str, float, float]] = [
    ("H100 PCIe", 756.0, 51.0),
    ("H100", 989.0, 67.0),
    ("H200", 989.0, 67.0),
    ("A100", 312.0, 19.5),
]
TUTORIAL_CHANNELS = (64, 128, 256, 512)


def peak_for(device_name: Optional[str], override: Optional[float]) -> Tuple[Optional[float], Optional[float], str]:
    """(bf16 peak, fp32 peak, how it was chosen) for a device name."""
    if override:
        return override, override, f"--peak-tflops {override:g}"
    for key, bf16, fp32 in PEAK_TFLOPS:
        if device_name and key in device_name:
            return bf16, fp32, f"{key} dense: bf16 {bf16:g}, fp32 {fp32:g} TFLOP/s"
    return None, None, "unknown device: pass --peak-tflops"


def window_flops(channels, patch: int) -> float:
    """FLOPs of one ``(1, 1, patch^3)`` forward pass, counted on the meta device (no compute, no memory)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from AttentionUNetSegmentLib.model.network import AttentionUNet

    model = AttentionUNet(1, 3, channels).to("meta").eval()
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.empty(1, 1, patch, patch, patch, device="meta"))
    return float(counter.get_total_flops())


def count_windows(image_path: Path, bundle_path: Path) -> int:
    """Windows the engine runs for this image (from the preprocessed size and the engine's window layout)."""
    import itertools

    from AttentionUNetSegmentLib.inference import predictor
    from AttentionUNetSegmentLib.model.bundle import load_bundle
    from AttentionUNetSegmentLib.fileio.imageio import read_image
    from AttentionUNetSegmentLib.preprocessing.preprocess import preprocess

    bundle = load_bundle(bundle_path)
    prepared = preprocess(read_image(image_path), bundle.preprocessing)
    align = 2 ** (len(bundle.architecture["channels"]) - 1)
    patch = [predictor._round_up(p, align) for p in bundle.patch_size[::-1]]
    padded = [max(p, predictor._round_up(s, align)) for s, p in zip(prepared.array.shape, patch)]
    starts = [predictor.window_starts(s, p, bundle.overlap, align) for s, p in zip(padded, patch)]
    return len(list(itertools.product(*starts)))


def inference_work(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Worker: cold + warm end-to-end runs of one precision; returns times and stage breakdowns."""
    import torch

    from AttentionUNetSegmentLib.fileio.imageio import read_image, write_image
    from AttentionUNetSegmentLib.inference.predictor import Predictor
    from AttentionUNetSegmentLib.model.bundle import load_bundle

    if spec["precision"] == "fp32":  # true fp32, not TF32 tensor cores
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    # On the CPU path (a smoke test of this script) both rows run fp32: emulated bf16 would take hours there.
    precision = spec["precision"] if spec["device"].startswith("cuda") else "fp32"
    predictor = Predictor(load_bundle(spec["bundle"]), device=spec["device"], overlap=0.5,
                          batch_size=spec.get("batch_size"), precision=precision)
    output = Path(spec["output"])
    runs = []
    for _ in range(1 + int(spec["repeats"])):
        if predictor.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        prediction = predictor.predict(read_image(spec["image"]), attention=False)
        write_image(prediction.labels, output, force=True)
        wall = time.perf_counter() - started
        run = {"wall_s": round(wall, 3), "stages_s": {k: round(v, 3) for k, v in prediction.timings.items()}}
        if predictor.device.type == "cuda":
            run["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        runs.append(run)
    return {"precision": spec["precision"], "device": str(predictor.device), "cold": runs[0], "warm": runs[1:]}


def run_inference(args, work_dir: Path, device_name: Optional[str]) -> List[Dict[str, Any]]:
    channels = TUTORIAL_CHANNELS if not args.quick else (8, 16, 32, 64)
    patch = args.patch
    bundle = bi.fixed_seed_bundle(work_dir, patch, args.spacing, channels)
    image = bi.case_image("quick" if args.quick else "ct", work_dir)
    windows = count_windows(image, bundle)
    flops = window_flops(channels, patch) * windows
    bf16_peak, fp32_peak, peak_note = peak_for(device_name, args.peak_tflops)
    rows = []
    for precision in args.precisions:
        spec = {"precision": precision, "device": args.device, "bundle": str(bundle), "image": str(image),
                "output": str(work_dir / "outputs" / "gpu" / f"{precision}_labels.nii.gz"),
                "repeats": args.repeats, "batch_size": args.batch_size}
        result = bc.run_worker(Path(__file__), {"kind": "inference", **spec}, timeout=args.timeout)
        print(f"inference {precision}: {result}", flush=True)
        row: Dict[str, Any] = {"precision": precision, "windows": windows, "network_tflop": round(flops / 1e12, 2)}
        if "cold" in result:
            warm = result["warm"] or [result["cold"]]
            best = min(warm, key=lambda r: r["wall_s"])
            stage = best["stages_s"].get("inference")
            peak = bf16_peak if precision == "bf16" else fp32_peak
            row.update(
                cold_s=result["cold"]["wall_s"],
                warm_s=best["wall_s"],
                stages_s=best["stages_s"],
                inference_stage_s=stage,
                achieved_tflops=round(flops / 1e12 / stage, 3) if stage else None,
                fraction_of_peak=round(flops / 1e12 / stage / peak, 3) if stage and peak else None,
                gpu_peak_mb=best.get("gpu_peak_mb"),
                peak_rss_mb=result.get("peak_rss_mb"),
                under_3s=best["wall_s"] < 3.0,
            )
        else:
            row["error"] = result.get("error")
        rows.append(row)
    for row in rows:
        row["peak_used"] = peak_note
    return rows


def work(spec: Dict[str, Any]) -> Dict[str, Any]:
    if spec.get("kind") == "inference":
        return inference_work(spec)
    raise ValueError(f"unknown worker kind {spec.get('kind')!r}")


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke test of the code path)")
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--spacing", type=float, default=1.5, help="target spacing of the bundle in mm")
    parser.add_argument("--repeats", type=int, default=2, help="warm runs after the cold one")
    parser.add_argument("--batch-size", type=int, help="windows per forward pass (default: the engine's)")
    parser.add_argument("--train-patch", type=int, default=128)
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--peak-tflops", type=float, help="dense peak of this GPU, when it is not in the table")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per worker process")
    parser.add_argument("--work-dir", default=str(bi.DEFAULT_WORK_DIR))
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu-benchmark")
    parser.add_argument("--quick", action="store_true", help="tiny network and volume (CPU smoke test)")
    args = parser.parse_args(argv)
    if args.device == "cpu" and not args.quick:
        print("note: the full benchmark on a CPU takes hours; use --quick for a smoke test", flush=True)
    if args.quick:
        args.patch, args.train_patch, args.train_batch, args.repeats = 32, 24, 1, 1
    started = time.perf_counter()
    import torch

    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") and torch.cuda.is_available() else None
    if args.device.startswith("cuda") and device_name is None:
        print("error: no CUDA GPU visible; run with --device cpu --quick to test the code path", file=sys.stderr)
        return 2
    work_dir = Path(args.work_dir)
    inference_rows = run_inference(args, work_dir, device_name)
    training_rows: List[Dict[str, Any]] = []
    if not args.skip_training:
        channels = list(TUTORIAL_CHANNELS) if not args.quick else [8, 16, 32, 64]
        variants = None if args.device.startswith("cuda") else ["fp32", "fp32+checkpointing"]
        training_rows = bt.run(args.device, channels, args.train_patch, args.train_batch, repeats=3 if not args.quick
                               else 1, warmup=1 if not args.quick else 0, variants=variants)

    machine = bc.machine_info()
    lines = [
        f"# GPU benchmark on {device_name or args.device}",
        "",
        f"{machine['date']}, torch {machine['torch']}, command: `{' '.join([Path(sys.argv[0]).name] + argv)}`",
        "",
        bc.format_table(
            inference_rows,
            ["precision", "windows", "network_tflop", "cold_s", "warm_s", "inference_stage_s", "achieved_tflops",
             "fraction_of_peak", "gpu_peak_mb", "peak_rss_mb", "under_3s", "error"],
            f"End-to-end {'CT-sized' if not args.quick else 'quick smoke-test'} inference ({args.device}; on the CPU "
            "both rows run fp32 there), channels {'-'.join(map(str, TUTORIAL_CHANNELS if not args.quick else (8, 16, 32, 64)))}, "
            f"patch {args.patch}^3, overlap 0.5, {args.spacing:g} mm",
        ),
        "",
        "Stages (warm, seconds): "
        + "; ".join(f"{r['precision']}: {r.get('stages_s')}" for r in inference_rows),
        "",
        f"Peak used: {inference_rows[0]['peak_used'] if inference_rows else ''}",
        "",
    ]
    if training_rows:
        lines += [bc.format_table(training_rows, bt.COLUMNS,
                                  f"Training step, batch {args.train_batch}x1x{args.train_patch}^3"), ""]
    lines.append(f"Total benchmark time: {time.perf_counter() - started:.0f} s")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_benchmark.md").write_text(text, encoding="utf-8")
    bc.write_json(str(out / "gpu_benchmark.json"), {"benchmark": "gpu", "args": vars(args),
                                                    "inference": inference_rows, "training": training_rows})
    return 0


if __name__ == "__main__":
    if not bc.worker_main(sys.argv[1:], work):
        sys.exit(main(sys.argv[1:]))
