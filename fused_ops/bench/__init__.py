"""The benchmark suite behind ``python -m fused_ops bench`` and ``benchmarks/test_bench_*.py``.

Every op is a registered :class:`Op`: a name, the ``fused_ops`` attribute whose presence enables it, the bytes it
moves per element (``BYTES_PER_ELEMENT``, counted from its definition) and one builder per provider. A builder
takes a list of shapes, a dtype and a device, allocates fresh inputs and returns a :class:`Runner`: the call that
is timed, plus a ``reset`` that restores in-place inputs outside the timed region. Providers are ``fused_ops``,
``torch-forloop``, ``torch-foreach``, ``torch-fused`` and, for Adam on CUDA, the peers that are installed
(torchao, bitsandbytes, apex, DeepSpeed), each detected at run time and never installed.

Timing: on CUDA ``triton.testing.do_bench`` medians with the (0.5, 0.2, 0.8) quantiles (for the one op with an
in-place input that must be reset, ``unscale``, a loop of CUDA events built the same way: reset, L2 flush, event,
call, event); next to it the host time of one call without synchronising (the CPU time spent launching) and the number
of device activities in one call, counted with ``torch.profiler``. On CPU, ``time.perf_counter`` medians and
20/80 quantiles over repeats, on one torch thread unless ``threads`` says otherwise (with more, a step's many
small ops wait on each other and a busy machine swings the medians by orders of magnitude; a note says when the
load average was above the core count); launches and host time are n/a there. The device's copy bandwidth is
measured in the same run (a large tensor copy, bytes read + written) and every GB/s figure is also given as a
fraction of it.

Bytes are counted from each op's definition, tensor by tensor (a param at its own layout's bytes: the 8-bit peers
keep full-precision states for small tensors, and such a row's layout names each layout with its share of the
elements). A provider that does the op's work in more passes is counted at the op's bytes all the same (torch's
unfused master-weight sequence: 28 B, not its own 40), so GB/s is the effective bandwidth of the same work.

Robustness (the GPU run has a hard time limit): each case is built, timed and freed on its own (a CUDA OOM or a
broken peer becomes a ``skipped`` note and the run goes on); peers run after every op's own cases; SIGTERM ends
the run like Ctrl-C with the finished cases kept; ``BenchConfig.checkpoint`` (the CLI: the JSON file) receives
the document after every case, so even a killed run leaves its figures on disk. On CUDA each row also has
``peak_mem_gb`` (peak allocated memory of the case: build, state and warm-up calls, read before the timer's
L2-flush buffer exists) and the header the device's memory and compute capability.

The parts:

- ``_registry.py``: ``Op``, ``Runner``, ``Skip``, ``register_op``, ``OPS``, ``BYTES_PER_ELEMENT``, dtypes, providers.
- ``params.py``: the parameter sets (GPT-2 124M, Llama-like 1.1B, 10,000 small tensors, tiny) and the inputs.
- ``cases/``: one module per op family, each registering its ops: ``adam.py`` (``adam``, ``adamw_master``),
  ``adam_lowbit.py`` (``adamw8bit``, ``adamw_bf16_sr``), ``lion.py`` (``lion``), ``sgd.py`` (``sgd``),
  ``multi_tensor.py`` (``flatten``, ``cast``, ``unscale``, ``grad_norm``), ``zero.py`` (``zero``). ``_common.py``
  holds the builders every case shares (``optimizer_builder``, torch.optim's three implementations,
  ``simple_runner``); ``_optim.py`` those of the family beyond Adam (a step builder whose layout names low-bit and
  Kahan states, and the 8-bit and Lion peers: bitsandbytes, torchao, optimi).
- ``peers.py``: other libraries' fused Adam(W) (torchao, bitsandbytes, apex, DeepSpeed), providers of the ops
  registered with ``peers=True``.
- ``timing.py``: CPU and CUDA timers, host time, launch counting, copy bandwidth.
- ``env.py``: the device and the JSON header (versions, date, device properties).
- ``suite.py``: ``BenchConfig`` and ``run`` (not ``run.py``: the package's ``run`` is the function).
- ``report.py``: the terminal table, JSON, plot, the README's Performance section and the ZeRO table.

Adding an op (a new optimizer; ``cases/sgd.py`` is the example below): write its module in ``cases/``, register
the op there, and name the module in the import line of ``cases/__init__.py`` (its place there is its place in
the table; an import line, not a scan of the folder, so the order is explicit). Nothing else changes:
``--ops sgd`` selects it, the default run includes it, ``info`` lists it, ``benchmarks/test_bench_ops.py`` runs
each of its providers, and while ``fused_ops`` has no ``FusedSGD`` the run skips it with the reason::

    import torch

    import fused_ops

    from .._registry import LR, Builder, has, register_op
    from ._common import optimizer_builder, torch_optimizer_builders

    # SGD with momentum, fp32 params and state: read p, g, buf (3 x 4 B); write p, buf (2 x 4 B).
    @register_op("sgd", "fused_ops.FusedSGD", has("FusedSGD"), bytes_per_element={"fp32": 20})
    def _sgd_providers() -> dict[str, Builder]:  # SGD (lr 1e-3, momentum 0.9) vs torch.optim.SGD's three
        return {
            "fused_ops": optimizer_builder("sgd", lambda ps: fused_ops.FusedSGD(ps, lr=LR, momentum=0.9), n_states=1),
            **torch_optimizer_builders("sgd", torch.optim.SGD, n_states=1, lr=LR, momentum=0.9),
        }

``optimizer_builder`` times ``opt.step()`` on fresh params with grads and reads the layout from the states the
first step created (``n_states`` per-element states); a layout missing from ``bytes_per_element`` is counted by
the generic rule (read + write p and each state, read g). A provider that cannot run raises ``Skip("why")`` from
its builder: one note in the JSON, not a failure (an op torch lacks, like Lion, skips its ``torch-*`` providers
so). An op that is not an optimizer step returns ``simple_runner(op, dtype, shapes, fn, reset)``, ``reset``
restoring in-place inputs outside the timed region (``cases/multi_tensor.py``). The table's speed-up is over
``torch-fused``, else ``torch-foreach``; ``peers=True`` adds the installed Adam peers as providers.
"""

from __future__ import annotations

from ._registry import (
    BYTES_PER_ELEMENT,
    DEFAULT_DTYPES,
    DTYPES,
    LR,
    OPS,
    PROVIDERS,
    WEIGHT_DECAY,
    Builder,
    Op,
    Runner,
    Skip,
    register_op,
)
from .cases._common import optimizer_builder, optimizer_layout, release_process_group, simple_runner
from .env import cpu_name, device_label, device_slug, environment, pick_device, triton_version
from .params import (
    DEFAULT_PARAMS,
    PARAM_SETS,
    ParamSet,
    gpt2_shapes,
    llama_shapes,
    make_tensors,
    small_shapes,
)
from .peers import PEERS, Peer, peer_status
from .report import (
    PERF_BEGIN,
    PERF_END,
    ReadmeMarkersError,
    format_table,
    format_zero_report,
    load_results,
    newest_gpu_result,
    render_performance,
    update_readme,
    write_json,
    write_plot,
)
from .suite import (
    BenchConfig,
    _Progress,  # noqa: F401  (tests drive the progress line directly)
    build_runner,
    measure,
    run,
)
from .timing import (
    QUANTILES,
    copy_bandwidth,
    count_device_activities,
    count_launches_cuda,
    host_time_cuda,
    is_device_activity,
    time_cpu,
    time_cuda,
)

__all__ = [
    "BYTES_PER_ELEMENT",
    "BenchConfig",
    "Builder",
    "DEFAULT_DTYPES",
    "DEFAULT_PARAMS",
    "DTYPES",
    "LR",
    "OPS",
    "Op",
    "PARAM_SETS",
    "PEERS",
    "PERF_BEGIN",
    "PERF_END",
    "PROVIDERS",
    "ParamSet",
    "Peer",
    "QUANTILES",
    "ReadmeMarkersError",
    "Runner",
    "Skip",
    "WEIGHT_DECAY",
    "build_runner",
    "copy_bandwidth",
    "count_device_activities",
    "count_launches_cuda",
    "cpu_name",
    "device_label",
    "device_slug",
    "environment",
    "format_table",
    "format_zero_report",
    "gpt2_shapes",
    "host_time_cuda",
    "is_device_activity",
    "llama_shapes",
    "load_results",
    "make_tensors",
    "measure",
    "newest_gpu_result",
    "optimizer_builder",
    "optimizer_layout",
    "peer_status",
    "pick_device",
    "register_op",
    "release_process_group",
    "render_performance",
    "run",
    "simple_runner",
    "small_shapes",
    "time_cpu",
    "time_cuda",
    "triton_version",
    "update_readme",
    "write_json",
    "write_plot",
]
