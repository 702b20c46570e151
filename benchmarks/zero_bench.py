"""ZeRO benchmark: ZeroAdamW (stages 1 and 2) against DDP + torch.optim.AdamW, on gloo processes (CPU).

    python benchmarks/zero_bench.py --nproc 2 [--hidden 512 --layers 4 --steps 10] [--json out.json]

Spawns ``--nproc`` processes on this machine (gloo), trains an MLP for a few steps with each optimizer and
prints the median step time (forward + backward + step, rank 0) and the optimizer memory each rank holds.
The same numbers come from ``fused_ops.distributed.benchmark_zero`` (what ``python -m fused_ops bench --zero``
calls). On GPUs, launch your training script with torchrun and NCCL instead (see the README).
"""

from __future__ import annotations

import argparse
import json
import sys

from fused_ops.distributed import benchmark_zero


def _mib(n: int) -> str:
    return f"{n / 2**20:8.2f}"


def format_report(result: dict) -> str:
    """A table of ``benchmark_zero``'s result."""
    lines = [
        f"ZeRO benchmark: {result['nproc']} ranks, {result['device']}, {result['params']:,} params",
        f"{'optimizer':<12}{'step ms':>9}  {'per-rank MiB: master':>21}{'states':>9}{'buckets':>9}{'p.grad':>9}"
        f"{'padding':>9}{'total':>9}  totals of all ranks (MiB)",
    ]
    for key in [k for k in result if k.startswith("zero")] + ["ddp_adamw"]:
        r = result[key]
        m = r["memory"]
        per_rank = ", ".join(f"{t / 2**20:.2f}" for t in r["memory_per_rank"])
        lines.append(
            f"{key:<12}{r['step_ms']:9.2f}  {_mib(m['master']):>21}{_mib(m['states']):>9}{_mib(m['grad_buckets']):>9}"
            f"{_mib(m['param_grads']):>9}{_mib(m['padding']):>9}{_mib(m['total']):>9}  [{per_rank}]"
        )
    lines.append(
        "buckets: ZeRO's fp32 grad shards + reduce-scatter staging; p.grad: grads still held after backward "
        "(ZeRO-1 and DDP keep full grads; ZeRO-2 frees them as their buckets are reduced)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bucket-cap-mb", type=float, default=25)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    result = benchmark_zero(nproc=args.nproc, hidden=args.hidden, layers=args.layers, batch=args.batch,
                            steps=args.steps, warmup=args.warmup, bucket_cap_mb=args.bucket_cap_mb)  # fmt: skip
    print(format_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
