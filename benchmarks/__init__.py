"""pytest-benchmark tests, the GPU check script and measured results; the suite itself is fused_ops.bench."""
