"""Output: the terminal table, the results JSON, the PNG plot, the README's Performance section (``python -m
fused_ops report``) and the ZeRO table (``python -m fused_ops bench --zero``)."""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Any


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _speedup(r: dict[str, Any], foreach_note: str) -> str:
    """The speed-up cell: ``1.23x`` (plus ``foreach_note`` over torch-foreach), or ``n/a`` without a baseline."""
    value = r.get("speedup_vs_torch_fused")
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.2f}x" + (foreach_note if r.get("speedup_baseline") == "torch-foreach" else "")


def _per_element(r: dict[str, Any]) -> str:
    """Bytes per element: ``28``, or ``16.06`` (8-bit block scales; tensors of several layouts)."""
    return f"{r['bytes'] / max(r['n_params'], 1):.2f}".rstrip("0").rstrip(".")


def format_table(doc: dict[str, Any]) -> str:
    """The terminal table: one row per (op, params, dtype, provider), then the skip notes."""
    label = doc.get("label", "CPU" if doc.get("device_kind") == "cpu" else "CUDA")
    lines = [
        f"fused_ops bench [{label}] on {doc['device']}: torch {doc['torch']}, triton {doc.get('triton') or 'n/a'}, "
        f"{doc['date']}",
        f"copy bandwidth ({label}, measured in this run, bytes read + written): "
        f"{_fmt(doc.get('copy_bandwidth_gbps'), '.1f')} GB/s; timer: {doc.get('timer', '')}",
    ]
    for name, info in doc.get("param_sets", {}).items():
        note = f" ({info['note']})" if info.get("note") else ""
        lines.append(f"  {name}: {info['n_params']:,} params in {info['n_tensors']:,} tensors{note}")
    header = ("op", "params", "dtype", "provider", "median ms", "p20-p80 ms", "B/elem", "GB/s", "% copy",
              "vs torch-fused", "host ms", "launches", "state B/param")  # fmt: skip
    rows = []
    for r in doc["results"]:
        speed = _speedup(r, " (foreach)")
        frac = r.get("frac_of_copy")
        rows.append((
            r["op"], r["params"], r["dtype"], r["provider"], _fmt(r["median_ms"], ".3f"),
            f"{_fmt(r['p20_ms'], '.3f')}-{_fmt(r['p80_ms'], '.3f')}", _per_element(r),
            _fmt(r["gbps"], ".1f"), _fmt(None if frac is None else 100 * frac, ".1f"), speed,
            _fmt(r.get("host_ms"), ".3f"), "n/a" if r.get("launches") is None else str(r["launches"]),
            _fmt(r.get("state_bytes_per_param"), ".3f"),
        ))  # fmt: skip
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    right = {4, 5, 6, 7, 8, 9, 10, 11, 12}
    fmt_row = lambda row: "  ".join(
        c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
    )
    lines += ["", fmt_row(header), fmt_row(tuple("-" * w for w in widths)), *map(fmt_row, rows)]
    if not rows:
        lines.append("(no results)")
    if doc.get("targets"):
        where = "" if doc.get("device_kind") == "cuda" else " (a CPU run: the speed targets are for the GPU)"
        lines += ["", f"targets (issue 11){where}:"]
        for t in doc["targets"]:
            lines.append(f"  {t['target']}, {t['params']} {t['dtype']}: {t['value']:.3f} (goal {t['goal']}): "
                         f"{'met' if t['met'] else 'NOT met'}")  # fmt: skip
    if doc.get("notes"):
        lines += ["", *(f"note: {n}" for n in doc["notes"])]
    if doc.get("skipped"):
        lines.append("")
        lines.append("skipped:")
        for s in doc["skipped"]:
            what = " ".join(str(s[k]) for k in ("op", "params", "dtype", "provider") if k in s)
            lines.append(f"  {what}: {s['why']}")
    return "\n".join(lines)


def write_json(doc: dict[str, Any], path: str) -> None:
    """Write the results document (non-finite numbers become null)."""

    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:  # then renamed: a run killed mid-write never leaves half a JSON
            json.dump(clean(doc), f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:  # a full disk, a folder that refuses the rename: no stray temporary file left behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _count(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def write_plot(doc: dict[str, Any], path: str) -> None:
    """PNG: GB/s per provider for every (params, dtype), one panel per op, copy bandwidth drawn as the ceiling.

    The GB/s axis is logarithmic: a for-loop over 10,000 tensors and a fused kernel differ by orders of magnitude.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(r["op"] for r in doc["results"])) or ["(no results)"]
    providers = list(dict.fromkeys(r["provider"] for r in doc["results"]))
    colors = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(providers)}
    n_groups = max([len({(r["params"], r["dtype"]) for r in doc["results"] if r["op"] == op}) for op in ops] + [1])
    fig, axes = plt.subplots(len(ops), 1, figsize=(max(8.0, 2.0 * n_groups + 2), 3.2 * len(ops)), squeeze=False)
    copy_gbps = doc.get("copy_bandwidth_gbps")
    label = doc.get("label", "CPU" if doc.get("device_kind") == "cpu" else "CUDA")
    values = [r["gbps"] for r in doc["results"] if r.get("gbps")]
    low = min([*values, copy_gbps or 1.0]) / 3
    high = max([*values, copy_gbps or 1.0]) * 3
    for ax, op in zip(axes[:, 0], ops, strict=True):
        rows = [r for r in doc["results"] if r["op"] == op]
        groups = list(dict.fromkeys((r["params"], r["dtype"]) for r in rows))
        width = 0.8 / max(len(providers), 1)
        for j, prov in enumerate(providers):
            xs, ys = [], []
            for i, g in enumerate(groups):
                r = next((r for r in rows if (r["params"], r["dtype"]) == g and r["provider"] == prov), None)
                if r is not None and r["gbps"]:
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(r["gbps"])
            if xs:
                ax.bar(xs, ys, width=width, color=colors[prov], label=prov)
        ax.set_yscale("log")
        ax.set_ylim(low, high)
        ax.set_xlim(-0.6, max(len(groups), 1) - 0.4)
        if copy_gbps:
            ax.axhline(copy_gbps, color="black", linestyle="--", linewidth=1)
            ax.text(max(len(groups), 1) - 0.45, copy_gbps * 1.05, f"copy {copy_gbps:.1f} GB/s (ceiling)",
                    ha="right", va="bottom", fontsize=8)  # fmt: skip
        sets = doc.get("param_sets", {})
        ticks = [f"{p} ({_count(sets[p]['n_params'])})\n{d}" if p in sets else f"{p}\n{d}" for p, d in groups]
        ax.set_xticks(range(len(groups)), ticks, fontsize=8)
        ax.set_ylabel("GB/s (log)")
        ax.set_title(op, fontsize=10, loc="left")
        if providers and rows:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"fused_ops bench [{label}]: {doc['device']}\ntorch {doc['torch']}, triton {doc.get('triton')}, "
                 f"{doc['date'][:10]}; dashed: copy bandwidth measured in the same run", fontsize=9)  # fmt: skip
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- README Performance section (python -m fused_ops report) -------------------------------------------------------

PERF_BEGIN = "<!-- perf:begin -->"
PERF_END = "<!-- perf:end -->"


class ReadmeMarkersError(ValueError):
    """The README's perf markers are not one begin before one end (nor absent): rewriting would guess what to
    replace, and could delete the user's text between a stray marker and the section."""


def load_results(results_dir: str) -> list[tuple[str, dict[str, Any]]]:
    """Every readable results JSON in ``results_dir`` as (path, document), oldest first by their ``date``."""
    out = []
    if os.path.isdir(results_dir):
        for name in sorted(os.listdir(results_dir)):
            if not name.endswith(".json"):
                continue
            path = os.path.join(results_dir, name)
            try:
                with open(path, encoding="utf-8") as f:
                    doc = json.load(f)
            except (OSError, ValueError):
                continue
            if isinstance(doc, dict) and "results" in doc and "date" in doc:
                out.append((path, doc))
    return sorted(out, key=lambda pd: (str(pd[1]["date"]), pd[0]))


def newest_gpu_result(results_dir: str) -> tuple[str, dict[str, Any]] | None:
    """The newest results JSON measured on CUDA, or None."""
    gpu = [pd for pd in load_results(results_dir) if pd[1].get("device_kind") == "cuda"]
    return gpu[-1] if gpu else None


def render_performance(found: tuple[str, dict[str, Any]] | None, readme_dir: str) -> str:
    """The Markdown between the perf markers, from a results JSON (or the note that there is none yet)."""
    gen = "Generated by `python -m fused_ops report`; do not edit by hand."
    if found is None:
        return (
            "No GPU measurement has been committed yet. On a GPU machine, `bash benchmarks/gpu_check.sh` writes\n"
            "`bench_<device>_<date>.json` and `.png`; commit them under `benchmarks/results/` and run\n"
            f"`python -m fused_ops report`. {gen}"
        )
    path, doc = found
    rel = os.path.relpath(path, readme_dir).replace(os.sep, "/")
    lines = [
        f"Measured on **{doc['device']}** on {doc['date'][:10]} (torch {doc['torch']}, triton {doc.get('triton')}), "
        f"from [`{rel}`]({rel}). {gen}",
        "",
        f"Copy bandwidth measured in the same run (bytes read + written): {_fmt(doc.get('copy_bandwidth_gbps'), '.0f')}"
        " GB/s. Times are medians (p20-p80) of `triton.testing.do_bench`, or for `unscale`, whose grads are "
        "restored before each call, of the same method by hand (restore, L2 flush, then the timed call); bytes are "
        "counted from each op's definition, tensor by tensor (e.g. 28 B per fp32 AdamW parameter), and a provider "
        "that does the same work in more passes is counted at the op's bytes too (torch's unfused master-weight "
        "step: 28 B, not its own 40), so GB/s is the effective bandwidth of the same work; host ms is the time the "
        "Python call takes to return without synchronising; launches are device activities per call; state "
        "B/param is measured from the optimizer's own state tensors (ZeroAdamW: its master and state shards; "
        "torch's master-weight rows: masters, their grads and AdamW's states; n/a: not an optimizer step).",
        "",
    ]
    if doc.get("stopped"):  # (a run cut short: a budget, an interrupt, a kill; its JSON was written as it went)
        lines += [f"**A partial run**: {doc['stopped']}; the cases it did not reach are listed as skipped below.", ""]
    for name, info in doc.get("param_sets", {}).items():
        note = f" ({info['note']})" if info.get("note") else ""
        lines.append(f"- `{name}`: {info['n_params']:,} parameters in {info['n_tensors']:,} tensors{note}")
    lines += [
        "",
        "| op | params | dtype | provider | median ms (p20-p80) | B/elem | GB/s | % of copy | vs torch-fused | host ms "
        "| launches | state B/param |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["results"]:
        frac = r.get("frac_of_copy")
        speed = _speedup(r, " (vs foreach)")
        prov = f"**{r['provider']}**" if r["provider"] == "fused_ops" else r["provider"]
        lines.append(
            f"| {r['op']} | {r['params']} | {r['dtype']} | {prov} | {_fmt(r['median_ms'], '.3f')} "
            f"({_fmt(r['p20_ms'], '.3f')}-{_fmt(r['p80_ms'], '.3f')}) | {_per_element(r)} | {_fmt(r['gbps'], '.0f')} | "
            f"{_fmt(None if frac is None else 100 * frac, '.1f')} | {speed} | {_fmt(r.get('host_ms'), '.3f')} | "
            f"{'n/a' if r.get('launches') is None else r['launches']} | "
            f"{_fmt(r.get('state_bytes_per_param'), '.2f')} |"
        )
    png = os.path.splitext(path)[0] + ".png"
    if os.path.exists(png):
        prel = os.path.relpath(png, readme_dir).replace(os.sep, "/")
        lines += ["", f"![GB/s per op and provider on {doc['device']}]({prel})"]
    if doc.get("targets"):
        where = "" if doc.get("device_kind") == "cuda" else " (a CPU run: the speed targets are for the GPU)"
        lines += ["", f"Targets (issue 11){where}:", ""]
        lines += [f"- {t['target']}, {t['params']} {t['dtype']}: {t['value']:.3f} (goal {t['goal']}): "
                  f"{'met' if t['met'] else '**not met**'}" for t in doc["targets"]]  # fmt: skip
    if doc.get("notes"):
        for n in doc["notes"]:
            lines += ["", f"Note: {n}"]
    skipped = doc.get("skipped") or []
    if skipped:
        notes = "; ".join(
            " ".join(str(s[k]) for k in ("op", "params", "dtype", "provider") if k in s) + f": {s['why']}"
            for s in skipped[:12]
        )
        more = f" (and {len(skipped) - 12} more)" if len(skipped) > 12 else ""
        lines += ["", f"Skipped: {notes}{more}."]
    return "\n".join(lines)


def update_readme(readme: str, results_dir: str) -> tuple[str, str, bool]:
    """Rewrite the section between the perf markers of ``readme`` (adding ``## Performance`` and the markers at
    the end when it has neither marker). Returns (new text, source description, changed).

    Raises :class:`ReadmeMarkersError` (nothing is rewritten) unless the README holds exactly one ``PERF_BEGIN``
    followed by exactly one ``PERF_END``, or neither."""
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    n_begin, n_end = text.count(PERF_BEGIN), text.count(PERF_END)
    if (n_begin, n_end) != (0, 0) and not (n_begin == n_end == 1 and text.index(PERF_BEGIN) < text.index(PERF_END)):
        found_markers = (
            f"found {n_begin} {PERF_BEGIN} and {n_end} {PERF_END} markers"
            if (n_begin, n_end) != (1, 1)
            else f"found {PERF_END} before {PERF_BEGIN}"
        )
        raise ReadmeMarkersError(
            f"{found_markers}; expected one {PERF_BEGIN} followed by one {PERF_END} around the Performance section "
            "(or neither: the section is then added at the end). Fix the markers by hand; nothing was rewritten"
        )
    found = newest_gpu_result(results_dir)
    body = render_performance(found, os.path.dirname(os.path.abspath(readme)))
    block = f"{PERF_BEGIN}\n{body}\n{PERF_END}"
    if n_begin:
        start, end = text.index(PERF_BEGIN), text.index(PERF_END) + len(PERF_END)
        new = text[:start] + block + text[end:]
    else:
        new = text.rstrip("\n") + "\n\n## Performance\n\n" + block + "\n"
    source = found[0] if found else "no GPU result"
    return new, source, new != text


# -- ZeRO (python -m fused_ops bench --zero) ------------------------------------------------------------------------


def _mib(n: int) -> str:
    return f"{n / 2**20:8.2f}"


def format_zero_report(result: dict) -> str:
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
        "buckets: ZeRO's reduced-grad shards + reduce-scatter staging; p.grad: grads still held after backward "
        "(ZeRO-1 and DDP keep full grads; ZeRO-2 frees them as their buckets are reduced)"
    )
    return "\n".join(lines)
