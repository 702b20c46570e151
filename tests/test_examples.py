"""examples/ runs: train_gpt.py on one process, with FSDP2 on 2 gloo ranks, and FSDP2 + tensor parallel on a 1x2
mesh, each for a few steps on CPU in a subprocess (as a user launches it); the loss falls in every mode and
matches torch.optim.AdamW(fused=True)'s run on one process. The Python in the Markdown examples (Hugging Face
Trainer, Lightning: libraries not installed here) is only compiled."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SCRIPT = EXAMPLES / "train_gpt.py"
STEPS = 20
LOSS_LINE = re.compile(r"^step\s+(\d+) loss ([-+0-9.eEinfa]+) ", re.M)


def _run(args: list[str], timeout: float, nproc: int = 0) -> tuple[list[tuple[int, float]], str]:
    """Run train_gpt.py (under torch.distributed.run when ``nproc``); return its (step, loss) lines and output.
    The run gets its own process group, so a timeout ends the launcher and its workers together."""
    cmd = [sys.executable]
    if nproc:
        # --standalone: the rendezvous store binds port 0 itself, so no port found free here can be taken first.
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += [str(SCRIPT), "--steps", str(STEPS), "--log-every", "5", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
               os.environ.get("PYTHONPATH")])))  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} ran past {timeout} s; output:\n{out[-4000:]}")
    assert proc.returncode == 0, f"{' '.join(cmd)} exited with {proc.returncode}; output:\n{out[-4000:]}"
    losses = [(int(s), float(v)) for s, v in LOSS_LINE.findall(out)]
    assert [s for s, _ in losses] == [0, 5, 10, 15, STEPS - 1], f"unexpected log lines:\n{out[-4000:]}"
    return losses, out


def _assert_learns(losses: list[tuple[int, float]], out: str) -> None:
    values = [v for _, v in losses]
    assert all(math.isfinite(v) for v in values), out
    assert values[0] > 3.0, f"the first loss should be about ln(vocab) = 3.3: {values}"
    assert values[-1] < values[0] - 0.8, f"the loss did not fall: {values}"
    assert values[-1] < min(values[:-2]), f"the loss did not keep falling: {values}"


@pytest.fixture(scope="module")
def single():
    return _run(["--mode", "single"], timeout=120)


def test_single_device_learns(single):
    losses, out = single
    _assert_learns(losses, out)
    assert "optimizer=FusedAdamW" in out and "device=cpu" in out


def test_single_device_matches_torch_adamw(single):
    torch_losses, out = _run(["--mode", "single", "--optimizer", "torch"], timeout=120)
    assert "optimizer=AdamW" in out
    for (step, ours), (_, theirs) in zip(single[0], torch_losses):
        assert abs(ours - theirs) < 2e-3, f"step {step}: FusedAdamW {ours} vs torch AdamW {theirs}"


@pytest.mark.distributed
def test_fsdp2_two_ranks_learns():
    losses, out = _run(["--mode", "fsdp2"], timeout=240, nproc=2)
    _assert_learns(losses, out)
    assert "mode=fsdp2 world=2 dp=2 tp=1" in out


@pytest.mark.distributed
def test_fsdp2_tensor_parallel_1x2_mesh_matches_one_device(single):
    """dp=1, tp=2: the same batches and initial weights as the one-process run, so the same losses (up to
    the order of the tensor-parallel sums)."""
    losses, out = _run(["--mode", "fsdp2_tp", "--tp", "2"], timeout=240, nproc=2)
    _assert_learns(losses, out)
    assert "mode=fsdp2_tp world=2 dp=1 tp=2" in out
    for (step, ours), (_, ref) in zip(losses, single[0]):
        assert abs(ours - ref) < 2e-3, f"step {step}: FSDP2+TP {ours} vs one device {ref}"


@pytest.mark.parametrize("name", ["hf_trainer.md", "lightning.md"])
def test_markdown_examples_compile(name):
    text = (EXAMPLES / name).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, f"no python code in {name}"
    for i, block in enumerate(blocks):
        compile(block, f"{name}[{i}]", "exec")  # syntax only: transformers and lightning are not installed


def test_readme_links_examples():
    readme = (ROOT / "README.md").read_text()
    for name in ("examples/README.md", "examples/train_gpt.py", "examples/hf_trainer.md", "examples/lightning.md"):
        assert name in readme, f"README.md does not link {name}"
    index = (EXAMPLES / "README.md").read_text()
    for name in ("train_gpt.py", "hf_trainer.md", "lightning.md"):
        assert name in index
