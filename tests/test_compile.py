"""Compile tier: every Triton kernel, compiled ahead of time to a cubin for real GPUs (sm_80, sm_90), with the
ptxas that ships in the triton wheel. No GPU is needed, so CI catches what the interpreter accepts but the
compiler rejects, and register spills, without a GPU.

The interpreter must be off while compiling (conftest turns it on without CUDA), so each case runs in a child
process. One child compiles every variant, the variants of one kernel per test.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCALAR_TYPES = {
    "table_ptr": "*i64",
    "tensors_ptr": "*i64",
    "n_tensors": "i32",
    "numel_offset": "i32",
    "chunk_tensor_offset": "i32",
    "chunk_start_offset": "i32",
    "lr": "fp32",
    "lr_ptr": "*fp32",
    "one_minus_beta1": "fp32",
    "beta2": "fp32",
    "one_minus_beta2": "fp32",
    "log_beta1": "fp32",
    "log_beta2": "fp32",
    "eps": "fp32",
    "weight_decay": "fp32",
    "step": "fp32",
    "grad_scale_ptr": "*fp32",
    "found_inf_ptr": "*fp32",
    "counters_ptr": "*i32",
    "seed": "i32",
    "inv_scale": "fp32",
    "inv_scale_ptr": "*fp32",
    "partials_ptr": "*fp32",
    "p": "fp32",
}

_DT = ["tl.float32", "tl.bfloat16", "tl.float16"]
_BLOCKS = {"CHUNK_SIZE": 65536, "BLOCK_SIZE": 1024}

# kernel -> list of constexpr settings (strings are evaluated with `tl` in scope in the child)
CASES = {
    "adam._adam_kernel": [
        dict(
            PARAM_DTYPE=pd,
            GRAD_DTYPE=gd,
            AMSGRAD=a,
            MASTER=m,
            MAXIMIZE=mx,
            DECOUPLED=d,
            LR_IS_TENSOR=lt,
            STEP_IS_TENSOR=st,
            HAS_GRAD_SCALE=gs,
            HAS_FOUND_INF=fi,
            ALIGNED=al,
        )  # fmt: skip
        for pd, gd, m in [
            (_DT[0], _DT[0], False),
            (_DT[1], _DT[1], False),
            (_DT[2], _DT[2], False),
            (_DT[1], _DT[1], True),
            (_DT[1], _DT[0], True),
            (_DT[2], _DT[2], True),
        ]  # fmt: skip
        for a, mx, d, lt, st, gs, fi, al in [
            (False, False, True, False, True, False, False, True),
            (True, True, False, True, False, True, True, False),
        ]
    ],
    "cast._cast_kernel": [
        dict(SRC_DTYPE=s, DST_DTYPE=d, STOCHASTIC=sr, ALIGNED=al)
        for s in _DT
        for d in _DT
        for sr, al in ((False, True), (True, False))
        if s != d
    ],
    "flatten._flatten_kernel": [
        dict(DTYPE=d, SCATTER=sc, ALIGNED=al)
        for d in _DT + ["tl.float64"]
        for sc in (False, True)
        for al in (True, False)
    ],
    "scale._unscale_kernel": [
        dict(GRAD_DTYPE=g, OUT_DTYPE=o, HAS_OUT=ho, INV_SCALE_IS_TENSOR=t, HAS_FOUND_INF=True, ALIGNED=t)
        for g in _DT
        for o, ho in ((g, False), ("tl.float32", True))
        for t in (False, True)
    ],
    "scale._norm_partials_kernel": [dict(DTYPE=d, NORM=n, ALIGNED=n != 3) for d in _DT for n in (0, 1, 2, 3)],
}

_CHILD = textwrap.dedent(
    """
    import importlib, json, re, sys
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sys.path.insert(0, {root!r})
    import fused_ops  # binds fused_ops.kernels in a source checkout
    name, cases, scalars, blocks, archs = {args}
    module, kernel = name.split(".")
    fn = getattr(importlib.import_module("fused_ops.kernels." + module), kernel)
    out = []
    for case in cases:
        consts = {{k: eval(v, {{"tl": tl}}) if isinstance(v, str) else v for k, v in {{**case, **blocks}}.items()}}
        names = fn.arg_names
        sig = {{n: scalars[n] if n in scalars else "constexpr" for n in names}}
        for n in names:
            if sig[n] == "constexpr" and n not in consts:
                raise KeyError("no value for " + n)
        for arch in archs:
            src = ASTSource(fn=fn, signature=sig, constexprs={{(names.index(k),): v for k, v in consts.items()}})
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32))
            meta = k.metadata
            ptx = k.asm["ptx"]
            v4 = len(re.findall(r"ld\\.global[.a-zA-Z0-9:_]*\\.(?:v4\\.b32|v2\\.b64)", ptx))  # 128-bit
            out.append(dict(case=case, arch=arch, cubin=len(k.asm["cubin"]), v4_loads=v4,
                            n_regs=getattr(k, "n_regs", None), n_spills=getattr(k, "n_spills", None),
                            shared=getattr(meta, "shared", None)))
    print(json.dumps(out))
    """
)


def _compile(name, cases, archs=(90, 80)):
    code = _CHILD.format(root=ROOT, args=repr((name, cases, _SCALAR_TYPES, _BLOCKS, list(archs))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = os.path.join(os.environ.get("TMPDIR", "/tmp"), "fused_ops_compile_tier_cache")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ptxas_available():
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _ptxas_available(), reason="triton's NVIDIA backend (ptxas) is not available")
@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_compiles_for_gpus(name):
    results = _compile(name, CASES[name])
    assert len(results) == 2 * len(CASES[name])
    for r in results:
        assert r["cubin"] > 0, r
        # Spilled registers would make a memory-bound kernel slower than the bandwidth it is built for.
        if r["n_spills"] is not None:
            assert r["n_spills"] == 0, r
        if r["case"].get("ALIGNED"):
            # Full blocks of 16-byte-aligned tensors must use 128-bit loads (the bandwidth depends on it).
            assert r["v4_loads"] > 0, r
