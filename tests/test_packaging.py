"""The install story: README quickstart, .ci/run and setup.py agree."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _quickstart_lines():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quickstart\s+```bash\n(.*?)```", readme, re.S)
    assert block, "README.md has no Quickstart bash block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_quickstart_has_two_commands_main_job_and_tests():
    lines = _quickstart_lines()
    assert len(lines) == 2
    assert "python -m fused_ops bench --quick" in lines[0]
    assert "pytest" in lines[1]
    for line in lines:
        assert "torch==2.13.0" in line, "an unpinned torch would pull a multi-GB CUDA build"


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _quickstart_lines()[1] in ci


def test_setup_installs_kernels_as_fused_ops_kernels_and_does_not_pin_triton():
    setup = (ROOT / "setup.py").read_text()
    assert '"fused_ops.kernels": "kernels"' in setup
    assert not re.search(r"triton\s*[=<>~]=", setup)


def test_kernels_import_as_fused_ops_kernels():
    from fused_ops.kernels import adam

    import fused_ops

    assert adam.__name__ == "fused_ops.kernels.adam"
    assert hasattr(fused_ops, "FusedAdamW")


def test_readme_performance_section_is_generated(monkeypatch):
    """The Performance section is what `python -m fused_ops report` makes from benchmarks/results/."""
    from fused_ops.__main__ import main

    monkeypatch.chdir(ROOT)
    assert main(["report", "--check"]) == 0


def test_public_modules_export_only_their_api():
    """``from fused_ops.<module> import *`` gives the documented API, not helpers or the modules they import."""
    import fused_ops

    expected = {
        "functional": {"adam_", "flatten", "unflatten", "unflatten_copy_", "cast_", "unscale_", "grad_norm",
                       "clip_grad_norm_"},
        "precision": {"DynamicLossScaler", "LossScalerWarning"},
        "buffers": {"Bucket", "FlatBuffer"},
        "autograd": {"CastFunction", "FlattenFunction", "cast", "flatten"},
    }  # fmt: skip
    for name, api in expected.items():
        namespace: dict = {}
        exec(f"from fused_ops.{name} import *", namespace)
        assert set(namespace) - {"__builtins__"} == api, name
        module = getattr(fused_ops, name)
        assert all(callable(getattr(module, n)) for n in api)
