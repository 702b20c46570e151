"""Compile tier: every Triton kernel, compiled ahead of time to a cubin for real GPUs (sm_80, sm_90), with the
ptxas that ships in the triton wheel. No GPU is needed, so CI catches what the interpreter accepts but the
compiler rejects, register spills (from ``ptxas -v``), and what only the compiled code shows: the interpreter
runs programs one after another with numpy's arithmetic, so it cannot show a race between warps, a hardware
max that drops NaN, an approximate division or a block moved through shared memory. Those are asserted here
on the PTX (and, for a few variants, the SASS).

The interpreter must be off while compiling (conftest turns it on without CUDA), so each case runs in a child
process: one child per architecture (run side by side) compiles every variant of one kernel per test.
"""

import functools
import itertools
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
    "seed_ptr": "*i64",
    "inv_scale": "fp32",
    "inv_scale_ptr": "*fp32",
    "scale_and_p_ptr": "*fp64",  # (the norm kernel: max |x| and p, in float64)
    "partials_ptr": "*fp64",
    "p": "fp32",
    "signed_map_ptr": "*fp32",
    "unsigned_map_ptr": "*fp32",
}

_DT = ["tl.float32", "tl.bfloat16", "tl.float16"]
_BLOCKS = {"CHUNK_SIZE": 65536, "BLOCK_SIZE": 1024}


def _adam_cases():
    """Every combination of what decides the Adam kernel's memory accesses and their layouts (param and grad
    dtypes, master weights, amsgrad, alignment, step counts moved in the kernel): 80 variants. The five flags
    that only add a scalar or a sign alternate, so each takes both values with every dtype pair."""
    cases = []
    for pd in _DT:
        for gd in dict.fromkeys([pd, _DT[0]]):  # grads have the params' dtype, or are fp32
            for m, a, al, st in itertools.product((False, True), repeat=4):
                alt = len(cases) % 3 == 0
                cases.append(dict(PARAM_DTYPE=pd, GRAD_DTYPE=gd, AMSGRAD=a, MASTER=m, MAXIMIZE=alt, DECOUPLED=not alt,
                                  LR_IS_TENSOR=alt, STEP_IS_TENSOR=st, HAS_GRAD_SCALE=not alt, HAS_FOUND_INF=alt,
                                  ALIGNED=al))  # fmt: skip
    return cases


# kernel -> list of constexpr settings (strings are evaluated with `tl` in scope in the child)
CASES = {
    "adam._adam_kernel": _adam_cases(),
    "cast._cast_kernel": [
        dict(SRC_DTYPE=s, DST_DTYPE=d, STOCHASTIC=sr, SEED_FROM_PTR=sp, ALIGNED=al)
        for s in _DT
        for d in _DT
        for sr, sp, al in ((False, False, True), (True, False, False), (True, True, True))
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
    # The low-bit step at the launcher's 8 warps (4 elements per thread): every state kind, with fp32 tensors to
    # read 128 bits at a time (fp32 params, or fp32 masters of bf16 params), and stochastic rounding and Kahan sums
    # (16-bit tensors only: read 64 bits at a time, so not held to the 128-bit loads' assertion: ALIGNED False).
    "adam_lowbit._adam_lowbit_kernel": [
        dict(
            PARAM_DTYPE=pd,
            GRAD_DTYPE=pd,
            STATE=st,
            MASTER=m,
            PARAM_SR=sr,
            KAHAN=k,
            MAXIMIZE=mx,
            DECOUPLED=not mx,
            LR_IS_TENSOR=mx,
            HAS_GRAD_SCALE=True,
            HAS_FOUND_INF=not mx,
            ALIGNED=not (sr or k),
            QBLOCK=256,
            num_warps=8,
        )
        for pd, st, m, sr, k, mx in (
            ("tl.float32", "'int8'", False, False, False, False),
            ("tl.bfloat16", "'int8'", True, False, False, True),
            ("tl.float32", "'bf16'", False, False, False, True),
            ("tl.bfloat16", "'bf16'", True, False, False, False),
            ("tl.float32", "'fp32'", False, False, False, False),
            ("tl.bfloat16", "'int8'", False, True, False, False),
            ("tl.float16", "'int8'", False, False, True, True),
        )
    ],  # fmt: skip
}

_CHILD = textwrap.dedent(
    """
    import hashlib, importlib, json, os, re, subprocess, sys, tempfile
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    from triton.compiler import ASTSource
    sys.path.insert(0, {root!r})
    import fused_ops  # binds fused_ops.kernels in a source checkout
    name, cases, scalars, blocks, arch, sass_for = {args}
    module, kernel = name.split(".")
    fn = getattr(importlib.import_module("fused_ops.kernels." + module), kernel)
    ptxas = get_ptxas(arch).path
    cuobjdump = os.path.join(os.path.dirname(ptxas), "cuobjdump")
    tmp = tempfile.mkdtemp()
    facts_dir = os.path.join(os.environ["TRITON_CACHE_DIR"], "fused_ops_machine_facts")
    os.makedirs(facts_dir, exist_ok=True)
    BAR = r"\\b(?:bar|barrier)\\.sync\\b"
    SHARED = r"\\b(?:st\\.shared|ld\\.shared|cp\\.async|ldmatrix|stmatrix)\\b"

    def count(pattern, text):
        return len(re.findall(pattern, text))

    def machine_facts(ptx, cubin, arch, want_sass):
        # Registers and spills from `ptxas -v` on the PTX (CompiledKernel only learns them from a GPU driver)
        # and, if wanted, barrier and shared-memory instructions counted in the SASS; cached by PTX.
        key = hashlib.sha256(repr((ptx, arch, want_sass, ptxas)).encode()).hexdigest()
        path = os.path.join(facts_dir, key + ".json")
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        with open(os.path.join(tmp, "k.ptx"), "w") as f:
            f.write(ptx)
        log = subprocess.run([ptxas, "-v", "--gpu-name=" + sm_arch_from_capability(arch), f.name, "-o",
                              os.path.join(tmp, "k.o")], capture_output=True, text=True, check=True).stderr
        spills = re.search(r"(\\d+) bytes spill stores, (\\d+) bytes spill loads", log)
        regs = re.search(r"Used (\\d+) registers", log)
        facts = dict(n_regs=int(regs.group(1)) if regs else None,
                     spill_bytes=int(spills.group(1)) + int(spills.group(2)) if spills else None, sass=None)
        if want_sass and os.path.exists(cuobjdump):
            with open(os.path.join(tmp, "k.cubin"), "wb") as f:
                f.write(cubin)
            sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True).stdout
            facts["sass"] = dict(bar_sync=count(r"\\bBAR\\.SYNC", sass), sts=count(r"\\bSTS\\b", sass),
                                 lds=count(r"\\bLDS\\b", sass))
        with open(path + "." + str(os.getpid()), "w") as f:
            json.dump(facts, f)
        os.replace(f.name, path)
        return facts

    out = []
    for i, case in enumerate(cases):
        case = dict(case)
        num_warps = case.pop("num_warps", 4)
        consts = {{k: eval(v, {{"tl": tl}}) if isinstance(v, str) else v for k, v in {{**case, **blocks}}.items()}}
        names = fn.arg_names
        sig = {{n: scalars[n] if n in scalars else "constexpr" for n in names}}
        for n in names:
            if sig[n] == "constexpr" and n not in consts:
                raise KeyError("no value for " + n)
        src = ASTSource(fn=fn, signature=sig, constexprs={{(names.index(k),): v for k, v in consts.items()}})
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps))
        ptx = k.asm["ptx"]
        facts = machine_facts(ptx, k.asm["cubin"], arch, i in sass_for)
        atom = re.search(r"\\batom\\.", ptx)
        head = ptx[: atom.start()] if atom else ptx  # everything before the first atomic (the block loop)
        r = dict(case=case, arch=arch, cubin=len(k.asm["cubin"]), shared=getattr(k.metadata, "shared", None),
                 **facts,
                 v4_loads=count(r"ld\\.global[.a-zA-Z0-9:_]*\\.(?:v4\\.b32|v2\\.b64)", ptx),  # 128-bit
                 v2_loads=count(r"ld\\.global[.a-zA-Z0-9:_]*\\.v2\\.b32", ptx),  # 64-bit
                 v2_stores=count(r"st\\.global[.a-zA-Z0-9:_]*\\.v2\\.b32", ptx),
                 barriers=count(BAR, ptx), shared_ops=count(SHARED, ptx), atoms=count(r"\\batom\\.", ptx),
                 acq_rel_atoms=count(r"\\batom\\.[a-z0-9_.]*\\bacq_rel\\b", ptx),
                 barriers_before_atom=count(BAR, head), shared_ops_before_atom=count(SHARED, head),
                 approx_div=count(r"\\b(?:div\\.full|div\\.approx|rcp\\.approx)", ptx),
                 approx_sqrt=count(r"\\bsqrt\\.approx", ptx),
                 nan_max=count(r"\\bmax\\.NaN\\.f32", ptx), plain_max=count(r"\\bmax(?:\\.ftz)?\\.f32", ptx))
        out.append(r)
    print(json.dumps(out))
    """
)


def _compile(name, cases, archs=(90, 80), sass_for=()):
    """Compile ``cases`` of kernel ``name`` for each arch, one child process per arch run side by side; the
    facts each child reports per (case, arch). ``sass_for``: indices of the cases whose SASS is read too."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = os.path.join(os.environ.get("TMPDIR", "/tmp"), "fused_ops_compile_tier_cache")
    procs = []
    for arch in archs:
        code = _CHILD.format(root=ROOT, args=repr((name, cases, _SCALAR_TYPES, _BLOCKS, arch, list(sass_for))))
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
        results += json.loads(stdout.strip().splitlines()[-1])
    return results


def _ptxas_available():
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except Exception:
        return False
    return True


def _cuobjdump_available():
    from triton.backends.nvidia.compiler import get_ptxas

    return os.path.exists(os.path.join(os.path.dirname(get_ptxas(90).path), "cuobjdump"))


needs_ptxas = pytest.mark.skipif(not _ptxas_available(), reason="triton's NVIDIA backend (ptxas) is not available")


def _is_16bit(dtype):
    return dtype != "tl.float32"


@functools.cache
def _results(name):
    sass_for = ()
    if name == "adam._adam_kernel":
        # The SASS of the variants the shared-memory round trip was found in (aligned 16-bit params with fp32
        # master weights): cuobjdump costs ~0.4 s a variant, so only these.
        sass_for = [i for i, c in enumerate(CASES[name]) if c["MASTER"] and c["ALIGNED"] and
                    _is_16bit(c["PARAM_DTYPE"]) and c["AMSGRAD"] == c["STEP_IS_TENSOR"]]  # fmt: skip
    results = _compile(name, CASES[name], sass_for=sass_for)
    assert len(results) == 2 * len(CASES[name])
    return results


@needs_ptxas
@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_compiles_for_gpus(name):
    for r in _results(name):
        assert r["cubin"] > 0, r
        # Spilled registers would make a memory-bound kernel slower than the bandwidth it is built for.
        assert r["spill_bytes"] == 0, r
        if r["case"].get("ALIGNED"):
            # Full blocks of 16-byte-aligned tensors must use 128-bit loads (the bandwidth depends on it); every
            # kernel has fp32 tensors or reads 16-bit ones 128 bits at a time.
            assert r["v4_loads"] > 0, r
        # `/` on fp32 compiles to div.full.f32 (about 2 ulp); results compared with torch use tl.div_rn.
        assert r["approx_div"] == 0, r


_ADAM = "adam._adam_kernel"


@needs_ptxas
def test_adam_step_count_arrival_follows_a_barrier():
    """The step-count arrival (an atomic one thread issues) must come after a barrier: without it, another
    warp of the program may still be about to read the old count when the last arriver stores the new one."""
    for r in _results(_ADAM):
        if r["case"]["STEP_IS_TENSOR"]:
            assert r["atoms"] == 1 and r["acq_rel_atoms"] == 1, r
            assert r["barriers_before_atom"] == 1, r
        else:
            assert r["atoms"] == 0 and r["barriers"] == 0, r


@needs_ptxas
def test_adam_amsgrad_max_propagates_nan():
    """max(v_max, v) propagates NaN as torch.maximum does (max.NaN.f32); a plain max.f32 returns the other operand."""
    for r in _results(_ADAM):
        if r["case"]["AMSGRAD"]:
            assert r["nan_max"] > 0 and r["plain_max"] == 0, r


@needs_ptxas
def test_adam_divisions_and_roots_are_correctly_rounded():
    for r in _results(_ADAM):
        assert r["approx_div"] == 0 and r["approx_sqrt"] == 0, r


@needs_ptxas
def test_adam_blocks_stay_in_registers():
    """No variant moves its blocks through shared memory (a layout conversion between accesses of different
    vector widths: a bar.sync and a shared store and load per tensor and block). The only shared memory is the
    atomic's result, which one thread receives and every thread needs (4 bytes, one store, one load, one
    barrier), after the arrival barrier: both after the block loop."""
    for r in _results(_ADAM):
        c = r["case"]
        assert r["shared_ops_before_atom"] == 0, r
        if c["STEP_IS_TENSOR"]:
            assert r["barriers"] == 2 and r["shared_ops"] == 2 and r["shared"] <= 16, r
        else:
            assert r["barriers"] == 0 and r["shared_ops"] == 0 and r["shared"] == 0, r
        if r["sass"] is not None:
            n = 1 if c["STEP_IS_TENSOR"] else 0
            assert r["sass"] == dict(bar_sync=2 * n, sts=n, lds=n), r
        if c["ALIGNED"]:
            # One layout of 4 elements per thread: 16-bit tensors are read and written 64 bits at a time (fp32
            # ones 128 bits), a warp's access still 256 contiguous bytes.
            if _is_16bit(c["GRAD_DTYPE"]) or (_is_16bit(c["PARAM_DTYPE"]) and not c["MASTER"]):
                assert r["v2_loads"] > 0, r
            if _is_16bit(c["PARAM_DTYPE"]):
                assert r["v2_stores"] > 0, r
    if _cuobjdump_available():
        assert any(r["sass"] is not None for r in _results(_ADAM))


_KERNELS = ["adam._adam_kernel", "adam_lowbit._adam_lowbit_kernel", "cast._cast_kernel", "flatten._flatten_kernel",
            "lion._lion_kernel", "scale._norm_partials_kernel", "scale._unscale_kernel", "sgd._sgd_kernel"]  # fmt: skip


def test_no_kernel_specialises_the_table_offsets():
    """Triton specialises an int argument equal to 1 or divisible by 16 unless told not to: a new compile (seconds)
    whenever such a class of the table's offsets changes (e.g. the number of tensors with grads). Every kernel's
    integer table arguments are in its ``do_not_specialize`` (read from the JIT functions, interpreter off)."""
    code = textwrap.dedent(
        f"""
        import importlib, json, sys
        sys.path.insert(0, {ROOT!r})
        import fused_ops
        from fused_ops.kernels._multi_tensor import TABLE_INTS
        out = {{}}
        for name in {_KERNELS!r}:
            module, kernel = name.split(".")
            fn = getattr(importlib.import_module("fused_ops.kernels." + module), kernel)
            out[name] = [p.name for p in fn.params if p.name in TABLE_INTS and not p.do_not_specialize]
        print(json.dumps(out))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    specialised = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(specialised) == set(_KERNELS)
    assert specialised == {name: [] for name in _KERNELS}


@needs_ptxas
def test_lowbit_step_count_arrival_follows_a_barrier():
    """The low-bit kernel moves its step counts as the Adam kernel does (one acq_rel arrival, issued after a
    barrier that orders every warp's read of the count); its per-row absmax reductions add barriers of their own."""
    for r in _results("adam_lowbit._adam_lowbit_kernel"):
        assert r["atoms"] == 1 and r["acq_rel_atoms"] == 1, r
        assert r["barriers_before_atom"] >= 1, r
        assert r["approx_div"] == 0 and r["approx_sqrt"] == 0, r
