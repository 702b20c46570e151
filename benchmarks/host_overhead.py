"""Host time of one optimizer step on many small tensors, with the GPU work taken out (runs on a CPU).

    python benchmarks/host_overhead.py                 # 10,000 tensors (the bench's small-10k set), 1 thread
    python benchmarks/host_overhead.py --n 2000 --steps 50 --threads 2

On 10,000 small tensors a step is bound by Python on the host, not by the GPU: this script measures that part
alone, on any machine. ``FusedAdamW(backend="triton").step()`` runs as on a GPU (checks, plan, chunk table,
launch arguments) except that the Triton kernel launch itself is replaced by a no-op, so CPU tensors work and
no interpreter runs. Two cases: the grads stay where they are between steps (persistent grads, or a caching
allocator that hands back the same blocks), and the grads move every step (new tensors each step: the plan
checks them and rewrites their addresses in its table). The reference line is torch.optim.AdamW's
``_init_group``, the per-param Python that both its foreach and its fused CUDA steps run before any kernel
(their launches come on top of it). On a GPU, ``python -m fused_ops bench`` reports the real host time
(``host ms``) next to the device time.

torch runs on one CPU thread unless ``--threads`` says otherwise: with more, the small ops of a step (the plan's
``searchsorted`` over moved grads, for one) wait on each other's OpenMP threads, and on a shared machine the medians
swing 15-fold and more (``python -m fused_ops bench --dtensor`` does the same).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # lets backend="triton" accept CPU tensors; no kernel runs here

import torch  # noqa: E402

from fused_ops.__main__ import _positive_int  # noqa: E402  (the command line's check: an int >= 1)


def _stub_adam_kernel() -> None:
    from fused_ops.kernels import adam

    class _NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    adam._adam_kernel = _NoLaunch()


def measure(n: int = 10_000, steps: int = 20) -> dict[str, float]:
    """Host ms per step: fused_ops with still and with moving grads, and torch's ``_init_group``."""
    import fused_ops
    from fused_ops.bench import small_shapes

    _stub_adam_kernel()
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in small_shapes(n)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = fused_ops.FusedAdamW(params, lr=1e-3, backend="triton")
    opt.step()  # the checked step: states and the plan
    still = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        still.append(time.perf_counter() - t0)
    spare = [[torch.empty_like(p) for p in params] for _ in range(2)]
    moving = []
    for i in range(steps):
        for p, g in zip(params, spare[i % 2]):
            p.grad = g
        t0 = time.perf_counter()
        opt.step()
        moving.append(time.perf_counter() - t0)

    ref = torch.optim.AdamW(params, lr=1e-3, foreach=True)
    ref.step()
    group = ref.param_groups[0]
    init_group = []
    for _ in range(steps):
        t0 = time.perf_counter()
        ref._init_group(group, [], [], [], [], [], [])
        init_group.append(time.perf_counter() - t0)
    # The median step, and the fastest: on a shared machine the minimum is the figure least disturbed by others.
    return {f"{name} ({stat})": 1e3 * fn(times)
            for name, times in (("fused_ops, grads still", still), ("fused_ops, grads moved", moving),
                                ("torch AdamW _init_group", init_group))
            for stat, fn in (("median", statistics.median), ("min", min))}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=_positive_int, default=10_000, help="number of tensors (default 10,000)")
    parser.add_argument("--steps", type=_positive_int, default=20, help="timed steps per case (default 20)")
    parser.add_argument("--threads", type=_positive_int, default=1,
                        help="torch's CPU threads (default 1: more wait on each other at every small op)")  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = measure(args.n, args.steps)
    print(f"host ms per step, {args.n} tensors, kernel launch stubbed (torch {torch.__version__}, this CPU, "
          f"{args.threads} thread{'s' if args.threads != 1 else ''}):")  # fmt: skip
    for name, ms in rows.items():
        print(f"  {name:38s} {ms:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
