#!/usr/bin/env bash
# One set-up path for a fresh machine (only PyPI reachable) and for an existing Detectron2 install.
#
#   scripts/setup.sh            create ./.venv (Python 3.11) and install everything into it
#   VENV=/path scripts/setup.sh use another virtual environment
#   NO_VENV=1 scripts/setup.sh  install into the current interpreter (e.g. a conda env that already
#                               has torch + an official detectron2 build with CUDA ops): torch and
#                               detectron2 are left alone when they import.
#
# Re-running is fast: each step is skipped when what it installs is already importable.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${VENV:-$ROOT/.venv}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
D2_DIST=${D2_DIST:-sal-detectron2==0.7.2}

say() { echo "[setup] $*"; }

if [ "${NO_VENV:-0}" = "1" ]; then
  PY=${PYTHON:-python3}
else
  BASE_PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtual environment $VENV with $BASE_PY"
    "$BASE_PY" -m venv "$VENV"
  fi
  PY=$VENV/bin/python
fi
PIP="$PY -m pip --disable-pip-version-check"
SITE=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
STAMP=$SITE/.retrieval_ext_setup

# Fast path: nothing changed since the last successful run.
want=$(cat requirements.txt requirements-dev.txt setup.py scripts/setup.sh | sha1sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && $PY -c "import torch, detectron2, retrieval_ext" 2>/dev/null; then
  say "up to date ($PY)"
  exit 0
fi

if $PY -c "import torch, torchvision" 2>/dev/null; then
  say "torch $($PY -c 'import torch; print(torch.__version__)') already installed, left alone"
else
  say "installing $TORCH_SPEC"
  $PIP install -q $TORCH_SPEC
fi

# detectron2: keep any working install (an official source build with compiled ops included).
if $PY -c "import detectron2, detectron2.modeling" 2>/dev/null; then
  say "detectron2 $($PY -c 'import detectron2; print(detectron2.__version__)') already importable, left alone"
else
  # Not published on PyPI: sal-detectron2 is upstream detectron2 (commit a59f056) packaged as a
  # cp310 wheel. Its Python code runs on 3.11; its compiled _C is not needed (Faster R-CNN uses
  # torchvision's roi_align and nms) and would not load, so it is removed.
  say "installing detectron2 from $D2_DIST (pure-Python part) into $SITE"
  tmp=$(mktemp -d)
  $PIP install -q --no-deps --only-binary=:all: --python-version 3.10 --implementation cp \
    --target "$tmp" "$D2_DIST"
  rm -rf "$tmp"/tools "$tmp"/detectron2/_C*.so "$tmp"/bin
  for d in "$tmp"/*; do
    name=$(basename "$d")
    rm -rf "$SITE/$name"
    mv "$d" "$SITE/$name"
  done
  rm -rf "$tmp"
fi

say "installing dependencies"
$PIP install -q -r requirements.txt -r requirements-dev.txt
say "installing retrieval_ext (editable)"
$PIP install -q --no-deps --no-build-isolation -e .
$PY -c "import torch, detectron2, retrieval_ext; print('[setup] torch', torch.__version__, '| detectron2', detectron2.__version__, '| retrieval_ext', retrieval_ext.__version__)"
echo "$want" > "$STAMP"
