"""Model forward pass: our AttentionUNet (plain and CPU-optimised) vs MONAI's ``AttentionUnet`` at equal widths.

For each width (16-32-64-128 and the design tutorial's 64-128-256-512) and each implementation, one fresh process
builds the network (fixed seed, eval mode), counts the FLOPs of one ``(1, 1, P, P, P)`` forward pass with
``torch.utils.flop_counter.FlopCounterMode`` on the meta device (multiply-add = 2 FLOPs; counted on the plain
network, the optimised copy does the same arithmetic), then times ``--repeats`` forward passes under ``torch.inference_mode`` after a
warm-up. Reported: median time, GFLOP, achieved GFLOP/s, parameters and the process's peak RSS.

The implementations alternate (ours, ours optimised, MONAI, ours, ...) so machine load hits them alike.
The two networks are not identical architectures (MONAI downsamples with strided convolutions, upsamples with
transposed convolutions and uses batch norm; ours max-pools, resizes trilinearly and uses instance norm), so
compare GFLOP/s and time per GFLOP as well as raw time.

    .venv/bin/python Testing/benchmarks/bench_model_forward.py [--patch 96] [--repeats 2] [--json out.json]
    .venv/bin/python Testing/benchmarks/bench_model_forward.py --quick     # 32^3, one repeat: a smoke test
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchcommon as bc  # noqa: E402

WIDTHS = {"16-32-64-128": (16, 32, 64, 128), "64-128-256-512": (64, 128, 256, 512)}
IMPLEMENTATIONS = ("ours", "ours-optimised", "monai")


def build(implementation: str, channels, out_channels: int = 3):
    import torch

    torch.manual_seed(0)
    if implementation == "monai":
        from monai.networks.nets import AttentionUnet

        return AttentionUnet(3, 1, out_channels, channels, strides=(2,) * (len(channels) - 1)).eval()
    from AttentionUNetSegmentLib.model.network import AttentionUNet

    return AttentionUNet(1, out_channels, channels).eval()


def work(spec: Dict[str, Any]) -> Dict[str, Any]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    channels = WIDTHS[spec["width"]]
    patch = int(spec["patch"])
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:  # on the meta device: shapes only, no compute, no memory
        build(spec["implementation"], channels).to("meta")(torch.empty(1, 1, patch, patch, patch, device="meta"))
    flops = counter.get_total_flops()
    model = build(spec["implementation"], channels)
    x = torch.randn(1, 1, patch, patch, patch)
    if spec["implementation"] == "ours-optimised":
        from AttentionUNetSegmentLib.model.acceleration import optimize_for_inference

        model = optimize_for_inference(model, "cpu")
    baseline = bc.current_rss_mb()
    with torch.inference_mode():
        times = bc.timed(lambda: model(x), int(spec["repeats"]), int(spec["warmup"]))
    seconds = bc.median(times)
    return {
        "implementation": spec["implementation"],
        "width": spec["width"],
        "patch": patch,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "gflop": round(flops / 1e9, 2),
        "time_s": round(seconds, 3),
        "times_s": [round(t, 3) for t in times],
        "gflop_per_s": round(flops / 1e9 / seconds, 1),
        "rss_before_forward_mb": round(baseline, 1),
    }


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patch", type=int, default=96, help="cubic patch edge in voxels (default 96)")
    parser.add_argument("--repeats", type=int, default=2, help="timed forward passes per variant (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forward passes first (default 1)")
    parser.add_argument("--widths", nargs="+", default=list(WIDTHS), choices=list(WIDTHS))
    parser.add_argument("--threads", type=int, help="torch threads in every worker (default: torch's own)")
    parser.add_argument("--quick", action="store_true", help="32^3 patch, one repeat, no warm-up (smoke test)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.patch, args.repeats, args.warmup = 32, 1, 0

    rows = []
    for width in args.widths:
        for implementation in IMPLEMENTATIONS:
            spec = {"implementation": implementation, "width": width, "patch": args.patch,
                    "repeats": args.repeats, "warmup": args.warmup, "threads": args.threads}
            result = bc.run_worker(Path(__file__), spec)
            result.setdefault("implementation", implementation)
            result.setdefault("width", width)
            rows.append(result)
            print(result, flush=True)
    for width in args.widths:
        reference = next((r for r in rows if r["width"] == width and r["implementation"] == "monai"), {})
        for row in rows:
            if row["width"] == width and "time_s" in row and "time_s" in reference:
                row["speed_vs_monai"] = round(reference["time_s"] / row["time_s"], 2)
    columns = ["width", "implementation", "params_M", "gflop", "time_s", "gflop_per_s", "speed_vs_monai",
               "peak_rss_mb", "error"]
    print()
    print(bc.format_table(rows, columns, f"Model forward, 1x1x{args.patch}^3, median of {args.repeats}"))
    bc.write_json(args.json, {"benchmark": "model_forward", "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    if not bc.worker_main(sys.argv[1:], work):
        sys.exit(main(sys.argv[1:]))
