#!/usr/bin/env bash
# Downloads the bench's peers (setup.py's `peers` extra: torchao, bitsandbytes, optimi) as wheels into
# third_party_wheels/ (git-ignored), on a machine that reaches PyPI, for a GPU machine that does not:
#
#   bash benchmarks/fetch_peers.sh          # ~47 MB; then carry third_party_wheels/ to the GPU machine, where
#   bash benchmarks/gpu_check.sh            # installs them (--no-deps, --target, outside the image's packages)
#
# The wheels are py3-none or cp310-abi3 (any CPython >= 3.10 on x86_64 Linux). --no-deps: the GPU image's own torch is what they run on (their other dependencies, numpy and packaging, are
# in the image or the peer is reported as not importable).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
mapfile -t PINS < <("$PY" - <<'PINS'
import ast, pathlib
tree = ast.parse(pathlib.Path("setup.py").read_text())
for node in ast.walk(tree):
    if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PEERS" for t in node.targets):
        print("\n".join(ast.literal_eval(node.value)))
PINS
)
[ "${#PINS[@]}" -gt 0 ] || { echo "no PEERS list in setup.py" >&2; exit 1; }
mkdir -p third_party_wheels
"$PY" -m pip download --no-deps --only-binary=:all: \
    -d third_party_wheels "${PINS[@]}"
ls -l third_party_wheels
