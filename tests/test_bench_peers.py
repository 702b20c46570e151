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


# (op, provider, module, dtype, expected layout, expected state bytes per param)
CASES = [
    ("adamw8bit", "torchao", "torchao", "fp32", "fp32/int8-states", _torchao_8bit(4)),
    ("adamw8bit", "bitsandbytes", "bitsandbytes", "fp32", "fp32/int8-states", _bnb_8bit(2)),
    ("adamw8bit", "bitsandbytes", "bitsandbytes", "bf16", "bf16/int8-states", _bnb_8bit(2)),
    # torchao's AdamW(bf16_stochastic_round=True) keeps the moments in the param's dtype; + a 0-d fp32 step each
    ("adamw_bf16_sr", "torchao", "torchao", "bf16", "bf16/bf16-states", (2 * 2 * N + 3 * 4) / N),
    # optimi: bf16 moments and a bf16 Kahan compensation buffer, no step tensors
    ("adamw_bf16_sr", "optimi", "optimi", "bf16", "bf16/bf16-states+kahan", 3 * 2),
    ("lion", "bitsandbytes", "bitsandbytes", "fp32", "fp32", 4),
    ("lion", "bitsandbytes-8bit", "bitsandbytes", "fp32", "fp32/int8-states", _bnb_8bit(1)),
    ("lion", "optimi", "optimi", "fp32", "fp32", 4),  # (no Kahan buffer on fp32 params: its key holds None)
    ("lion", "optimi", "optimi", "bf16", "bf16/bf16-states+kahan", 2 * 2),
    ("adam", "bitsandbytes", "bitsandbytes", "fp32", "fp32", 8),
]


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.fixture
def peers_on_cpu():
    _registry._PEERS_ON_CPU[0] = True
    try:
        yield
    finally:
        _registry._PEERS_ON_CPU[0] = False


@pytest.mark.parametrize("op, provider, module, dtype, layout, state_bytes", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[3]}" for c in CASES])  # fmt: skip
def test_peer_builds_steps_and_reports_its_layout(peers_on_cpu, op, provider, module, dtype, layout, state_bytes):
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
    assert runner.layout == layout
    assert runner.state_bytes_per_param == pytest.approx(state_bytes, rel=1e-12)
    expected_bytes = _registry.BYTES_PER_ELEMENT.get((op, layout))
    if expected_bytes is not None:  # the bytes of the op's definition for this layout
        assert runner.bytes == round(expected_bytes * N)


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
