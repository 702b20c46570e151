"""The command line: ``python -m fused_ops info|bench|report`` (fast: tiny sets, short timings, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import fused_ops
from fused_ops import bench
from fused_ops.__main__ import main

RESULT_FIELDS = {
    "op", "params", "dtype", "provider", "median_ms", "p20_ms", "p80_ms", "bytes", "gbps", "frac_of_copy",
    "speedup_vs_torch_fused", "host_ms", "launches",
}  # fmt: skip
FAST = ["--quick", "--params", "tiny", "--rep-ms", "5", "--copy-mb", "4", "--no-progress", "--device", "cpu"]


def test_info_prints_device_versions_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "device:" in out and ("no GPU found" in out or torch.cuda.is_available())
    assert f"torch:   {torch.__version__}" in out
    assert "triton:" in out and (bench.triton_version() or "not installed") in out
    expected = fused_ops.resolve_backend(None, bench.pick_device())
    assert f"-> {expected}" in out
    peers = next(line for line in out.splitlines() if line.startswith("peers:"))
    assert "torchao:" in peers and "optimi:" in peers  # (the family's peers too: probe 86)


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "fused_ops", "info", "--slug"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == bench.device_slug()


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """One quick CPU run of every op on the tiny set, with JSON and plot (shared by the checks below)."""
    out = tmp_path_factory.mktemp("bench")
    js, png = out / "bench.json", out / "bench.png"
    code = main(["bench", *FAST, "--json", str(js), "--plot", str(png)])
    return code, json.loads(js.read_text()), png


def test_bench_cpu_writes_json(cpu_run):
    code, doc, _ = cpu_run
    assert code == 0
    assert doc["device_kind"] == "cpu" and doc["device"].startswith("CPU") and doc["label"] == "CPU"
    assert doc["torch"] == torch.__version__ and doc["triton"] == bench.triton_version()
    assert doc["date"][:4].isdigit() and "T" in doc["date"]
    assert doc["copy_bandwidth_gbps"] > 0
    assert doc["results"], doc["skipped"]
    for r in doc["results"]:
        assert RESULT_FIELDS <= set(r), r
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["bytes"] > 0 and r["gbps"] == pytest.approx(r["bytes"] / r["median_ms"] / 1e6)
        assert r["frac_of_copy"] == pytest.approx(r["gbps"] / doc["copy_bandwidth_gbps"])
        assert r["host_ms"] is None and r["launches"] is None  # n/a on CPU
    providers = {(r["op"], r["dtype"], r["provider"]) for r in doc["results"]}
    for dtype in ("fp32", "bf16"):
        for provider in bench.PROVIDERS:
            assert ("adam", dtype, provider) in providers
    fused = next(r for r in doc["results"] if (r["op"], r["dtype"], r["provider"]) == ("adam", "fp32", "torch-fused"))
    assert fused["speedup_vs_torch_fused"] == pytest.approx(1.0)
    adam_fp32 = next(r for r in doc["results"] if (r["op"], r["dtype"], r["provider"]) == ("adam", "fp32", "fused_ops"))
    assert adam_fp32["bytes"] == 28 * adam_fp32["n_params"]
    adam_bf16 = next(r for r in doc["results"] if (r["op"], r["dtype"], r["provider"]) == ("adam", "bf16", "fused_ops"))
    assert adam_bf16["bytes"] == 22 * adam_bf16["n_params"]  # fp32 states


def test_bench_skips_are_explained(cpu_run):
    _, doc, _ = cpu_run
    assert all(s.get("why") for s in doc["skipped"])
    for name, op in bench.OPS.items():
        if op.unavailable() is not None:
            assert any(s.get("op") == name and "not in this version" in s["why"] for s in doc["skipped"])
    for peer, why in bench.peer_status("cpu").items():
        assert {"provider": peer, "why": why} in doc["skipped"]


def test_bench_writes_png(cpu_run):
    _, _, png = cpu_run
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_table_on_terminal(capsys, tmp_path):
    assert main(["bench", *FAST, "--ops", "adam", "--dtype", "fp32", "--providers", "fused_ops,torch-fused"]) == 0
    out = capsys.readouterr().out
    assert "No GPU found" in out and "[CPU]" in out
    assert "copy bandwidth (CPU" in out
    assert "fused_ops" in out and "torch-fused" in out and "GB/s" in out


def test_bench_rejects_unknown_names(capsys):
    assert main(["bench", "--ops", "adam,nope"]) == 2
    assert "unknown nope" in capsys.readouterr().err


# --- bad arguments: `error:` and exit 2 before any work -----------------------------------------------------------

_NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")

# (command line, the option its error must name); paths are relative to a scratch folder holding `afile` (a regular
# file), `adir/` (a folder) and `README.md`
BAD_ARGS = [
    (["report", "--check", "--readme", "adir"], "--readme"),
    (["report", "--check", "--readme", "nosuch.md"], "--readme"),
    (["report", "--check", "--results", "nonexistent_dir"], "--results"),
    (["report", "--results", "afile"], "--results"),
    (["bench", "--dtensor", "--dtensor-params", "abc"], "--dtensor-params"),
    (["bench", "--dtensor", "--dtensor-params", "1e3"], "--dtensor-params"),
    (["bench", "--dtensor", "--dtensor-params", "0"], "--dtensor-params"),
    (["bench", "--dtensor", "--dtensor-params", "10,-5"], "--dtensor-params"),
    (["bench", "--dtensor", "--dtensor-params", ""], "--dtensor-params"),
    (["bench", "--dtensor", "--steps", "0"], "--steps"),
    (["bench", "--dtensor", "--group-size", "0"], "--group-size"),
    (["bench", "--dtensor", "--warmup", "-1"], "--warmup"),
    pytest.param(["bench", "--dtensor", "--device", "cuda"], "--device", marks=_NO_GPU),
    pytest.param(["bench", "--device", "cuda"], "--device", marks=_NO_GPU),
    (["bench", "--dtensor", "--threads", "-1"], "--threads"),
    (["bench", "--ops", "cast", "--threads", "-2"], "--threads"),
    (["bench", "--threads", "0"], "--threads"),
    (["bench", "--ops", "cast", "--json", "afile/x.json"], "--json"),
    (["bench", "--ops", "cast", "--json", "afile/new/x.json"], "--json"),
    (["bench", "--ops", "cast", "--json", "adir"], "--json"),
    (["bench", "--ops", "cast", "--json", ""], "--json"),
    (["bench", "--ops", "cast", "--plot", "afile/x.png"], "--plot"),
    (["bench", "--ops", "cast", "--json", "out/x.json", "--plot", "out/x.json"], "--plot"),
    (["bench", "--dtensor", "--json", "afile/x.json"], "--json"),
    (["bench", "--dtensor", "--plot", "out/x.png"], "--plot"),
    (["bench", "--zero", "--json", "afile/x.json"], "--json"),
    (["bench", "--zero", "--nproc", "0"], "--nproc"),
    (["bench", "--zero", "--dtensor"], "--zero"),
    (["bench", "--providers", "nosuch"], "--providers"),
    (["bench", "--ops", "adam", "--providers", "optimi"], "--providers"),
    (["bench", "--ops", ""], "--ops"),
    (["bench", "--ops", ","], "--ops"),
    (["bench", "--params", ""], "--params"),
    (["bench", "--dtype", ""], "--dtype"),
    (["bench", "--dtype", "fp16"], "--dtype"),  # known, but no op runs it: it would time nothing and exit 0
    (["bench", "--ops", "adam", "--dtype", "fp16"], "--dtype"),
    (["bench", "--providers", ""], "--providers"),
    (["bench", "--rep-ms", "-1"], "--rep-ms"),
    (["bench", "--rep-ms", "0"], "--rep-ms"),
    (["bench", "--rep-ms", "nan"], "--rep-ms"),
    (["bench", "--rep-ms", "inf"], "--rep-ms"),
    (["bench", "--copy-mb", "-1"], "--copy-mb"),
    (["bench", "--copy-mb", "0"], "--copy-mb"),
    (["bench", "--budget-s", "-1"], "--budget-s"),
    (["bench", "--budget-s", "nan"], "--budget-s"),
    (["bench", "--ops", "adam,nope", "--json", "out/x.json"], "--ops"),
    (["bench", "--json", "out/x.json", "--rep-ms", "-1"], "--rep-ms"),  # out/ must not be made for a refused run
    # a provider that no op of the run has would never run (on CPU without --ops: the ops left out there have it)
    (["bench", "--device", "cpu", "--providers", "fused_ops-kahan"], "--providers"),
    (["bench", "--device", "cpu", "--providers", "fused_ops,fused_ops-bf16-states"], "--providers"),
    (["bench", "--ops", "adam", "--providers", "fused_ops,optimi"], "--providers"),
    # options of one mode given to another: errors, not silently ignored
    (["bench", "--dtensor", "--ops", "no_such_op"], "--ops"),
    (["bench", "--zero", "--dtype", "fp64"], "--dtype"),
    (["bench", "--dtensor", "--params", "nope"], "--params"),
    (["bench", "--zero", "--providers", "fused_ops"], "--providers"),
    (["bench", "--zero", "--rep-ms", "5"], "--rep-ms"),
    (["bench", "--dtensor", "--peers-on-cpu"], "--peers-on-cpu"),
    (["bench", "--dtensor", "--quick"], "--quick"),
    (["bench", "--zero", "--threads", "2"], "--threads"),
    (["bench", "--zero", "--device", "cuda"], "--device"),
    (["bench", "--ops", "adam", "--nproc", "7"], "--nproc"),
    (["bench", "--ops", "adam", "--steps", "3"], "--steps"),
    (["bench", "--zero", "--warmup", "1"], "--warmup"),
    (["bench", "--group-size", "10"], "--group-size"),
    (["bench", "--zero", "--dtensor-params", "10"], "--dtensor-params"),
]


def _scratch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    (tmp_path / "adir").mkdir()
    (tmp_path / "README.md").write_text("# proj\n")
    return tmp_path


def _tree(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, n), root) for d, dirs, files in os.walk(root) for n in dirs + files}


def _no_work(monkeypatch):
    """Every entry into real work fails the test: the errors must come before any of it."""

    def work(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    import fused_ops.bench_dtensor
    import fused_ops.distributed

    monkeypatch.setattr(bench, "run", work)
    monkeypatch.setattr(bench, "update_readme", work)
    monkeypatch.setattr(fused_ops.bench_dtensor, "benchmark_dtensor_host", work)
    monkeypatch.setattr(fused_ops.distributed, "benchmark_zero", work)
    monkeypatch.setattr(torch, "set_num_threads", work)


def _exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors (type= checks) exit
        return e.code


@pytest.mark.parametrize("argv, option", BAD_ARGS, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_bad_arguments_are_errors_before_any_work(argv, option, tmp_path, monkeypatch, capsys):
    root = _scratch(tmp_path, monkeypatch)
    before = _tree(root)
    _no_work(monkeypatch)
    assert _exit_code(argv) == 2
    out, err = capsys.readouterr()
    line = err.strip().splitlines()[-1]
    assert "error:" in line and option in line, err
    assert "Traceback" not in out + err
    assert _tree(root) == before  # no output file or folder made


def test_edge_values_that_mean_something_are_accepted(tmp_path, monkeypatch, capsys):
    """--warmup 0 (one untimed step still runs: it makes the states), --budget-s 0, a --json whose folder is
    still to be made (it is made when the file is written, not before the run)."""
    import fused_ops.bench_dtensor

    monkeypatch.chdir(tmp_path)
    seen = {}

    def fake_dtensor(n_params, **kwargs):
        seen.update(n_params=n_params, **kwargs)
        return {"cases": []}

    monkeypatch.setattr(fused_ops.bench_dtensor, "benchmark_dtensor_host", fake_dtensor)
    monkeypatch.setattr(fused_ops.bench_dtensor, "format_dtensor_report", lambda result: "report")
    monkeypatch.setattr(torch, "set_num_threads", lambda n: seen.update(threads=n))
    argv = ["bench", "--dtensor", "--device", "cpu", "--dtensor-params", "20, 30", "--warmup", "0", "--steps", "1",
            "--json", "new/sub/d.json"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert seen["n_params"] == [20, 30] and seen["warmup"] == 0 and seen["steps"] == 1 and seen["threads"] == 1
    assert json.loads((tmp_path / "new" / "sub" / "d.json").read_text()) == {"cases": []}

    runs = []
    monkeypatch.setattr(bench, "run", lambda config: runs.append(config) or {"results": [], "wall_s": 0.0})
    monkeypatch.setattr(bench, "format_table", lambda doc: "table")
    assert main(["bench", "--device", "cpu", "--budget-s", "0", "--rep-ms", "0.5", "--providers", "fused_ops"]) == 0
    assert runs[0].budget_s == 0.0 and runs[0].rep_ms == 0.5 and runs[0].providers == ["fused_ops"]


def test_providers_of_ops_left_out_on_cpu(capsys):
    """On CPU without --ops, the slow-oracle ops are left out: a provider only they have is refused with what to
    do (it would run nothing and exit 0), and accepted once --ops names its op."""
    from fused_ops.__main__ import _check_bench_args, _parser

    def check(*argv):
        return _check_bench_args(_parser().parse_args(["bench", "--device", "cpu", *argv]))

    assert check("--providers", "fused_ops-kahan") == (
        "--providers fused_ops-kahan: only ops not run on CPU by default have it (adamw_bf16_sr); name them with --ops"
    )
    assert check("--ops", "adamw_bf16_sr", "--providers", "fused_ops-kahan") is None
    assert check("--providers", "fused_ops,torch-fused") is None


def test_lists_name_each_once():
    from fused_ops.__main__ import _csv, _positive_ints

    assert _csv("flatten, adam,flatten,,adam") == ["flatten", "adam"]
    assert _positive_ints("20,30,20") == [20, 30]


def test_mode_options_left_out_take_their_defaults(monkeypatch, capsys):
    """--nproc/--steps/--warmup/--group-size/--dtensor-params/--params/--dtype have no parser default (so that
    one given to the wrong mode can be told from one left out): left out, each gets its documented default."""
    import fused_ops.bench_dtensor
    import fused_ops.distributed

    seen = {}
    monkeypatch.setattr(fused_ops.distributed, "benchmark_zero", lambda **kw: seen.update(zero=kw) or {"zero": 1})
    monkeypatch.setattr(bench, "format_zero_report", lambda result: "ZERO REPORT")
    assert main(["bench", "--zero"]) == 0 and seen["zero"] == {"nproc": 2, "steps": 10}
    assert main(["bench", "--zero", "--quick", "--nproc", "3"]) == 0 and seen["zero"] == {"nproc": 3, "steps": 5}

    def fake_dtensor(n_params, **kwargs):
        seen.update(dtensor=(n_params, kwargs))
        return {"cases": []}

    monkeypatch.setattr(fused_ops.bench_dtensor, "benchmark_dtensor_host", fake_dtensor)
    monkeypatch.setattr(fused_ops.bench_dtensor, "format_dtensor_report", lambda result: "report")
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    assert main(["bench", "--dtensor", "--device", "cpu"]) == 0
    n_params, kwargs = seen["dtensor"]
    assert n_params == [1000, 10000] and (kwargs["steps"], kwargs["warmup"], kwargs["group_size"]) == (10, 2, 1000)
    runs = []
    monkeypatch.setattr(bench, "run", lambda config: runs.append(config) or {"results": [], "wall_s": 0.0})
    monkeypatch.setattr(bench, "format_table", lambda doc: "table")
    assert main(["bench", "--device", "cpu", "--ops", "cast"]) == 0
    assert list(runs[0].params) == list(bench.DEFAULT_PARAMS) and list(runs[0].dtypes) == list(bench.DEFAULT_DTYPES)


ZERO_BAD = [({"nproc": 0}, "nproc"), ({"steps": 0}, "steps"), ({"hidden": 0}, "hidden"), ({"layers": 0}, "layers"),
            ({"batch": 0}, "batch"), ({"warmup": -1}, "warmup"), ({"nproc": 1.5}, "nproc"), ({"stages": ()}, "stages"),
            ({"stages": (3,)}, "stages"), ({"bucket_cap_mb": 0}, "bucket_cap_mb"),
            ({"timeout_s": float("nan")}, "timeout_s")]  # fmt: skip


@pytest.mark.parametrize("kwargs, name", ZERO_BAD)
def test_benchmark_zero_refuses_bad_arguments_before_spawning(monkeypatch, kwargs, name):
    """A ValueError naming the argument, not an IndexError or a worker's StatisticsError traceback."""
    import torch.multiprocessing

    from fused_ops.distributed import benchmark_zero

    monkeypatch.setattr(torch.multiprocessing, "start_processes", lambda *a, **k: pytest.fail("spawned"))
    with pytest.raises(ValueError, match=f"benchmark_zero: {name} must be"):
        benchmark_zero(**kwargs)


def _script(name: str):
    """A script of benchmarks/ as a module (its main() not run)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv, option", [(["--nproc", "0"], "--nproc"), (["--steps", "0"], "--steps"),
                                          (["--warmup", "-1"], "--warmup"), (["--hidden", "0"], "--hidden"),
                                          (["--layers", "0"], "--layers"), (["--batch", "0"], "--batch"),
                                          (["--bucket-cap-mb", "0"], "--bucket-cap-mb")])  # fmt: skip
def test_zero_bench_script_checks_its_options(argv, option, monkeypatch, capsys):
    zero_bench = _script("zero_bench")
    monkeypatch.setattr(zero_bench, "benchmark_zero", lambda **kw: pytest.fail("ran"))
    with pytest.raises(SystemExit) as e:
        zero_bench.main(argv)
    assert e.value.code == 2 and f"argument {option}:" in capsys.readouterr().err


def test_host_overhead_script_runs_on_one_thread_unless_asked(monkeypatch, capsys):
    """With two threads on a busy machine its medians swung 15-fold and more (OpenMP threads waiting on each
    other at every small op): one by default, --threads N otherwise."""
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))  # (the script sets it)
    host_overhead = _script("host_overhead")
    threads = []
    monkeypatch.setattr(host_overhead, "measure", lambda n, steps: {"case": 1.0})
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    assert host_overhead.main([]) == 0 and threads == [1]
    assert host_overhead.main(["--threads", "2"]) == 0 and threads == [1, 2]
    assert "2 threads" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        host_overhead.main(["--threads", "0"])
    assert "argument --threads:" in capsys.readouterr().err


def test_readme_bench_usage_lists_every_op():
    import pathlib
    import re

    readme = pathlib.Path(__file__).resolve().parent.parent / "README.md"
    if not readme.exists():
        pytest.skip("no README.md next to the tests (not a source checkout)")
    usage = re.search(r"python -m fused_ops bench \[--quick\] \[--ops ([a-z0-9_,]+)\]", readme.read_text())
    assert usage is not None and usage.group(1).split(",") == list(bench.OPS)


def _unwritable_folder(tmp_path) -> str:
    """A folder where this process cannot create files even though ``os.access`` (patched by the tests, as it is
    for root) says it can: a read-only folder, or for root, who writes there anyway, /proc."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        if not os.path.isdir("/proc/self"):
            pytest.skip("running as root without /proc: no folder refuses new files")
        return "/proc"
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    return str(folder)


UNWRITABLE_OUTPUTS = [
    (["bench", "--ops", "cast", "--json", "{ro}/x.json"], "--json"),
    (["bench", "--ops", "cast", "--json", "{ro}/new/sub/x.json"], "--json"),
    (["bench", "--ops", "cast", "--plot", "{ro}/x.png"], "--plot"),
    (["bench", "--ops", "cast", "--json", "ok.json", "--plot", "{ro}/x.png"], "--plot"),
    (["bench", "--dtensor", "--json", "{ro}/x.json"], "--json"),
    (["bench", "--zero", "--json", "{ro}/x.json"], "--json"),
]


@pytest.mark.parametrize("argv, option", UNWRITABLE_OUTPUTS, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_unwritable_output_refused_before_the_run(argv, option, tmp_path, monkeypatch, capsys):
    """Permission bits are no test (root passes ``os.access`` everywhere, and it is patched so here): the output
    files are created before the run, and a path that cannot be is refused then, not after the whole run."""
    ro = _unwritable_folder(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: True)
    _no_work(monkeypatch)
    before = _tree(tmp_path)
    try:
        assert _exit_code([a.format(ro=ro) for a in argv]) == 2
    finally:
        if ro != "/proc":
            os.chmod(ro, 0o755)
    out, err = capsys.readouterr()
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: cannot write {option} ") and "nothing was run" in line, err
    assert "Traceback" not in out + err
    assert _tree(tmp_path) == before  # the probe of ok.json and of the folders it made left nothing behind


def test_output_probe_leaves_nothing_before_the_run(tmp_path, monkeypatch, capsys):
    """The outputs are tried before the run, then removed (a new file, its new folders) or left as they were (an
    existing file): the run starts on the same tree as before."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "old.json").write_text("old\n")
    os.utime(tmp_path / "old.json", (1_000_000, 1_000_000))
    seen = []

    def fake_run(config):
        seen.append((_tree(tmp_path), (tmp_path / "old.json").read_text(), (tmp_path / "old.json").stat().st_mtime))
        return {**_fake_gpu_result("2026-03-01T00:00:00+00:00"), "wall_s": 0.0}

    monkeypatch.setattr(bench, "run", fake_run)
    argv = ["bench", "--device", "cpu", "--ops", "cast", "--no-progress"]
    assert main([*argv, "--json", "new/sub/x.json", "--plot", "new/x.png"]) == 0, capsys.readouterr().err
    assert seen[0][0] == {"old.json"}
    assert json.loads((tmp_path / "new" / "sub" / "x.json").read_text())["device"] == "NVIDIA H100 80GB HBM3"
    assert (tmp_path / "new" / "x.png").read_bytes()[:4] == b"\x89PNG"
    assert main([*argv, "--json", "old.json"]) == 0
    assert seen[1][1:] == ("old\n", 1_000_000)  # not truncated, not touched by the probe
    assert json.loads((tmp_path / "old.json").read_text())["device"] == "NVIDIA H100 80GB HBM3"


def _fail_write(*args, **kwargs):
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("failing", ["write_json", "write_plot"])
def test_output_write_failure_after_the_run_keeps_the_table(failing, tmp_path, monkeypatch, capsys):
    """A file that cannot be written after the run (a full disk, a folder removed meanwhile): the table is printed
    first, then a clear error, exit 1, no traceback; the other output is still written."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, failing, _fail_write)
    argv = ["bench", *FAST, "--ops", "cast", "--dtype", "fp32", "--json", "r.json", "--plot", "r.png"]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert "fused_ops bench [CPU]" in out and "cast" in out and "GB/s" in out  # the table
    option, path, other = ("--json", "r.json", "r.png") if failing == "write_json" else ("--plot", "r.png", "r.json")
    assert err.strip().splitlines()[-1] == f"error: cannot write {option} {path}: No space left on device", err
    assert f"wrote {path}" not in out and f"wrote {other}" in out and (tmp_path / other).exists()
    assert not (tmp_path / path).exists()


@pytest.mark.parametrize("mode", ["--dtensor", "--zero"])
def test_json_write_failure_after_dtensor_or_zero_run(mode, tmp_path, monkeypatch, capsys):
    import fused_ops.bench_dtensor
    import fused_ops.distributed

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fused_ops.bench_dtensor, "benchmark_dtensor_host", lambda *args, **kwargs: {"cases": []})
    monkeypatch.setattr(fused_ops.bench_dtensor, "format_dtensor_report", lambda result: "DTENSOR REPORT")
    monkeypatch.setattr(fused_ops.distributed, "benchmark_zero", lambda **kwargs: {"zero": 1})
    monkeypatch.setattr(bench, "format_zero_report", lambda result: "ZERO REPORT")
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr(bench, "write_json", _fail_write)
    assert main(["bench", mode, "--json", "d.json"]) == 1
    out, err = capsys.readouterr()
    assert ("DTENSOR REPORT" if mode == "--dtensor" else "ZERO REPORT") in out and "wrote" not in out
    assert err.strip().splitlines()[-1] == "error: cannot write --json d.json: No space left on device", err
    assert "Traceback" not in out + err


def test_write_json_failure_leaves_no_temporary_file(tmp_path, monkeypatch):
    def refuse(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(PermissionError):
        bench.write_json({"a": 1}, str(tmp_path / "x.json"))
    assert os.listdir(tmp_path) == []


def test_bench_budget_stops_cleanly():
    doc = bench.run(bench.BenchConfig(ops=["adam"], params=["tiny"], dtypes=["fp32"], device="cpu", quick=True,
                                      rep_ms=1, copy_mb=1, budget_s=0.0, progress=False))  # fmt: skip
    assert doc["stopped"].startswith("time budget")
    assert not doc["results"]
    assert {s["provider"] for s in doc["skipped"] if "budget" in s["why"]} == set(bench.PROVIDERS)


def test_bytes_table_matches_definitions():
    table = bench.BYTES_PER_ELEMENT
    assert table[("adam", "fp32")] == 28 and table[("adam", "bf16/fp32-states")] == 22
    assert table[("adam", "bf16/bf16-states")] == 14 and table[("adamw_master", "bf16")] == 28
    assert table[("cast", "bf16")] == 6 and table[("flatten", "fp32")] == 8 and table[("grad_norm", "bf16")] == 2
    assert bench.gpt2_shapes() and sum(map(_numel, bench.gpt2_shapes())) == 124_439_808
    assert len(bench.small_shapes()) == 10_000
    assert 1.0e9 < sum(map(_numel, bench.llama_shapes())) < 1.2e9


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


# --- report -------------------------------------------------------------------------------------------------------


def _fake_gpu_result(date: str, device: str = "NVIDIA H100 80GB HBM3") -> dict:
    row = {"op": "adam", "params": "gpt2-124m", "dtype": "fp32", "provider": "fused_ops", "median_ms": 1.2,
           "p20_ms": 1.1, "p80_ms": 1.3, "bytes": 28 * 124_439_808, "gbps": 2903.6, "frac_of_copy": 0.9,
           "speedup_vs_torch_fused": 1.5, "speedup_baseline": "torch-fused", "host_ms": 0.05, "launches": 2,
           "n_params": 124_439_808, "n_tensors": 148}  # fmt: skip
    return {"device": device, "device_kind": "cuda", "torch": "2.11.0", "triton": "3.6.0", "date": date,
            "copy_bandwidth_gbps": 3226.0, "param_sets": {"gpt2-124m": {"n_params": 124_439_808, "n_tensors": 148,
            "note": ""}}, "results": [row], "skipped": []}  # fmt: skip


def test_report_without_gpu_result(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# proj\n\nintro\n")
    results = tmp_path / "results"
    results.mkdir()
    (results / "bench_cpu.json").write_text(json.dumps({**_fake_gpu_result("2030-01-01"), "device_kind": "cpu"}))
    assert main(["report", "--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# proj\n\nintro\n")
    assert "## Performance" in text and bench.PERF_BEGIN in text and bench.PERF_END in text
    assert "No GPU measurement has been committed yet" in text


def test_report_renders_newest_gpu_result(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# proj\n\n## Performance\n\n{bench.PERF_BEGIN}\nstale\n{bench.PERF_END}\n\n## After\n")
    results = tmp_path / "results"
    results.mkdir()
    (results / "bench_old.json").write_text(json.dumps(_fake_gpu_result("2026-01-01T00:00:00+00:00", "Old GPU")))
    (results / "bench_new.json").write_text(json.dumps(_fake_gpu_result("2026-03-01T00:00:00+00:00")))
    (results / "bench_new.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    args = ["report", "--results", str(results), "--readme", str(readme)]
    assert main(args) == 0
    text = readme.read_text()
    assert "stale" not in text and "Old GPU" not in text
    assert "NVIDIA H100 80GB HBM3" in text and "2026-03-01" in text
    assert "results/bench_new.json" in text and "results/bench_new.png" in text
    assert "| adam | gpt2-124m | fp32 | **fused_ops** |" in text and "2904" in text
    assert text.count("## Performance") == 1 and text.rstrip().endswith("## After")
    assert main([*args, "--check"]) == 0  # idempotent: a second run changes nothing
    assert readme.read_text() == text


def test_report_check_flags_stale_readme(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# proj\n")
    results = tmp_path / "results"
    results.mkdir()
    (results / "bench_gpu.json").write_text(json.dumps(_fake_gpu_result("2026-03-01T00:00:00+00:00")))
    args = ["report", "--results", str(results), "--readme", str(readme)]
    assert main([*args, "--check"]) == 1 and readme.read_text() == "# proj\n"
    assert main(args) == 0 and main([*args, "--check"]) == 0


BAD_MARKERS = {
    "stray begin": "# proj\n{B}\nIMPORTANT USER TEXT\n## Other\nmore\n",
    "end only": "# proj\nUSER TEXT\n{E}\n",
    "end before begin": "# proj\n{E}\nUSER TEXT\n{B}\n",
    "two sections": "# proj\n{B}\nold\n{E}\nUSER TEXT\n{B}\nold\n{E}\n",
    "begin twice": "# proj\n{B}\nUSER TEXT\n{B}\nold\n{E}\n",
    "end twice": "# proj\n{B}\nold\n{E}\nUSER TEXT\n{E}\n",
}


@pytest.mark.parametrize("case", BAD_MARKERS)
def test_report_refuses_unpaired_markers(case, tmp_path, capsys):
    """Anything but one begin marker before one end marker (or neither): an error, exit 2, the README untouched
    (a stray begin marker made the first run append a section and the second delete the text in between)."""
    readme = tmp_path / "README.md"
    text = BAD_MARKERS[case].format(B=bench.PERF_BEGIN, E=bench.PERF_END)
    readme.write_text(text)
    results = tmp_path / "results"
    results.mkdir()
    (results / "bench_gpu.json").write_text(json.dumps(_fake_gpu_result("2026-03-01T00:00:00+00:00")))
    args = ["report", "--results", str(results), "--readme", str(readme)]
    for argv in (args, args, [*args, "--check"]):
        assert main(argv) == 2
        out, err = capsys.readouterr()
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"error: --readme {readme}: found ") and "nothing was rewritten" in line, err
        assert "Traceback" not in out + err
        assert readme.read_text() == text
    with pytest.raises(bench.ReadmeMarkersError):
        bench.update_readme(str(readme), str(results))


def test_gpu_document_renders_table_and_plot(tmp_path):
    doc = {**_fake_gpu_result("2026-03-01T00:00:00+00:00"), "label": "CUDA"}
    table = bench.format_table(doc)
    assert "[CUDA]" in table and "NVIDIA H100" in table and "0.050" in table and " 2" in table
    bench.write_plot(doc, str(tmp_path / "gpu.png"))
    assert (tmp_path / "gpu.png").read_bytes()[:4] == b"\x89PNG"


def test_progress_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    progress = bench._Progress(2, True, sys.stdout)
    progress.step("a")
    progress.step("b")
    progress.close()
    assert capsys.readouterr().out.splitlines() == ["[1/2] a", "[2/2] b"]


@pytest.mark.distributed
def test_bench_zero_runs_gloo_processes(capsys, tmp_path):
    out = tmp_path / "zero.json"
    assert main(["bench", "--zero", "--nproc", "2", "--quick", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ZeRO benchmark: 2 ranks" in text and "ddp_adamw" in text
    doc = json.loads(out.read_text())
    assert doc["nproc"] == 2
    for key in ("zero1", "zero2", "ddp_adamw"):
        assert doc[key]["step_ms"] > 0
    # stage 2 frees the full grads that stage 1 and DDP keep
    assert doc["zero2"]["memory"]["param_grads"] == 0 < doc["zero1"]["memory"]["param_grads"]


# --- CUDA-only logic, exercised on CPU with fakes --------------------------------------------------------------------


def _tiny_config(**kw) -> bench.BenchConfig:
    base = dict(ops=["adam"], params=["tiny"], dtypes=["fp32"], device="cpu", quick=True, rep_ms=1, copy_mb=1,
                progress=False)  # fmt: skip
    return bench.BenchConfig(**{**base, **kw})


@pytest.mark.parametrize("field, value", [("threads", 0), ("threads", -1), ("threads", 1.5), ("threads", True),
                                          ("copy_mb", 0), ("rep_ms", 0.0), ("rep_ms", float("nan")),
                                          ("budget_s", -1.0), ("budget_s", float("nan")), ("rep_ms", "5")])  # fmt: skip
def test_bench_config_bad_values_refused_from_python(monkeypatch, field, value):
    # the CLI refuses these itself; a BenchConfig built in Python is checked by run(), before any work
    monkeypatch.setattr(torch, "set_num_threads", lambda n: pytest.fail("threads set before the check"))
    with pytest.raises(ValueError, match=f"BenchConfig.{field}"):
        bench.run(_tiny_config(**{field: value}))


def test_dtensor_host_bad_warmup_refused():
    from fused_ops.bench_dtensor import benchmark_dtensor_host

    with pytest.raises(ValueError, match="warmup"):
        benchmark_dtensor_host([2], steps=1, warmup=-1)


class _KinetoLike:  # methods, as torch's _KinetoEvent
    def __init__(self, name, device_type, activity_type=None, annotation=False):
        self._v = dict(name=name, device_type=device_type, activity_type=activity_type, is_user_annotation=annotation)

    def __getattr__(self, key):
        if key not in self._v or self._v[key] is None:
            raise AttributeError(key)
        return lambda: self._v[key]


def test_launch_count_reads_kineto_and_function_events():
    kineto = [
        _KinetoLike("void adam_kernel<float>", "DeviceType.CUDA", "kernel"),
        _KinetoLike("Memset (Device)", "DeviceType.CUDA", "gpu_memset"),
        _KinetoLike("Optimizer.step#AdamW.step", "DeviceType.CUDA", "gpu_user_annotation", annotation=True),
        _KinetoLike("cudaLaunchKernel", "DeviceType.CPU", "cuda_runtime"),
        # a torch without activity_type: the device type decides, minus annotations and syncs
        _KinetoLike("triton_adam", "DeviceType.CUDA"),
        _KinetoLike("Optimizer.step", "DeviceType.CUDA", annotation=True),
        _KinetoLike("Context Sync", "DeviceType.CUDA"),
        _KinetoLike("Event Sync", "DeviceType.CUDA", "cuda_sync"),
        # an activity_type in a form this code does not know: the device type decides
        _KinetoLike("gemv", "DeviceType.CUDA", "ActivityType.CONCURRENT_KERNEL"),
    ]

    class Prof:
        profiler = type("P", (), {"kineto_results": type("R", (), {"events": staticmethod(lambda: kineto)})()})()

    assert bench.count_device_activities(Prof()) == 4

    class FunctionEvent:  # attributes, as torch's FunctionEvent; no profiler.kineto_results on this torch
        def __init__(self, name, device_type):
            self.name, self.device_type = name, device_type

    class OldProf:
        profiler = None

        def events(self):
            return [FunctionEvent("k", "DeviceType.CUDA"), FunctionEvent("aten::add_", "DeviceType.CPU")]

    assert bench.count_device_activities(OldProf()) == 1

    class Broken:
        profiler = None

        def events(self):
            raise RuntimeError("no CUPTI")

    assert bench.count_device_activities(Broken()) is None


def test_launch_count_never_raises(monkeypatch):
    def fail():
        raise RuntimeError("CUDA driver error")

    monkeypatch.setattr(torch.cuda, "synchronize", fail)
    assert bench.count_launches_cuda(lambda: None, None) is None


def test_time_cuda_uses_do_bench_quantiles(monkeypatch):
    import triton.testing

    seen = {}

    def fake_do_bench(fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, return_mode="mean"):
        seen.update(warmup=warmup, rep=rep, quantiles=quantiles)
        fn()
        return [2.0, 1.0, 3.0]  # triton 3.x: a list of the asked quantiles

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    calls = []
    assert bench.time_cuda(lambda: calls.append(1), None, warmup_ms=5, rep_ms=20) == (2.0, 1.0, 3.0)
    assert seen == {"warmup": 5, "rep": 20, "quantiles": [0.5, 0.2, 0.8]} and calls == [1]
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: 1.5)  # one float back: refused, not mis-read
    with pytest.raises(RuntimeError, match="quantiles"):
        bench.time_cuda(lambda: None, None, warmup_ms=5, rep_ms=20)


def test_out_of_memory_is_skipped_and_tensors_are_freed(monkeypatch):
    import weakref

    real = bench.build_runner
    refs = []

    def build(op, provider, shapes, dtype, device):
        if provider == "torch-forloop":
            big = torch.empty(1000)  # held by the traceback until the except block ends
            refs.append(weakref.ref(big))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB")
        runner = real(op, provider, shapes, dtype, device)
        refs.append(weakref.ref(runner.fn.__self__.param_groups[0]["params"][0]))  # the optimizer's first param
        return runner

    monkeypatch.setattr(bench.suite, "build_runner", build)  # where run() looks it up
    doc = bench.run(_tiny_config())
    assert {r["provider"] for r in doc["results"]} == set(bench.PROVIDERS) - {"torch-forloop"}
    (oom,) = [s for s in doc["skipped"] if s.get("provider") == "torch-forloop"]
    assert oom["why"].startswith("out of memory: OutOfMemoryError: CUDA out of memory")
    assert len(refs) == 4 and all(r() is None for r in refs)  # every provider's tensors freed


def test_peers_run_last_and_a_broken_peer_is_skipped(monkeypatch):
    def broken(params):
        raise ImportError("libcudart.so.12: cannot open shared object file")

    peers = (bench.Peer("goodpeer", "torch", lambda ps: torch.optim.AdamW(ps, lr=1e-3)),
             bench.Peer("badpeer", "torch", broken))  # fmt: skip
    monkeypatch.setattr(bench.suite, "PEERS", peers)  # where run() and build_runner look them up
    monkeypatch.setattr(bench.suite, "peer_status", lambda kind: {"goodpeer": None, "badpeer": None})
    doc = bench.run(_tiny_config(ops=["adam", "flatten"]))
    order = [(r["op"], r["provider"]) for r in doc["results"]]
    assert order[-1] == ("adam", "goodpeer") and ("flatten", "fused_ops") in order[:-1]
    assert doc["results"][-1]["speedup_baseline"] == "torch-fused"  # ratios over the whole case, peers included
    bad = [s for s in doc["skipped"] if s.get("provider") == "badpeer"]
    assert len(bad) == 1 and bad[0]["why"].startswith("failed: ImportError")


def test_json_checkpoint_after_each_case(tmp_path):
    seen = []
    doc = bench.run(_tiny_config(checkpoint=lambda d: seen.append((len(d["results"]), d["stopped"]))))
    assert [n for n, _ in seen] == [0, 1, 2, 3, 4]  # after the copy bandwidth, then after every case
    assert all(s.startswith("killed before the end") for _, s in seen) and doc["stopped"] is None


def test_sigterm_writes_partial_json(tmp_path):
    """`timeout` sends SIGTERM: the run stops, the JSON (and its partial results) is written, exit 130."""
    import signal
    import time

    js = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "fused_ops", "bench", "--device", "cpu", "--quick", "--params", "tiny,gpt2-124m",
           "--dtype", "fp32", "--ops", "adam,flatten,cast", "--rep-ms", "400", "--copy-mb", "1", "--no-progress",
           "--json", str(js)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:  # wait for the first finished case
            if js.exists() and json.loads(js.read_text())["results"]:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[0]
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out
    doc = json.loads(js.read_text())
    assert doc["stopped"] == "interrupted" and doc["results"] and doc["copy_bandwidth_gbps"] > 0
    assert any(s["why"] == "interrupted" for s in doc["skipped"])
    keys = [(s.get("op"), s.get("params"), s.get("dtype"), s.get("provider")) for s in doc["skipped"]]
    assert len(keys) == len(set(keys))  # no case noted twice


def test_a_new_op_is_one_registration():
    """What a new cases file does ("Adding an op" in fused_ops.bench): ``register_op`` with its bytes and providers,
    and the run selects it by name. torch.optim.SGD stands in for a fused_ops optimizer."""
    from fused_ops.bench.cases._common import torch_optimizer_builders

    sgd = lambda ps: torch.optim.SGD(ps, lr=bench.LR, momentum=0.9)  # one per-element state: momentum_buffer

    @bench.register_op("sgd_example", "torch.optim.SGD", lambda: True, dtypes=("fp32",),
                       bytes_per_element={"fp32": 20})  # fmt: skip
    def _providers():
        return {
            "fused_ops": bench.optimizer_builder("sgd_example", sgd, n_states=1),
            **torch_optimizer_builders("sgd_example", torch.optim.SGD, n_states=1, lr=bench.LR, momentum=0.9),
        }

    try:
        with pytest.raises(ValueError, match="registered twice"):
            bench.register_op("sgd_example", "torch.optim.SGD", lambda: True)(dict)
        doc = bench.run(_tiny_config(ops=["sgd_example"]))
        assert doc["bytes_per_element"]["sgd_example:fp32"] == 20
        rows = {r["provider"]: r for r in doc["results"]}
        assert set(rows) == set(bench.PROVIDERS), doc["skipped"]
        assert all(r["layout"] == "fp32" and r["bytes"] == 20 * r["n_params"] for r in rows.values())
    finally:
        bench.OPS.pop("sgd_example", None)
        bench.BYTES_PER_ELEMENT.pop(("sgd_example", "fp32"), None)
