"""Training step: FP32 vs mixed precision vs gradient checkpointing (time per step and peak memory).

Checks the design tutorial's claims instead of repeating them: "AMP uses ~40% less memory and is faster",
"gradient checkpointing saves 30-40% memory". Each variant runs in a fresh process: an ``AttentionUNet`` (fixed seed,
train mode) with Adam, cross-entropy on a random ``(B, 1, P, P, P)`` batch with random labels; ``--warmup`` untimed
steps, then the median of ``--repeats`` timed steps (forward, backward, optimiser step).

Mixed precision: on CUDA ``autocast(float16)`` with a ``GradScaler`` and ``autocast(bfloat16)`` (no scaler
needed); on the CPU ``autocast(bfloat16)`` (fp16 autocast has no CPU convolution kernels). Memory: on CUDA the
peak of ``torch.cuda.max_memory_allocated``; on the CPU the process's peak RSS and its growth over the RSS before
the first step (``step_mem_mb``, what activations and gradients cost).

    .venv/bin/python Testing/benchmarks/bench_training_step.py [--device cpu|cuda] [--patch 48] [--json out.json]
    .venv/bin/python Testing/benchmarks/bench_training_step.py --quick      # 24^3, one step each: a smoke test
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchcommon as bc  # noqa: E402

#: variant -> (autocast dtype name or None, GradScaler, gradient checkpointing)
VARIANTS = {
    "fp32": (None, False, False),
    "fp16-amp": ("float16", True, False),
    "bf16-amp": ("bfloat16", False, False),
    "fp32+checkpointing": (None, False, True),
    "bf16-amp+checkpointing": ("bfloat16", False, True),
}
CPU_VARIANTS = ("fp32", "bf16-amp", "fp32+checkpointing", "bf16-amp+checkpointing")
CUDA_VARIANTS = tuple(VARIANTS)


def work(spec: Dict[str, Any]) -> Dict[str, Any]:
    import contextlib

    import torch
    import torch.nn.functional as F

    from AttentionUNetSegmentLib.model.network import AttentionUNet

    device = torch.device(spec["device"])
    dtype_name, use_scaler, checkpointing = VARIANTS[spec["variant"]]
    torch.manual_seed(0)
    channels = tuple(int(c) for c in spec["channels"])
    model = AttentionUNet(1, 3, channels, gradient_checkpointing=checkpointing).to(device).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    patch, batch = int(spec["patch"]), int(spec["batch"])
    images = torch.randn(batch, 1, patch, patch, patch, device=device)
    targets = torch.randint(0, 3, (batch, patch, patch, patch), device=device)

    def autocast():
        if dtype_name is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype_name))

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(model(images), targets)
        scaler.scale(loss).backward()
        scaler.step(optimiser)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()

    baseline = bc.current_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = bc.timed(step, int(spec["repeats"]), int(spec["warmup"]))
    result: Dict[str, Any] = {
        "variant": spec["variant"],
        "device": str(device),
        "channels": "-".join(str(c) for c in channels),
        "patch": patch,
        "batch": batch,
        "step_s": round(bc.median(times), 3),
        "times_s": [round(t, 3) for t in times],
    }
    if device.type == "cuda":
        result["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    else:
        result["step_mem_mb"] = round(bc.peak_rss_mb() - baseline, 1)
    return result


def compare(rows: List[Dict[str, Any]], memory_key: str) -> None:
    """Add each variant's speed-up and memory saving relative to fp32 (in place)."""
    reference = next((r for r in rows if r.get("variant") == "fp32" and memory_key in r), None)
    if reference is None:
        return
    for row in rows:
        if memory_key in row and "step_s" in row:
            row["speedup_vs_fp32"] = round(reference["step_s"] / row["step_s"], 2)
            row["memory_saving_vs_fp32"] = f"{100 * (1 - row[memory_key] / reference[memory_key]):.0f}%"


def run(device: str, channels: List[int], patch: int, batch: int, repeats: int, warmup: int,
        variants=None) -> List[Dict[str, Any]]:
    """Run every variant for ``device`` in its own process; returns the rows with the fp32 comparison added."""
    chosen = variants or (CUDA_VARIANTS if device.startswith("cuda") else CPU_VARIANTS)
    rows = []
    for variant in chosen:
        spec = {"variant": variant, "device": device, "channels": channels, "patch": patch, "batch": batch,
                "repeats": repeats, "warmup": warmup}
        result = bc.run_worker(Path(__file__), spec)
        result.setdefault("variant", variant)
        rows.append(result)
        print(result, flush=True)
    compare(rows, "gpu_peak_mb" if device.startswith("cuda") else "step_mem_mb")
    return rows


COLUMNS = ["variant", "step_s", "speedup_vs_fp32", "step_mem_mb", "gpu_peak_mb", "memory_saving_vs_fp32",
           "peak_rss_mb", "error"]


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--patch", type=int, default=48, help="cubic patch edge (default 48 on the CPU)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="default: all for the device")
    parser.add_argument("--quick", action="store_true", help="24^3, one step, no warm-up (smoke test)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.patch, args.repeats, args.warmup = 24, 1, 0
    rows = run(args.device, args.channels, args.patch, args.batch, args.repeats, args.warmup, args.variants)
    title = (f"Training step on {args.device}, channels {'-'.join(map(str, args.channels))}, "
             f"batch {args.batch}x1x{args.patch}^3, median of {args.repeats}")
    print()
    print(bc.format_table(rows, COLUMNS, title))
    bc.write_json(args.json, {"benchmark": "training_step", "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    if not bc.worker_main(sys.argv[1:], work):
        sys.exit(main(sys.argv[1:]))
