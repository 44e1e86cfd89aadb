#!/usr/bin/env bash
# The wheels a lent GPU machine needs, fetched HERE (the lent machine has no network) into .whl/,
# which git ignores and the lending tool carries (`carry: [".whl"]`). Run it once per checkout,
# before the first lease command; next_lease.sh installs them there into /tmp/site.
#
#   bash benchmarks/lease_wheels.sh                   # tests, demo, overlap (about 20 MB)
#   bash benchmarks/lease_wheels.sh --bitsandbytes    # also the LoRA rows' 8-bit AdamW (+43 MB)
#
# The device image has no diffusers, and its transformers 5 and huggingface_hub 1 are neither
# of the two stacks the CPU tests pass with (DEVELOPERS.md, "Dependency pins that matter").
# The lease takes the transformers-4 stack, whatever this checkout's venv holds: the other
# (transformers 5.25, hub 2) pulls in a dozen wheels the image lacks (kernels, typer, httpx2,
# hf-xet, ...). torch-fidelity (and bitsandbytes) at the venv's versions; the platform is the
# image's (CPython 3.12, x86-64).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || { echo "lease_wheels: no $PY; run make test first (it builds the venv)" >&2; exit 2; }
stack=(diffusers==0.39.0 transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2 peft==0.22.0)
names=(torch-fidelity)
case ${1:-} in
--bitsandbytes) names+=(bitsandbytes) ;;
"") ;;
*) echo "usage: bash benchmarks/lease_wheels.sh [--bitsandbytes]" >&2; exit 2 ;;
esac
pins=("${stack[@]}")
for name in "${names[@]}"; do
    version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" \
        "$name" 2>/dev/null) || version=""
    pins+=("$name${version:+==$version}")  # bitsandbytes is not in the CPU venv: the newest
done
mkdir -p .git/info
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >>.git/info/exclude
mkdir -p .whl
platforms=()
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 "${platforms[@]}" -d .whl "${pins[@]}"
ls -l .whl
echo "lease_wheels: $(du -sh .whl | cut -f1) in .whl; carry it: carry [\".whl\"]"
