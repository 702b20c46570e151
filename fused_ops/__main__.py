"""Command line: ``python -m fused_ops bench|info|report`` (also installed as ``fused-ops``).

- ``bench``: time every op against its torch baselines and installed peers (``fused_ops.bench``); a table on the
  terminal, optionally JSON and a PNG plot. Without a GPU it benchmarks the CPU path, and says so.
- ``info``: device, torch / triton versions and the backend ``auto`` picks.
- ``report``: rewrite the README's Performance section from the newest GPU results JSON in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import math
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
    """A non-empty comma list, each name once (an empty one would select nothing and run nothing; a name given
    twice would run its cases twice)."""
    values = list(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    if not values:
        raise argparse.ArgumentTypeError(f"empty list {value!r}")
    return values


def _int(value: str, least: int) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if n < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {n}")
    return n


def _positive_int(value: str) -> int:
    return _int(value, 1)


def _non_negative_int(value: str) -> int:
    return _int(value, 0)


def _positive_ints(value: str) -> list[int]:
    """A comma list of integers of at least 1, each once."""
    return list(dict.fromkeys(_positive_int(v) for v in _csv(value)))


def _float(value: str, positive: bool) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if math.isnan(x) or (positive and not (0 < x < math.inf)) or x < 0:
        raise argparse.ArgumentTypeError(f"must be {'a finite number > 0' if positive else '>= 0'}, got {value}")
    return x


def _positive_float(value: str) -> float:
    """A finite number > 0."""
    return _float(value, positive=True)


def _non_negative_float(value: str) -> float:
    """A number >= 0 (inf: no limit)."""
    return _float(value, positive=False)


def _output_error(option: str, path: str) -> str | None:
    """Why ``path`` cannot be written as an output file, or None, from what the path names (nothing is created
    here; a missing parent folder is created when the file is written, so it only has to be creatable). Permission
    bits say nothing for root: :func:`_probe_output` then tries for real."""
    if not path:
        return f"{option}: empty path"
    full = os.path.abspath(path)
    if os.path.isdir(full):
        return f"{option} {path}: is a directory"
    if os.path.lexists(full) and not os.path.isfile(full):
        return f"{option} {path}: exists and is not a regular file"
    if os.path.exists(full) and not os.access(full, os.W_OK):
        return f"{option} {path}: not writable"
    parent = os.path.dirname(full)
    while not os.path.exists(parent):  # the nearest existing folder above: it must be a writable folder
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{option} {path}: {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{option} {path}: cannot write in {parent}"
    if len(os.path.basename(full).encode()) > 255 - 16:  # (the JSON is written as <path>.tmp<pid> first)
        return f"{option} {path}: file name too long"
    return None


def _probe_output(option: str, path: str, *, via_tmp: bool) -> str | None:
    """Why ``path`` cannot be written, found by doing it: the missing folders are made, the file is created (or an
    existing one opened for appending, unchanged), then everything made here is removed again. ``via_tmp``: as
    ``write_json`` does it, ``<path>.tmp<pid>`` created and renamed onto a new ``path``. Run after every other check
    (a refused run leaves nothing behind) and before any work (a run whose results cannot be kept is not started)."""
    full = os.path.abspath(path)
    made_dirs: list[str] = []
    made_files: list[str] = []
    try:
        missing, parent = [], os.path.dirname(full)
        while not os.path.exists(parent):
            missing.append(parent)
            parent = os.path.dirname(parent)
        for folder in reversed(missing):
            os.mkdir(folder)
            made_dirs.append(folder)
        existed = os.path.exists(full)
        if via_tmp:
            tmp = f"{full}.tmp{os.getpid()}"
            tmp_existed = os.path.lexists(tmp)
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o666))
            if not tmp_existed:
                made_files.append(tmp)
            if not existed and not tmp_existed:
                os.replace(tmp, full)
                made_files[-1] = full
        if existed:
            with open(full, "ab"):  # writable, and neither truncated nor touched
                pass
        elif not via_tmp:
            os.close(os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            made_files.append(full)
    except OSError as e:
        return f"cannot write {option} {path}: {e.strerror or e} (checked before the run: nothing was run)"
    finally:
        for name in reversed(made_files):
            with contextlib.suppress(OSError):
                os.remove(name)
        for folder in reversed(made_dirs):
            with contextlib.suppress(OSError):
                os.rmdir(folder)
    return None


def _write_error(option: str, path: str, e: BaseException) -> str:
    """The message of an output that could not be written after the run."""
    return f"cannot write {option} {path}: {e.strerror if isinstance(e, OSError) and e.strerror else e}"


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
    b.add_argument("--quick", action="store_true",
                   help="smaller sizes and fewer repeats (the README's main job); --zero: 5 steps")  # fmt: skip
    b.add_argument("--ops", type=_csv, default=None,
                   help=f"comma list of {','.join(bench.OPS)} (default: all; on CPU all but "
                        f"{','.join(o for o, op in bench.OPS.items() if not op.cpu_default)})")  # fmt: skip
    b.add_argument(
        "--params",
        type=_csv,
        default=None,
        help=f"comma list of {','.join(bench.PARAM_SETS)} (default: {','.join(bench.DEFAULT_PARAMS)})",
    )
    b.add_argument("--dtype", type=_csv, default=None,
                   help=f"comma list of fp32,bf16 (default: {','.join(bench.DEFAULT_DTYPES)}; fp16: no op runs it "
                        "yet)")  # fmt: skip
    b.add_argument("--providers", type=_csv, default=None,
                   help=f"comma list of providers: only these (default: all); {','.join(bench.PROVIDERS)}, the "
                        "ops' own extra ones and installed peers")  # fmt: skip
    b.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: CUDA if present")
    b.add_argument(
        "--json",
        metavar="PATH",
        help="write every figure as JSON (its folder is created if missing; checked before the run)",
    )
    b.add_argument(
        "--plot",
        metavar="PATH",
        help="write a PNG of GB/s per op and provider (needs matplotlib; not with --zero/--dtensor)",
    )
    b.add_argument(
        "--rep-ms",
        type=_positive_float,
        default=None,
        help="time spent timing each provider (ms, > 0; default: by device and --quick)",
    )
    b.add_argument(
        "--copy-mb",
        type=_positive_int,
        default=None,
        help="size of the copy-bandwidth measurement (MiB, at least 1; default: by device and --quick)",
    )
    b.add_argument(
        "--budget-s",
        type=_non_negative_float,
        default=None,
        help="start no new provider after this many seconds (>= 0)",
    )
    b.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="CPU threads for torch, at least 1 (default: 1 on CPU, where more make a step's many small ops wait on "
        "each other; torch's choice on CUDA; 1 with --dtensor)",
    )
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--peers-on-cpu", action="store_true",
                   help="run the installed peers (torchao, bitsandbytes, optimi, ...) on CPU too: a dry run of their "
                        "providers before a GPU run; their CPU times compare nothing")  # fmt: skip
    b.add_argument(
        "--zero",
        action="store_true",
        help="instead: ZeroAdamW (stages 1, 2) vs DDP + torch.optim.AdamW on --nproc gloo processes (CPU)",
    )
    b.add_argument("--nproc", type=_positive_int, default=None, help="processes for --zero (default 2)")
    b.add_argument(
        "--dtensor",
        action="store_true",
        help="instead: ms per optimizer step on DTensor params (FSDP2 shards): FusedAdamW vs torch AdamW fused/foreach",
    )
    b.add_argument(
        "--dtensor-params",
        type=_positive_ints,
        default=None,
        help="comma list of param counts for --dtensor (default 1000,10000)",
    )
    b.add_argument("--steps", type=_positive_int, default=None, help="timed steps per case for --dtensor (default 10)")
    b.add_argument(
        "--warmup",
        type=_non_negative_int,
        default=None,
        help="untimed steps per case for --dtensor (default 2; 0 runs 1: the first step makes the states)",
    )
    b.add_argument(
        "--group-size", type=_positive_int, default=None, help="params per param group for --dtensor (default 1000)"
    )

    i = sub.add_parser("info", help="device, torch/triton versions, the backend auto picks")
    i.add_argument("--slug", action="store_true", help="print only the device as a file-name slug")

    r = sub.add_parser("report", help="regenerate the README's Performance section from benchmarks/results")
    r.add_argument(
        "--results", default=os.path.join("benchmarks", "results"), help="folder of results JSON (must exist)"
    )
    r.add_argument("--readme", default="README.md", help="the README to rewrite (must exist)")
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
    status = bench.peer_status(device.type)
    # (the family ops' own peers too: optimi, bitsandbytes' Lion; by module, as their builders name them)
    family = sorted({m for op in bench.OPS.values() for b in op.providers.values()
                     if (m := getattr(b, "peer_module", None)) is not None and m not in status})  # fmt: skip
    from .bench._registry import peers_run_on
    from .bench.cases._optim import installed

    for module in family:
        if not installed(module):
            status[module] = "not installed"
        elif not peers_run_on(device.type):
            status[module] = "installed; peers are benchmarked on CUDA only"
        else:
            status[module] = None
    peers = ", ".join(f"{name}: {why or 'found'}" for name, why in status.items())
    print(f"peers:   {peers}")
    return 0


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _check_bench(args: argparse.Namespace) -> str | None:
    """Why these ``bench`` arguments cannot run, or None: everything is checked before any work starts, the output
    files last, by creating them (and removing them again)."""
    why = _check_bench_args(args)
    if why:
        return why
    for option, via_tmp in (("--json", True), ("--plot", False)):
        path = getattr(args, option[2:])
        why = None if path is None else _probe_output(option, path, via_tmp=via_tmp)
        if why:
            return why
    return None


# The options that only some of bench's three modes read (the ops benchmark, --zero, --dtensor): given to another
# mode, each is an error rather than silently ignored. (--json and --device are read by all; --device cuda is refused
# for --zero, which runs gloo processes on the CPU.)
_MODE_OPTIONS = {
    "ops": ("--ops", ("ops",)),
    "params": ("--params", ("ops",)),
    "dtype": ("--dtype", ("ops",)),
    "providers": ("--providers", ("ops",)),
    "plot": ("--plot", ("ops",)),
    "rep_ms": ("--rep-ms", ("ops",)),
    "copy_mb": ("--copy-mb", ("ops",)),
    "budget_s": ("--budget-s", ("ops",)),
    "peers_on_cpu": ("--peers-on-cpu", ("ops",)),
    "threads": ("--threads", ("ops", "dtensor")),
    "no_progress": ("--no-progress", ("ops", "dtensor")),
    "quick": ("--quick", ("ops", "zero")),
    "nproc": ("--nproc", ("zero",)),
    "dtensor_params": ("--dtensor-params", ("dtensor",)),
    "steps": ("--steps", ("dtensor",)),
    "warmup": ("--warmup", ("dtensor",)),
    "group_size": ("--group-size", ("dtensor",)),
}
_MODE_NAMES = {"ops": "the ops benchmark", "zero": "--zero", "dtensor": "--dtensor"}
# The defaults of the options above whose parser default is None (so that "given" can be told from "left out").
_MODE_DEFAULTS = {"nproc": 2, "dtensor_params": [1000, 10000], "steps": 10, "warmup": 2, "group_size": 1000}


def _mode_error(args: argparse.Namespace) -> str | None:
    """Why an option given does not apply to the chosen mode, or None."""
    mode = "zero" if args.zero else "dtensor" if args.dtensor else "ops"
    for attr, (option, modes) in _MODE_OPTIONS.items():
        value = getattr(args, attr)
        if value is not None and value is not False and mode not in modes:
            return f"{option}: only for {' and '.join(_MODE_NAMES[m] for m in modes)}, not {_MODE_NAMES[mode]}"
    if args.zero and args.device == "cuda":
        return "--device cuda: --zero runs gloo processes on the CPU (for GPUs launch with torchrun + NCCL)"
    return None


def _fill_bench_defaults(args: argparse.Namespace) -> None:
    """The defaults of the options left out (their parser default is None: see ``_MODE_DEFAULTS``)."""
    from . import bench

    for attr, value in (*_MODE_DEFAULTS.items(), ("params", list(bench.DEFAULT_PARAMS)),
                        ("dtype", list(bench.DEFAULT_DTYPES))):  # fmt: skip
        if getattr(args, attr) is None:
            setattr(args, attr, list(value) if isinstance(value, list) else value)


def _default_ops(device) -> list[str]:
    """The ops a run without --ops runs: all of them on CUDA; on CPU those whose CPU path is not a slow oracle."""
    from . import bench

    return [o for o, op in bench.OPS.items() if device.type == "cuda" or op.cpu_default]


def _check_bench_args(args: argparse.Namespace) -> str | None:
    """Why these ``bench`` arguments cannot run, or None, from the arguments alone (nothing is created). Once the
    options given are known to fit the mode, the defaults of those left out are filled in."""
    from . import bench

    if args.zero and args.dtensor:
        return "--zero and --dtensor: choose one"
    why = _mode_error(args)
    if why:
        return why
    _fill_bench_defaults(args)
    for option in ("--json", "--plot"):
        path = getattr(args, option[2:])
        why = None if path is None else _output_error(option, path)
        if why:
            return why
    if args.json is not None and args.plot is not None and os.path.abspath(args.json) == os.path.abspath(args.plot):
        return f"--plot {args.plot}: the same file as --json"
    if args.zero:
        return None
    try:
        device = bench.pick_device(args.device)  # --device cuda without a GPU
    except RuntimeError as e:
        return str(e)
    if args.dtensor:
        return None
    for name, values, known in (("--ops", args.ops or [], bench.OPS), ("--params", args.params, bench.PARAM_SETS),
                                ("--dtype", args.dtype, bench.DTYPES)):  # fmt: skip
        unknown = [v for v in values if v not in known]
        if unknown:
            return f"{name}: unknown {', '.join(unknown)}; choose from {', '.join(known)}"
    # exactly the ops the run will run (_bench): on CPU without --ops, not those whose CPU path is a slow oracle
    names = args.ops or _default_ops(device)
    selected = [bench.OPS[o] for o in names]
    run_dtypes = list(dict.fromkeys(d for op in selected for d in op.dtypes))
    if not set(args.dtype).intersection(run_dtypes):  # e.g. fp16: every op would skip it and time nothing
        return f"--dtype: no selected op runs {', '.join(args.dtype)}; they run {', '.join(run_dtypes)}"
    if args.providers is not None:
        peers = [p.name for p in bench.PEERS]
        known = list(dict.fromkeys([*bench.PROVIDERS, *(p for op in bench.OPS.values() for p in op.providers),
                                    *peers]))  # fmt: skip
        unknown = [p for p in args.providers if p not in known]
        if unknown:
            return f"--providers: unknown {', '.join(unknown)}; choose from {', '.join(known)}"

        def providers_of(ops) -> set[str]:
            return {p for op in ops for p in (*op.providers, *(peers if op.peers else ()))}

        idle = [p for p in args.providers if p not in providers_of(selected)]  # asked for, would never run
        if idle:
            left_out = [o for o, op in bench.OPS.items() if o not in names and providers_of([op]) & set(idle)]
            if args.ops is None and left_out:
                them = "it" if len(idle) == 1 else "them"
                return (f"--providers {', '.join(idle)}: only ops not run on CPU by default have {them} "
                        f"({', '.join(left_out)}); name them with --ops")  # fmt: skip
            return (f"--providers: {', '.join(idle)}: no provider of the selected ops "
                    f"({', '.join(op.name for op in selected)})")  # fmt: skip
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return "--plot needs matplotlib (pip install matplotlib)"
    return None


def _bench_zero(args: argparse.Namespace) -> int:
    from .bench import format_zero_report, write_json
    from .distributed import benchmark_zero

    print(f"ZeRO on CPU: {args.nproc} gloo processes on this machine (for GPUs launch with torchrun + NCCL)")
    result = benchmark_zero(nproc=args.nproc, steps=5 if args.quick else 10)
    print(format_zero_report(result))
    return _write_result_json(write_json, result, args.json)


def _write_result_json(write_json, result: dict, path: str | None) -> int:
    """After the report is printed: write the JSON, or say why it could not be (exit 1, no traceback)."""
    if path:
        try:
            write_json(result, path)
        except OSError as e:
            print(f"error: {_write_error('--json', path, e)}", file=sys.stderr)
            return 1
        print(f"wrote {path}")
    return 0


def _bench_dtensor(args: argparse.Namespace) -> int:
    import torch

    from .bench import write_json
    from .bench_dtensor import benchmark_dtensor_host, format_dtensor_report

    # One thread by default on CPU: with two, each of the step's many small ops waits on the other thread and the
    # medians swing by 40x on a busy machine (--threads overrides).
    torch.set_num_threads(args.threads or 1)
    device = None if args.device == "auto" else args.device
    progress = False if args.no_progress else None
    result = benchmark_dtensor_host(args.dtensor_params, steps=args.steps, device=device, warmup=args.warmup,
                                    group_size=args.group_size, progress=progress)  # fmt: skip
    print(format_dtensor_report(result))
    return _write_result_json(write_json, result, args.json)


def _bench(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from . import bench

    why = _check_bench(args)
    if why:
        return _error(why)
    if args.zero:
        return _bench_zero(args)
    if args.dtensor:
        return _bench_dtensor(args)

    device = bench.pick_device(args.device)
    if device.type != "cuda":
        print("No GPU found: benchmarking the CPU path against torch's CPU implementations (labelled CPU).")
    ops = args.ops
    if ops is None:
        ops = _default_ops(device)
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
    # A file that cannot be written after all (a full disk, a folder removed during the run) does not lose the
    # figures: the table is printed whatever happens, then each failure as an error, exit 1.
    old = None
    with contextlib.suppress(ValueError):  # not the main thread
        old = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    errors: list[str] = []
    try:
        json_written = False
        if args.json:
            try:
                bench.write_json(doc, args.json)
                json_written = True
            except OSError as e:
                errors.append(_write_error("--json", args.json, e))
        print(bench.format_table(doc))
        if json_written:
            print(f"wrote {args.json}")
        if args.plot:
            try:
                bench.write_plot(doc, args.plot)
            except OSError as e:
                errors.append(_write_error("--plot", args.plot, e))
            except Exception as e:  # a plotting failure must not hide the JSON and the table
                errors.append(f"--plot {args.plot}: {type(e).__name__}: {e}")
            else:
                print(f"wrote {args.plot}")
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    print(f"bench took {doc['wall_s']:.1f} s" + (f" ({doc['stopped']})" if doc.get("stopped") else ""))
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    if errors:
        return 1
    return 130 if doc.get("stopped") == "interrupted" else 0


def _report(args: argparse.Namespace) -> int:
    from . import bench

    if not os.path.exists(args.readme):
        return _error(f"--readme {args.readme}: not found")
    if not os.path.isfile(args.readme):
        return _error(f"--readme {args.readme}: not a regular file")
    if not args.check and not os.access(args.readme, os.W_OK):
        return _error(f"--readme {args.readme}: not writable")
    if not os.path.isdir(args.results):
        return _error(f"--results {args.results}: {'not a directory' if os.path.exists(args.results) else 'not found'}")
    try:
        new, source, changed = bench.update_readme(args.readme, args.results)
    except bench.ReadmeMarkersError as e:
        return _error(f"--readme {args.readme}: {e}")
    except (OSError, UnicodeDecodeError) as e:
        return _error(f"--readme {args.readme}: cannot read: {e}")
    if args.check:
        print(f"{args.readme}: {'out of date' if changed else 'up to date'} ({source})")
        return 1 if changed else 0
    if changed:
        try:
            with open(args.readme, "w", encoding="utf-8") as f:
                f.write(new)
        except OSError as e:
            return _error(f"cannot write --readme {args.readme}: {e.strerror or e}")
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
