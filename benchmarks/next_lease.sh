#!/usr/bin/env bash
# The GPU measurements still to be made (BENCHMARKS.md, "Still to be measured"), as steps,
# most informative first. A lease is 15 minutes of device time, each machine start costs one or
# two of them, and a command may run 10: so all the steps go in one command, under one deadline
# (LEASE_S seconds in all; a step gets what its budget asks or what is left, and one that cannot
# start with enough left is skipped and says so):
#
#   LEASE_S=540 bash benchmarks/next_lease.sh tests demo overlap    # timeout_s 600
#
# tests: about 1 minute; demo: at most 300 s; overlap: 300 s (its suite budget) plus 60 s;
# skip (for a lease with time left, or the next): about 2 minutes.
#
# (Session 15 dropped the step `autotune`, generation's `compile max-autotune` row: on an H100
# its kernel search was killed after 413 s, still in the UNet's down blocks, and every kernel
# above 0.03 ms it had tuned went to cuBLAS or cuDNN, which a plain compile already calls. The
# suite keeps the row, last, for a run with time to spare.)
#
# Give the lending tool's command a time limit at least 60 s above the steps' budgets (a suite
# part gets 30 s of grace past its deadline; installing the wheels comes first). Results and
# logs go to $OUT (the lending tool's folder; default benchmarks/results/lease). Wheels in .whl/
# (the lent machine has no network, and its image lacks diffusers, transformers 4,
# bitsandbytes) are installed into /tmp/site first: `bash benchmarks/lease_wheels.sh` fetches
# them here, once per checkout, and the lending tool carries them (carry [".whl"]). Every row
# name below is checked against the suite by tests/test_gpu_suite.py.
set -o pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-benchmarks/results/lease}
PY=${PYTHON:-python3}

STEPS="tests demo overlap skip"  # the cases of step() below

usage() {
    echo "usage: [LEASE_S=SECONDS] bash benchmarks/next_lease.sh STEP... (${STEPS// /, })" >&2
    exit 2
}

# A plain grep would hold the log back until it exits: a command stopped from outside would
# leave no log.
quiet() { grep --line-buffered -v "Flax\|phantom images\|should be kept in float32"; }

# Seconds left before LEASE_S (unset: no deadline), and WANT capped to them.
left() { if [ -n "${LEASE_S:-}" ]; then echo $((LEASE_S - SECONDS)); else echo 100000; fi; }
cap() { local l; l=$(left); echo $(($1 < l ? $1 : l)); }
# enough NAME NEED: whether NEED seconds are left for step NAME (else it says so, for the log)
enough() {
    [ "$(left)" -ge "$2" ] && return 0
    echo "== $1 skipped: $(left) s left before LEASE_S=$LEASE_S, it needs $2" | tee -a "$OUT/$1.log"
    return 1
}

# suite NAME BUDGET MIN ARGS...: the GPU suite under BUDGET seconds (less if less is left, but
# at least MIN), its log in OUT/NAME.log
suite() {
    local name=$1 budget min=$3
    budget=$(cap $(($2 + 60)))
    budget=$((budget - 60))
    shift 3
    enough "$name" $((min + 60)) || return 1
    timeout $((budget + 60)) "$PY" benchmarks/gpu_suite.py --out "$OUT" --budget "$budget" "$@" \
        2>&1 | quiet | tee "$OUT/$name.log"
}

step() {
    case $1 in
    tests)
        # the generation GPU tests: fp16 on CUDA against the CPU's fp32 images (session 14
        # fixed their difference, the noise drawn in fp16), each model and attention kernel in
        # fp16, the decode overlap's CUDA stream (about 1 minute); the LoRA's: --device cpu
        # beside a GPU trains on the CPU (session 18; the 8-bit one skips without bitsandbytes);
        # the SDE samplers' Brownian trees on CUDA (session 31); the churn's noise, textual
        # inversions in fp16 and UniPC's variants on CUDA (session 32); the hires fix's pass
        # in fp16 and fp32 (session 33); its image upscalers' decode, resize and encode
        # (session 34)
        enough tests 60 || return 1
        timeout "$(cap 300)" "$PY" -m pytest -q -m gpu -rA tests/generate/test_generate.py \
            tests/generate/test_guidance.py tests/generate/test_kdiffusion_samplers.py \
            tests/generate/test_sigma_churn.py tests/generate/test_textual_inversion.py \
            tests/generate/test_unipc.py tests/generate/test_hires_fix.py \
            tests/generate/test_hires_images.py tests/lora/test_train.py \
            2>&1 | quiet | tee "$OUT/gpu-tests.log"
        ;;
    demo)
        # the whole method through the experiment runner on CUDA (no GPU run of it is recorded):
        # `fulora demo --device cuda`, 22 stages on fulora:phantom-sd (LoRA, fp16 generation,
        # audit, classifiers, evaluation, report; at most 300 s). Its log, tables, stage
        # times and config come back, not its images. First: which dependencies the image lacks.
        "$PY" -c "import importlib.util as u; print('missing:', [m for m in ('pandas', 'sklearn',
            'scipy', 'torchmetrics', 'jinja2', 'matplotlib', 'timm', 'yaml', 'safetensors',
            'accelerate', 'peft', 'diffusers', 'transformers') if u.find_spec(m) is None])" \
            2>&1 | tee "$OUT/demo.log"
        local rc
        enough demo 120 || return 1
        timeout "$(cap 300)" "$PY" -m fulora demo --device cuda --out /tmp/demo-cuda 2>&1 | quiet \
            | tee -a "$OUT/demo.log"
        rc=$?
        mkdir -p "$OUT/demo-cuda"
        cp -r /tmp/demo-cuda/results /tmp/demo-cuda/stages.csv /tmp/demo-cuda/experiment.yaml \
            "$OUT/demo-cuda/" 2>/dev/null
        return $rc
        ;;
    overlap)
        # the VAE decode beside the next batch's denoising with a compiled UNet and VAE (session
        # 14 measured it uncompiled: 1.00x at batch 8 and 32), against the same without it;
        # the pair needs the whole 300 s (session 15 gave it 250: the second row was skipped)
        suite overlap 300 250 --parts model generate --only \
            "fulora batch 32 6 batches compile + fuse_qkv" \
            "fulora batch 32 6 batches compile + fuse_qkv + decode_overlap"
        ;;
    skip)
        # A1111's Skip Early CFG and NGMS on SD1.5's architecture at 512x512, fp16, against every
        # step guided (session 30 measured them on the CPU only: 1.17x to 1.29x at 256x256)
        enough skip 150 || return 1
        timeout "$(cap 240)" "$PY" benchmarks/bench_uncond_skip.py --model sd15-random \
            --width 512 --height 512 --images 32 2>&1 | quiet | tee "$OUT/uncond-skip.log"
        ;;
    *) usage ;;
    esac
}

[ $# -gt 0 ] || usage
[[ -z ${LEASE_S:-} || $LEASE_S =~ ^[0-9]+$ ]] || usage
for name in "$@"; do  # every step name checked before any work
    [[ $name != *[[:space:]]* && " $STEPS " == *" $name "* ]] || usage
done
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 3
    export PYTHONPATH=/tmp/site:$PWD/src
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
status=0
for name in "$@"; do
    echo "== $name ($(date -u +%H:%M:%S))"
    step "$name" || status=1
done
exit $status
