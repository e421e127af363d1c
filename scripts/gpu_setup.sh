#!/usr/bin/env bash
# Set up the GPU machine: mamba-ssm's Triton kernels (and, on request, the CUDA extensions).
#
#   scripts/gpu_setup.sh fetch   # here, with PyPI access: download the sources into .gpu/
#   scripts/gpu_setup.sh build   # there (no network): the fast set-up (default), about 11 s
#   FULL=1 scripts/gpu_setup.sh build   # there: also build the CUDA extensions (mamba-ssm's selective
#                                       # scan and causal-conv1d) for sm_90, minutes
#
# Fast set-up (../shared/docs/gpu.md): everything picaso-rag runs from mamba-ssm is Triton; the
# released 2.3.2.post1 only imports its compiled Mamba-1 extension unconditionally. Making that
# import optional (as upstream did, state-spaces/mamba#977) and skipping the CUDA build gives a
# pure-Python wheel in seconds. Carry .gpu to the machine.
# The full build: mamba-ssm compiles for ten architectures by default; restricting it to sm_90
# takes it to about two minutes on 16 cores. Wheels land in .gpu/wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
MAMBA_VERSION=2.3.2.post1
CONV_VERSION=1.7.0
SRC=.gpu

case "${1:-}" in
fetch)
    mkdir -p "$SRC"
    grep -qxF "/$SRC/" .git/info/exclude 2>/dev/null || echo "/$SRC/" >> .git/info/exclude
    # *_SKIP_CUDA_BUILD: preparing metadata must not try to fetch a prebuilt wheel (needs wheel, packaging)
    MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE \
        python3 -m pip download --no-deps --no-build-isolation --no-binary :all: -d "$SRC" \
        "mamba-ssm==$MAMBA_VERSION" $([ -n "${FULL:-}" ] && echo "causal-conv1d==$CONV_VERSION")
    ls -la "$SRC"
    ;;
build)
    if [ -z "${FULL:-}" ]; then  # the fast set-up: Triton kernels only, no CUDA compilation
        python3 -c "import mamba_ssm" 2>/dev/null && { echo "mamba-ssm already installed"; exit 0; }
        work=$(mktemp -d)
        tar xzf "$SRC/mamba_ssm-$MAMBA_VERSION.tar.gz" -C "$work"
        pkg="$work/mamba_ssm-$MAMBA_VERSION"
        sed -i 's/^\(\s*\)import selective_scan_cuda$/\1try:\n\1    import selective_scan_cuda\n\1except ImportError:\n\1    selective_scan_cuda = None/' \
            "$pkg/mamba_ssm/ops/selective_scan_interface.py"
        grep -q "selective_scan_cuda = None" "$pkg/mamba_ssm/ops/selective_scan_interface.py" || { echo "could not patch mamba-ssm"; exit 1; }
        (cd "$pkg" && MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE python3 -m pip wheel -q --no-deps --no-build-isolation -w "$work/wheels" .)
        python3 -m pip install -q --no-deps "$work"/wheels/mamba_ssm-*.whl
        python3 -c "import mamba_ssm; print('mamba-ssm', mamba_ssm.__version__, '(Triton kernels; no CUDA extension)')"
        exit 0
    fi
    # PACKAGES: which to build (default both; the training and the engine need only mamba-ssm)
    PACKAGES=${PACKAGES:-"causal_conv1d mamba_ssm"}
    python3 -c "import mamba_ssm" 2>/dev/null && { echo "mamba-ssm already installed"; exit 0; }
    mkdir -p "$SRC/wheels"
    work=$(mktemp -d)
    wheels_dir="$(pwd)/$SRC/wheels"
    for name in $PACKAGES; do
        if ls "$SRC"/wheels/"$name"-*.whl >/dev/null 2>&1; then
            echo "using the wheel in $SRC/wheels for $name"
            continue
        fi
        case $name in causal_conv1d) pkg="causal_conv1d-$CONV_VERSION" ;; mamba_ssm) pkg="mamba_ssm-$MAMBA_VERSION" ;; esac
        tar xzf "$SRC/$pkg.tar.gz" -C "$work"
        # build for Hopper (sm_90) only
        sed -i 's/^\(\s*\)# HACK: The compiler flag -D_GLIBCXX_USE_CXX11_ABI/\1cc_flag[:] = ["-gencode", "arch=compute_90,code=sm_90"]\n&/' "$work/$pkg/setup.py"
        grep -q 'arch=compute_90,code=sm_90"]' "$work/$pkg/setup.py" || { echo "could not patch $pkg/setup.py"; exit 1; }
        (cd "$work/$pkg" && MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE MAX_JOBS=16 \
            python3 -m pip wheel -q --no-deps --no-build-isolation -w "$wheels_dir" .)
    done
    for name in $PACKAGES; do python3 -m pip install -q --no-deps "$SRC"/wheels/"$name"-*.whl; done
    python3 -c "import mamba_ssm; print('mamba-ssm', mamba_ssm.__version__)"
    ;;
*)
    echo "usage: $0 fetch|build" >&2
    exit 2
    ;;
esac
