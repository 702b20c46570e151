"""The bench's peer providers (torchao, bitsandbytes, optimi), run on CPU as ``--peers-on-cpu`` runs them: each
factory builds, steps, and gets the layout and the state bytes per param that the GPU run will report. On a GPU the
peers are timed; nowhere else can their providers break unseen, so they are checked here first.

The ``test`` extra installs the peers at the versions pinned in setup.py's ``peers`` extra; a peer that is not
installed skips its cases (the skip names it). The expected state bytes are counted from each library's format on
the shapes below, independently of the bench's measurement.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from fused_ops.bench import _registry
from fused_ops.bench.suite import build_runner

# One tensor that every 8-bit peer quantises (>= 4,096 elements, whole blocks of 256) and two that they keep in
# full precision (under 4,096 elements: bitsandbytes' min_8bit_size, torchao's minimum), odd sizes.
BIG, SMALL = 64 * 256, 300 + 7
SHAPES = [(64, 256), (300,), (7,)]
N = BIG + SMALL
BLOCKS = BIG // 256
QMAP = 256 * 4  # a 256-entry fp32 code book


def _bnb_8bit(moments: int) -> float:
    # bitsandbytes: per moment, 1 B codes + one fp32 absmax per 256 elements on the big tensor; one code book per
    # moment shared by every param (counted once); fp32 moments on the small tensors; its step is an int.
    return (moments * (BIG + 4 * BLOCKS + QMAP) + moments * 4 * SMALL) / N


def _torchao_8bit(small_bytes: int) -> float:
    # torchao: per moment on the big tensor, 1 B codes + one fp32 scale per 256 elements + a code book of its own;
    # the small tensors' two moments in the param's dtype (small_bytes each); a 0-d fp32 step per param (3).
    return (2 * (BIG + 4 * BLOCKS + QMAP) + 2 * small_bytes * SMALL + 3 * 4) / N


# Bytes of one step, counted tensor by tensor from each op's definition: the big tensor at its 8-bit layout (1 B
# codes + a 4 B scale per 256 elements per state, read and written), the small ones at their full-precision one.
INT8_ADAMW = {"fp32": 16 + 16 / 256, "bf16": 10 + 16 / 256}  # read + write p, codes, scales; read g
FULL_ADAMW = {"fp32": 28, "bf16": 22}  # fp32 moments: p, g in the param's dtype, m, v in fp32
MIXED = "{big} 98% + {small} 2%"  # BIG / N = 98.2%

# (op, provider, module, dtype, expected layout, expected state bytes per param, expected bytes of a step)
CASES = [
    ("adamw8bit", "torchao", "torchao", "fp32", MIXED.format(big="fp32/int8-states", small="fp32"), _torchao_8bit(4),
     INT8_ADAMW["fp32"] * BIG + FULL_ADAMW["fp32"] * SMALL),
    ("adamw8bit", "bitsandbytes", "bitsandbytes", "fp32", MIXED.format(big="fp32/int8-states", small="fp32"),
     _bnb_8bit(2), INT8_ADAMW["fp32"] * BIG + FULL_ADAMW["fp32"] * SMALL),
    ("adamw8bit", "bitsandbytes", "bitsandbytes", "bf16", MIXED.format(big="bf16/int8-states",
     small="bf16/fp32-states"), _bnb_8bit(2), INT8_ADAMW["bf16"] * BIG + FULL_ADAMW["bf16"] * SMALL),
    # torchao's AdamW(bf16_stochastic_round=True) keeps the moments in the param's dtype; + a 0-d fp32 step each
    ("adamw_bf16_sr", "torchao", "torchao", "bf16", "bf16/bf16-states", (2 * 2 * N + 3 * 4) / N, 14 * N),
    # optimi: bf16 moments and a bf16 Kahan compensation buffer, no step tensors
    ("adamw_bf16_sr", "optimi", "optimi", "bf16", "bf16/bf16-states+kahan", 3 * 2, 18 * N),
    ("lion", "bitsandbytes", "bitsandbytes", "fp32", "fp32", 4, 20 * N),
    # Lion8bit: one 8-bit momentum (1 B codes + a 4 B scale per 256, read and written) on the big tensor
    ("lion", "bitsandbytes-8bit", "bitsandbytes", "fp32", MIXED.format(big="fp32/int8-states", small="fp32"),
     _bnb_8bit(1), (14 + 8 / 256) * BIG + 20 * SMALL),
    ("lion", "optimi", "optimi", "fp32", "fp32", 4, 20 * N),  # (no Kahan buffer on fp32 params: its key holds None)
    ("lion", "optimi", "optimi", "bf16", "bf16/bf16-states+kahan", 2 * 2, 14 * N),
    ("adam", "bitsandbytes", "bitsandbytes", "fp32", "fp32", 8, 28 * N),
]  # fmt: skip


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.fixture
def peers_on_cpu():
    _registry._PEERS_ON_CPU[0] = True
    try:
        yield
    finally:
        _registry._PEERS_ON_CPU[0] = False


@pytest.mark.parametrize("op, provider, module, dtype, layout, state_bytes, step_bytes", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[3]}" for c in CASES])  # fmt: skip
def test_peer_builds_steps_and_reports_its_layout(peers_on_cpu, op, provider, module, dtype, layout, state_bytes,
                                                  step_bytes):  # fmt: skip
    if not _installed(module):
        pytest.skip(f"{module} is not installed (pip install -e '.[peers]')")
    runner = build_runner(op, provider, SHAPES, _registry.DTYPES[dtype], torch.device("cpu"))
    opt = runner.fn.__self__
    params = [p for g in opt.param_groups for p in g["params"]]
    assert [tuple(p.shape) for p in params] == SHAPES and all(p.dtype == _registry.DTYPES[dtype] for p in params)
    before = [p.detach().clone() for p in params]
    runner.fn()  # a timed step: the second of this optimizer (the builder ran the first)
    for p, b in zip(params, before):
        assert torch.isfinite(p).all() and not torch.equal(p, b), "the peer's step did not move a param"
    assert runner.layout == layout  # the small tensors' full-precision states named, with their share
    assert runner.state_bytes_per_param == pytest.approx(state_bytes, rel=1e-12)
    assert runner.bytes == round(step_bytes)  # each tensor at its own layout's bytes, not the largest one's


class _QuantisesLargeOnly(torch.optim.Optimizer):
    """What bitsandbytes' and torchao's 8-bit AdamW do with their states, in plain torch (no peer needed): two
    moments as ``big`` codes (8-bit: plus a scale per 256 elements) for tensors of at least 4,096 elements, fp32
    moments for the smaller ones, and a 0-d step count. The step changes nothing: only the states are read."""

    def __init__(self, params, big: torch.dtype = torch.uint8, min_size: int = 4096) -> None:
        super().__init__(params, {})
        self.big, self.min_size = big, min_size

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if state:
                    continue
                large = p.numel() >= self.min_size
                state["step"] = torch.zeros(())
                for i in (1, 2):
                    state[f"state{i}"] = torch.zeros_like(p, dtype=self.big if large else torch.float32)
                    if large and self.big == torch.uint8:
                        state[f"absmax{i}"] = torch.zeros(-(-p.numel() // 256))  # a scale per started block


def test_mixed_layouts_are_counted_tensor_by_tensor():
    """A step whose params have different layouts counts each param at its own (the largest param's layout for
    every element undercounted the 8-bit peers 1.3 to 1.8 times on small-10k), and its layout says so. Both
    builders: the family's (``step_builder``) and Adam's (``optimizer_builder``, which the Adam peers use). A
    1-element param keeps its own layout (its step count and block scale have its shape, and are no states)."""
    from fused_ops.bench.cases._common import optimizer_builder
    from fused_ops.bench.cases._optim import step_builder

    shapes = [*SHAPES, (1,)]
    cpu = torch.device("cpu")
    runner = step_builder("adamw8bit", _QuantisesLargeOnly)(shapes, torch.float32, cpu)
    assert runner.layout == "fp32/int8-states 98% + fp32 2%"
    assert runner.bytes == round(INT8_ADAMW["fp32"] * BIG + FULL_ADAMW["fp32"] * (SMALL + 1))
    runner = step_builder("adamw8bit", _QuantisesLargeOnly)(shapes, torch.bfloat16, cpu)
    assert runner.layout == "bf16/int8-states 98% + bf16/fp32-states 2%"
    assert runner.bytes == round(INT8_ADAMW["bf16"] * BIG + FULL_ADAMW["bf16"] * (SMALL + 1))
    # bf16 moments for the big tensor: no entry in the adam table, so the generic rule (read + write p, m, v; read g)
    runner = optimizer_builder("adam", lambda ps: _QuantisesLargeOnly(ps, big=torch.bfloat16))(shapes, torch.float32,
                                                                                               cpu)  # fmt: skip
    assert runner.layout == "fp32/bf16-states 98% + fp32 2%"
    assert runner.bytes == (2 * 4 + 4 + 2 * (2 + 2)) * BIG + 28 * (SMALL + 1)
    # one layout throughout (every tensor quantised, as fused_ops does): named alone, counted as before
    runner = step_builder("adamw8bit", lambda ps: _QuantisesLargeOnly(ps, min_size=0))(shapes, torch.float32, cpu)
    assert runner.layout == "fp32/int8-states" and runner.bytes == round(INT8_ADAMW["fp32"] * (N + 1))


def test_peers_off_cuda_are_skipped_unless_asked():
    for module, provider in (("bitsandbytes", "bitsandbytes"), ("optimi", "optimi")):
        if _installed(module):
            with pytest.raises(_registry.Skip, match="CUDA only"):
                build_runner("lion", provider, SHAPES, torch.float32, torch.device("cpu"))


def test_our_kernels_folder_is_not_the_pypi_kernels_package(tmp_path):
    """From a source checkout the repository root is on sys.path, so ``import kernels`` (Hugging Face's package,
    which bitsandbytes tries) would find fused_ops' kernel folder: it refuses with an ImportError."""
    import fused_ops

    root = str(__import__("pathlib").Path(fused_ops.__file__).resolve().parent.parent)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "try:\n    import kernels\nexcept ImportError as e:\n    print('refused:', e)\nelse:\n    print('imported')\n"
        "import fused_ops.kernels.adam\nprint('fused_ops.kernels ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code, root], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused: " in out.stdout and "fused_ops' kernel folder" in out.stdout
    assert "fused_ops.kernels ok" in out.stdout


def test_the_pypi_kernels_package_is_found_from_a_source_checkout(tmp_path):
    """With Hugging Face's ``kernels`` installed (transformers installs it and imports it unguarded), ``import
    kernels`` from the repository root gives that package, submodules included, not our folder nor an error;
    fused_ops.kernels still imports beside it, in either order."""
    import fused_ops

    root = str(__import__("pathlib").Path(fused_ops.__file__).resolve().parent.parent)
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("WHO = 'the other kernels'\n")
    (site / "kernels" / "hub.py").write_text("X = 7\n")
    for first in ("kernels", "fused_ops"):
        code = (
            "import sys; sys.path.insert(0, sys.argv[1]); sys.path.append(sys.argv[2])\n"
            + ("import fused_ops.kernels.adam\n" if first == "fused_ops" else "")
            + "import kernels, kernels.hub\nprint(kernels.WHO, kernels.hub.X, kernels.__file__)\n"
            "import fused_ops.kernels.adam as a\nprint(a.__name__, a.__file__)\n"
        )
        out = subprocess.run([sys.executable, "-c", code, root, str(site)], capture_output=True, text=True,
                             cwd=tmp_path, timeout=120)  # fmt: skip
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0] == f"the other kernels 7 {site / 'kernels' / '__init__.py'}", out.stdout
        assert lines[1].startswith("fused_ops.kernels.adam "), out.stdout


def test_peers_run_after_every_ops_own_cases(monkeypatch):
    """The family ops' peers (torchao and bitsandbytes AdamW8bit, optimi, bitsandbytes' Lion) are providers of
    their op, and ran within it, before later ops' own cases: a torchao compile could take the budget of
    gpu_check.sh's targets run before the fp32 FusedAdamW rows its target compares with (probe 86)."""
    import io

    from fused_ops import bench
    from fused_ops.bench import suite

    called = []

    def record(op, provider, shapes, dtype, device):
        called.append((op, provider))
        raise _registry.Skip("recorded, not run")

    monkeypatch.setattr(suite, "build_runner", record)
    providers = ["fused_ops", "torch-fused", "torchao", "bitsandbytes", "optimi"]
    cfg = bench.BenchConfig(ops=["adamw8bit", "lion", "adam"], params=["tiny"], dtypes=["fp32"],
                            providers=providers, quick=True, rep_ms=1, copy_mb=1, progress=False)  # fmt: skip
    bench.run(cfg, log=io.StringIO())
    peers = {"torchao", "bitsandbytes", "optimi"}
    own = [i for i, (_, p) in enumerate(called) if p not in peers]
    theirs = [i for i, (_, p) in enumerate(called) if p in peers]
    assert own and theirs and max(own) < min(theirs), called
    assert {op for op, p in called if p in peers} >= {"adamw8bit", "lion"}, called
    assert len(called) == len(set(called)), called  # (a peer of an op listed once, not as its own and as an Adam peer)
