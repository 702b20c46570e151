"""Compile tier of the SGD and Lion kernels: every variant that decides their memory accesses, compiled ahead of time
for sm_90 and sm_80 with the ptxas of the triton wheel (no GPU needed), as tests/test_compile.py does for the other
kernels (its child-process compiler is reused here, with these kernels' scalar arguments).

What the interpreter cannot show, asserted on the PTX: no register spills, no approximate division (the grad
unscale must equal torch's), no block moved through shared memory (a layout conversion between accesses of
different widths) and no barrier or atomic, 128-bit accesses to aligned fp32 tensors and 64-bit ones to aligned
16-bit tensors (the 8-byte hint of ``_chunk_pointer``).
"""

import itertools
import os
import subprocess
import sys

import pytest

from tests import test_compile as tc

_SCALARS = {**tc._SCALAR_TYPES, "momentum": "fp32", "one_minus_dampening": "fp32", "beta1": "fp32",
            "first_step": "i32"}
_DT = tc._DT
_FP32 = _DT[0]


def _sgd_cases():
    """Param and grad dtypes x momentum modes (none, nesterov, plain; the first step of new buffers is a runtime
    argument of the same variant), with buffer dtype, masters, alignment and the scalar-only flags alternating: 30
    variants."""
    cases = []
    for pd in _DT:
        for gd in dict.fromkeys([pd, _FP32]):
            for (mom, nest), master in itertools.product(((False, False), (True, True), (True, False)), (False, True)):
                alt = len(cases) % 3 == 0
                cases.append(dict(PARAM_DTYPE=pd, GRAD_DTYPE=gd, STATE_DTYPE=pd if len(cases) % 2 else _FP32,
                                  MOMENTUM=mom, NESTEROV=nest, MASTER=master, MAXIMIZE=alt,
                                  LR_IS_TENSOR=not alt, HAS_GRAD_SCALE=alt, HAS_FOUND_INF=not alt,
                                  ALIGNED=len(cases) % 5 != 4))  # fmt: skip
    return cases


def _lion_cases():
    """Param and grad dtypes x state dtype x masters, alignment and the scalar-only flags alternating: 20 variants."""
    cases = []
    for pd in _DT:
        for gd in dict.fromkeys([pd, _FP32]):
            for sd, master in itertools.product(dict.fromkeys([_FP32, pd]), (False, True)):
                alt = len(cases) % 3 == 0
                cases.append(dict(PARAM_DTYPE=pd, GRAD_DTYPE=gd, STATE_DTYPE=sd, MASTER=master, MAXIMIZE=alt,
                                  LR_IS_TENSOR=not alt, HAS_GRAD_SCALE=alt, HAS_FOUND_INF=not alt,
                                  ALIGNED=len(cases) % 5 != 4))  # fmt: skip
    return cases


CASES = {"sgd._sgd_kernel": _sgd_cases(), "lion._lion_kernel": _lion_cases()}


def _compile(name, cases, archs=(90, 80)):
    """tests/test_compile.py's ``_compile`` with these kernels' scalar types: one child per arch, side by side."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = os.path.join(os.environ.get("TMPDIR", "/tmp"), "fused_ops_compile_tier_cache")
    procs = []
    for arch in archs:
        code = tc._CHILD.format(root=tc.ROOT, args=repr((name, cases, _SCALARS, tc._BLOCKS, arch, [])))
        procs.append(subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env))  # fmt: skip
    results = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        assert proc.returncode == 0, stderr[-4000:]
        results += tc.json.loads(stdout.strip().splitlines()[-1])
    assert len(results) == len(archs) * len(cases)
    return results


_RESULTS: dict = {}


def _results(name):
    if name not in _RESULTS:
        _RESULTS[name] = _compile(name, CASES[name])
    return _RESULTS[name]


def _roles(name, c):
    """(dtype, loaded, stored) of each tensor the variant accesses."""
    param_loaded = not c["MASTER"]
    roles = [(c["PARAM_DTYPE"], param_loaded, True), (c["GRAD_DTYPE"], True, False)]
    if name.startswith("lion"):
        roles.append((c["STATE_DTYPE"], True, True))
    elif c["MOMENTUM"]:
        roles.append((c["STATE_DTYPE"], True, True))
    if c["MASTER"]:
        roles.append((_FP32, True, True))
    return roles


@tc.needs_ptxas
@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_compiles_without_spills_or_approximations(name):
    for r in _results(name):
        assert r["cubin"] > 0, r
        assert r["spill_bytes"] == 0, r  # a memory-bound kernel must not spill
        assert r["approx_div"] == 0 and r["approx_sqrt"] == 0, r  # grad / grad_scale is tl.div_rn, as torch's


@tc.needs_ptxas
@pytest.mark.parametrize("name", sorted(CASES))
def test_blocks_stay_in_registers(name):
    """No shared memory, barrier or atomic in any variant: one layout for every access of a block."""
    for r in _results(name):
        assert r["shared_ops"] == 0 and r["barriers"] == 0 and r["atoms"] == 0 and not r["shared"], r


@tc.needs_ptxas
@pytest.mark.parametrize("name", sorted(CASES))
def test_aligned_variants_use_wide_accesses(name):
    """Aligned fp32 tensors are read 128 bits at a time; aligned 16-bit tensors 64 bits at a time (4 elements per
    thread, as the fp32 ones), and 16-bit params are written 64 bits at a time."""
    seen = 0
    for r in _results(name):
        c = r["case"]
        if not c["ALIGNED"]:
            continue
        seen += 1
        roles = _roles(name, c)
        if any(dt == _FP32 and loaded for dt, loaded, _ in roles):
            assert r["v4_loads"] > 0, r
        if any(dt != _FP32 and loaded for dt, loaded, _ in roles):
            assert r["v2_loads"] > 0, r
        if c["PARAM_DTYPE"] != _FP32:
            assert r["v2_stores"] > 0, r
    assert seen > 0
