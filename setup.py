from setuptools import setup

PEERS = ["torchao==0.18.0", "bitsandbytes==0.50.2", "torch-optimi==0.3.3"]

setup(
    name="fused_ops",
    version="0.1.0",
    description="Triton kernels for the optimizer hot path: fused multi-tensor Adam/AdamW, drop-in for torch.optim",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ is installed as fused_ops.kernels: a different PyPI project owns the top-level name "kernels".
    packages=[
        "fused_ops",
        "fused_ops.bench",
        "fused_ops.bench.cases",
        "fused_ops.distributed",
        "fused_ops.kernels",
        "fused_ops.optim",
    ],
    package_dir={"fused_ops": "fused_ops", "fused_ops.kernels": "kernels"},
    # triton is not pinned: torch's CUDA wheels pin their own. torch 2.7: the custom ops' schemas are inferred from
    # builtin ``list[Tensor]`` annotations, which torch 2.6 refused (pytorch/pytorch#146594); tested on 2.11 (the GPU
    # image) and 2.13 (CI).
    install_requires=["torch>=2.7", "numpy", "triton; platform_system == 'Linux'"],
    # peers: the other libraries' optimizers that the bench compares against (on CUDA; tests/test_bench_peers.py runs
    # their providers on CPU), at the versions the tests count their state layouts for.
    extras_require={
        "test": ["pytest", "pytest-xdist", "pytest-benchmark", "hypothesis", "tqdm", "matplotlib", *PEERS],
        "bench": ["tqdm", "matplotlib"],
        "peers": PEERS,
    },
    entry_points={"console_scripts": ["fused-ops=fused_ops.__main__:main"]},
)
