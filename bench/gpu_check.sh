#!/usr/bin/env bash
# The GPU check in one command (bench/gpu_check.py says what it measures), for a GPU host that has only
# its own image: Python 3.12 with torch, timm, opencv and scipy, but none of segmentation-models-pytorch,
# rasterio, albumentations, pandas (nor mlflow, optuna or xgboost, which the check does not need).
#
#   bash bench/gpu_check.sh prepare [--dry-run] [--python-version 3.12]
#       On a CPU machine with the project's venv: download into .whl/ (git-ignored) the wheels the check
#       needs that such a host lacks, for CPython 3.12 on manylinux x86_64, no dependencies resolved:
#       the list is computed by `bench/gpu_wheels.py pins` (the requirement closure of smp, rasterio,
#       albumentations, pandas and click, less what torch, torchvision, timm, numpy, scipy and opencv
#       need, at this venv's versions). rasterio (36 MB) is brought rather than avoided: train.loop,
#       train.checkpoint and inference import data.io (rasterio) at module level, and the check runs the
#       platform's modules unchanged. Prints each wheel's size and the total; fails above 64 MiB.
#       --dry-run prints the pip command and downloads nothing.
#
#   bash bench/gpu_check.sh run [--device cuda|cpu] [--quick] [more bench/gpu_check.py options]
#       On the GPU host, from the repository root with .whl/ beside it: install the wheels whose
#       distribution this Python lacks into .whl/site (pip --no-index --no-deps --target, or unzipped
#       where there is no pip), put the repository and .whl/site on PYTHONPATH, and run
#       bench/gpu_check.py under `timeout 480` (8 min; each part writes its rows when it ends).
#       Without wheels in .whl/ it uses this Python's packages as they are (the dry run here:
#       `bash bench/gpu_check.sh run --device cpu --quick`). PYTHON picks the interpreter (default:
#       .venv/bin/python where there is one, else python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WHEELS="${GPU_CHECK_WHEELS:-.whl}"  # another folder: e.g. wheels for another Python, to try the install path
SITE="$WHEELS/site"
LIMIT_BYTES=$((64 * 1024 * 1024))
TIME_LIMIT_S=480
if [[ -x .venv/bin/python ]]; then DEFAULT_PYTHON=.venv/bin/python; else DEFAULT_PYTHON=python3; fi
PYTHON="${PYTHON:-$DEFAULT_PYTHON}"

usage() {
    sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

prepare() {
    local dry_run=0 python_version=3.12
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --dry-run) dry_run=1 ;;
            --python-version) python_version="$2"; shift ;;
            *) echo "prepare: unknown option $1" >&2; usage ;;
        esac
        shift
    done
    local abi="cp${python_version/./}"
    mapfile -t pins < <("$PYTHON" bench/gpu_wheels.py pins)
    if [[ ${#pins[@]} -eq 0 ]]; then
        echo "prepare: bench/gpu_wheels.py pins listed no wheels" >&2
        exit 1
    fi
    local command=("$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version "$python_version"
        --implementation cp --abi "$abi" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux_2_28_x86_64 -d "$WHEELS" "${pins[@]}")
    if [[ $dry_run -eq 1 ]]; then
        echo "${command[*]}"
        return 0
    fi
    mkdir -p "$WHEELS"
    rm -f "$WHEELS"/*.whl
    "${command[@]}"
    local total=0 size wheel
    for wheel in "$WHEELS"/*.whl; do
        size=$(stat -c %s "$wheel")
        total=$((total + size))
        printf '%10d  %s\n' "$size" "$(basename "$wheel")"
    done
    printf '%10d  total (%d.%02d MiB; limit 64 MiB)\n' "$total" $((total / 1048576)) $((total % 1048576 * 100 / 1048576))
    if [[ $total -gt $LIMIT_BYTES ]]; then
        echo "prepare: the wheels take $total bytes, more than the 64 MiB a GPU host can be sent" >&2
        exit 1
    fi
}

install_missing() {
    mapfile -t missing < <("$PYTHON" bench/gpu_wheels.py missing "$WHEELS")
    if [[ ${#missing[@]} -eq 0 || -z "${missing[0]}" ]]; then
        echo "every wheel in $WHEELS/ is installed in $PYTHON already"
        return 0
    fi
    echo "installing into $SITE: ${missing[*]##*/}"
    rm -rf "$SITE"
    if "$PYTHON" -m pip --version >/dev/null 2>&1; then
        "$PYTHON" -m pip install --isolated --disable-pip-version-check --no-index --no-deps --target "$SITE" \
            "${missing[@]}"
    else
        local wheel
        for wheel in "${missing[@]}"; do "$PYTHON" -m zipfile -e "$wheel" "$SITE"; done
    fi
}

run() {
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        install_missing
        export PYTHONPATH="$ROOT:$(cd "$SITE" 2>/dev/null && pwd || echo "$ROOT/$SITE")${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "no wheels in $WHEELS/: using $PYTHON's packages (a bare GPU host needs 'prepare' run on a CPU machine)"
        export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    fi
    local status=0
    timeout "$TIME_LIMIT_S" "$PYTHON" bench/gpu_check.py "$@" || status=$?
    if [[ $status -eq 124 ]]; then
        echo "gpu_check: stopped after ${TIME_LIMIT_S} s; the parts that finished wrote their rows" >&2
    fi
    return "$status"
}

case "${1:-}" in
    prepare) shift; prepare "$@" ;;
    run) shift; run "$@" ;;
    *) usage ;;
esac
