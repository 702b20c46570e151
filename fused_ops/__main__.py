"""Command line: ``python -m fused_ops bench|info|report`` (also installed as ``fused-ops``).

- ``bench``: time every op against its torch baselines and installed peers (``fused_ops.bench``); a table on the
  terminal, optionally JSON and a PNG plot. Without a GPU it benchmarks the CPU path, and says so.
- ``info``: device, torch / triton versions and the backend ``auto`` picks.
- ``report``: rewrite the README's Performance section from the newest GPU results JSON in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import signal
import sys
from collections.abc import Sequence

_EPILOG_BENCH = """examples:
  python -m fused_ops bench --quick
  python -m fused_ops bench --ops adam --params gpt2-124m --dtype bf16 --json out.json --plot out.png
"""


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _parser() -> argparse.ArgumentParser:
    from . import bench

    parser = argparse.ArgumentParser(prog="python -m fused_ops", description="fused_ops command line")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser(
        "bench",
        help="benchmark fused_ops against torch (and installed peers)",
        epilog=_EPILOG_BENCH,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (the README's main job)")
    b.add_argument("--ops", type=_csv, default=None,
                   help=f"comma list of {','.join(bench.OPS)} (default: all; on CPU all but "
                        f"{','.join(o for o, op in bench.OPS.items() if not op.cpu_default)})")  # fmt: skip
    b.add_argument(
        "--params", type=_csv, default=list(bench.DEFAULT_PARAMS), help=f"comma list of {','.join(bench.PARAM_SETS)}"
    )
    b.add_argument("--dtype", type=_csv, default=list(bench.DEFAULT_DTYPES), help="comma list of fp32,bf16,fp16")
    b.add_argument("--providers", type=_csv, default=None, help="only these providers (default: all)")
    b.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: CUDA if present")
    b.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    b.add_argument("--plot", metavar="PATH", help="write a PNG of GB/s per op and provider (needs matplotlib)")
    b.add_argument("--rep-ms", type=float, default=None, help="time spent timing each provider (ms)")
    b.add_argument("--copy-mb", type=int, default=None, help="size of the copy-bandwidth measurement (MiB)")
    b.add_argument("--budget-s", type=float, default=None, help="start no new provider after this many seconds")
    b.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--peers-on-cpu", action="store_true",
                   help="run the installed peers (torchao, bitsandbytes, optimi, ...) on CPU too: a dry run of their "
                        "providers before a GPU run; their CPU times compare nothing")  # fmt: skip
    b.add_argument(
        "--zero",
        action="store_true",
        help="instead: ZeroAdamW (stages 1, 2) vs DDP + torch.optim.AdamW on --nproc gloo processes (CPU)",
    )
    b.add_argument("--nproc", type=int, default=2, help="processes for --zero (default 2)")
    b.add_argument(
        "--dtensor",
        action="store_true",
        help="instead: ms per optimizer step on DTensor params (FSDP2 shards): FusedAdamW vs torch AdamW fused/foreach",
    )
    b.add_argument("--dtensor-params", type=_csv, default=["1000", "10000"], help="param counts for --dtensor")
    b.add_argument("--steps", type=int, default=10, help="timed steps per case for --dtensor (default 10)")
    b.add_argument("--warmup", type=int, default=2, help="untimed steps per case for --dtensor (default 2)")
    b.add_argument("--group-size", type=int, default=1000, help="params per param group for --dtensor (default 1000)")

    i = sub.add_parser("info", help="device, torch/triton versions, the backend auto picks")
    i.add_argument("--slug", action="store_true", help="print only the device as a file-name slug")

    r = sub.add_parser("report", help="regenerate the README's Performance section from benchmarks/results")
    r.add_argument("--results", default=os.path.join("benchmarks", "results"), help="folder of results JSON")
    r.add_argument("--readme", default="README.md", help="the README to rewrite")
    r.add_argument("--check", action="store_true", help="change nothing; exit 1 if the README is out of date")
    return parser


def _info(args: argparse.Namespace) -> int:
    import torch

    import fused_ops

    from . import bench
    from ._backend import default_backend, interpreter_enabled, triton_available

    device = bench.pick_device()
    if args.slug:
        print(bench.device_slug(device))
        return 0
    print(f"fused_ops {getattr(fused_ops, '__version__', '?')}  (python {platform.python_version()})")
    if device.type == "cuda":
        print(f"device:  {bench.device_label(device)} ({device}), CUDA {torch.version.cuda}")
    else:
        print(f"device:  {bench.device_label(device)}; no GPU found")
    print(f"torch:   {torch.__version__}")
    print(f"triton:  {bench.triton_version() or 'not installed'}" + ("" if triton_available() else " (import fails)"))
    picked = fused_ops.resolve_backend(None, device)
    what = "Triton kernels" if picked == "triton" else "plain-torch path (fused_ops/reference.py)"
    print(f"backend: {default_backend()} -> {picked} on {device.type} tensors: {what}")
    if os.environ.get("FUSED_OPS_BACKEND"):
        print(f"         (FUSED_OPS_BACKEND={os.environ['FUSED_OPS_BACKEND']})")
    if interpreter_enabled():
        print("         (TRITON_INTERPRET=1: Triton kernels run on CPU tensors in the interpreter)")
    ops = ", ".join(f"{name}{'' if op.unavailable() is None else ' (not yet)'}" for name, op in bench.OPS.items())
    print(f"ops:     {ops}")
    peers = ", ".join(f"{name}: {why or 'found'}" for name, why in bench.peer_status(device.type).items())
    print(f"peers:   {peers}")
    return 0


def _bench_zero(args: argparse.Namespace) -> int:
    from .bench import format_zero_report
    from .distributed import benchmark_zero

    if args.nproc < 1:
        print("error: --nproc must be at least 1", file=sys.stderr)
        return 2
    print(f"ZeRO on CPU: {args.nproc} gloo processes on this machine (for GPUs launch with torchrun + NCCL)")
    result = benchmark_zero(nproc=args.nproc, steps=5 if args.quick else 10)
    print(format_zero_report(result))
    if args.json:
        import json

        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def _bench_dtensor(args: argparse.Namespace) -> int:
    import json

    import torch

    from .bench_dtensor import benchmark_dtensor_host, format_dtensor_report

    # One thread by default on CPU: with two, each of the step's many small ops waits on the other thread and the
    # medians swing by 40x on a busy machine (--threads overrides).
    torch.set_num_threads(args.threads or 1)
    device = None if args.device == "auto" else args.device
    result = benchmark_dtensor_host([int(n) for n in args.dtensor_params], steps=args.steps, device=device,
                                    warmup=args.warmup, group_size=args.group_size,
                                    progress=False if args.no_progress else None)  # fmt: skip
    print(format_dtensor_report(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def _bench(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from . import bench

    if args.zero:
        return _bench_zero(args)
    if args.dtensor:
        return _bench_dtensor(args)

    for name, values, known in (("--ops", args.ops or [], bench.OPS), ("--params", args.params, bench.PARAM_SETS),
                                ("--dtype", args.dtype, bench.DTYPES)):  # fmt: skip
        unknown = [v for v in values if v not in known]
        if unknown:
            print(f"error: {name}: unknown {', '.join(unknown)}; choose from {', '.join(known)}", file=sys.stderr)
            return 2
    if args.plot:  # fail before the run, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("error: --plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
            return 2
    try:
        device = bench.pick_device(args.device)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if device.type != "cuda":
        print("No GPU found: benchmarking the CPU path against torch's CPU implementations (labelled CPU).")
    ops = args.ops
    if ops is None:
        ops = [o for o, op in bench.OPS.items() if device.type == "cuda" or op.cpu_default]
        left = [o for o in bench.OPS if o not in ops]
        if left:
            print(f"Not run on CPU unless --ops names them: {', '.join(left)} (their CPU path is a slow oracle).")
    config = bench.BenchConfig(
        ops=ops,
        params=args.params,
        dtypes=args.dtype,
        providers=args.providers,
        device=args.device,
        quick=args.quick,
        rep_ms=args.rep_ms,
        copy_mb=args.copy_mb,
        budget_s=args.budget_s,
        progress=not args.no_progress,
        threads=args.threads,
        peers_on_cpu=args.peers_on_cpu,
        command="python -m fused_ops " + " ".join(shlex.quote(a) for a in argv),
        checkpoint=(lambda doc: bench.write_json(doc, args.json)) if args.json else None,
    )
    doc = bench.run(config)
    # run() has put SIGTERM back: ignore a late one (`timeout` sends one, then SIGKILL after -k) while the results
    # are written, the JSON first
    old = None
    with contextlib.suppress(ValueError):  # not the main thread
        old = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        if args.json:
            bench.write_json(doc, args.json)
        print(bench.format_table(doc))
        if args.json:
            print(f"wrote {args.json}")
        if args.plot:
            try:
                bench.write_plot(doc, args.plot)
            except Exception as e:  # the JSON is written; a plotting failure must not hide it
                print(f"error: --plot {args.plot}: {type(e).__name__}: {e}", file=sys.stderr)
                return 1
            print(f"wrote {args.plot}")
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    print(f"bench took {doc['wall_s']:.1f} s" + (f" ({doc['stopped']})" if doc.get("stopped") else ""))
    return 130 if doc.get("stopped") == "interrupted" else 0


def _report(args: argparse.Namespace) -> int:
    from . import bench

    if not os.path.exists(args.readme):
        print(f"error: {args.readme} not found", file=sys.stderr)
        return 2
    new, source, changed = bench.update_readme(args.readme, args.results)
    if args.check:
        print(f"{args.readme}: {'out of date' if changed else 'up to date'} ({source})")
        return 1 if changed else 0
    if changed:
        with open(args.readme, "w", encoding="utf-8") as f:
            f.write(new)
    print(f"{args.readme}: Performance section {'rewritten' if changed else 'unchanged'} from {source}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m fused_ops`` and the ``fused-ops`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.command == "info":
        return _info(args)
    if args.command == "bench":
        return _bench(args, argv)
    return _report(args)


if __name__ == "__main__":
    sys.exit(main())
