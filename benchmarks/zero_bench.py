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

from fused_ops.__main__ import _non_negative_int, _positive_float, _positive_int
from fused_ops.bench import format_zero_report
from fused_ops.distributed import benchmark_zero


def main(argv: list[str] | None = None) -> int:
    # the command line's checks (python -m fused_ops bench): a bad value is an argparse error naming the option,
    # before any process is spawned
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=_positive_int, default=2, help="processes (default 2)")
    parser.add_argument("--hidden", type=_positive_int, default=512, help="width of each layer (default 512)")
    parser.add_argument("--layers", type=_positive_int, default=4, help="Linear layers (default 4)")
    parser.add_argument("--batch", type=_positive_int, default=32, help="batch per rank (default 32)")
    parser.add_argument("--steps", type=_positive_int, default=10, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=_non_negative_int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--bucket-cap-mb", type=_positive_float, default=25, help="bucket size, MB (default 25)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    result = benchmark_zero(nproc=args.nproc, hidden=args.hidden, layers=args.layers, batch=args.batch,
                            steps=args.steps, warmup=args.warmup, bucket_cap_mb=args.bucket_cap_mb)  # fmt: skip
    print(format_zero_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
