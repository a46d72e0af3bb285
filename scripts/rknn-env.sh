#!/usr/bin/env bash
# Create the separate virtual environment that runs controller/compile/rknn_worker.py.
#
# rknn-toolkit2 (x86_64 only) pins numpy<=1.26.4, protobuf<=4.25.4, onnx<=1.18 and torch<=2.4,
# which cannot live in the main venv. controller.compile.rknn runs its worker with this venv's
# python as a subprocess (JSON in/out). Lean install: the toolkit with --no-deps, then only what
# it imports, opencv-python-headless instead of opencv-python, setuptools<81 (pkg_resources).
#
# Usage: scripts/rknn-env.sh [VENV_DIR]        (default build/rknn-venv)
# Env:   RKNN_PYTHON        interpreter (default: pyenv 3.11.7, else 3.10.13, else python3.11)
#        RKNN_TOOLKIT_VERSION  default 2.5.0
#        RKNN_TORCH         auto | local | pypi | skip   (default auto). rknn.api imports torch at
#                           import time even for ONNX models. "local" installs a CPU wheel from
#                           RKNN_TORCH_WHEEL_DIR (default /opt/wheels) with --no-deps plus torch's
#                           small deps; "pypi" installs torch<=2.4.0 from PyPI (its Linux wheels are
#                           CUDA builds: several GB with the nvidia-* packages); "auto" = local if
#                           a wheel for this python is there, else pypi.
set -euo pipefail

VENV="${1:-${RKNN_VENV:-build/rknn-venv}}"
VERSION="${RKNN_TOOLKIT_VERSION:-2.5.0}"
TORCH="${RKNN_TORCH:-auto}"
WHEELS="${RKNN_TORCH_WHEEL_DIR:-/opt/wheels}"

if [ "$(uname -m)" != "x86_64" ]; then
  echo "rknn-toolkit2 only ships x86_64 wheels; this machine is $(uname -m)" >&2
  exit 2
fi

PY="${RKNN_PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in /root/.pyenv/versions/3.11.7/bin/python3.11 /root/.pyenv/versions/3.10.13/bin/python3.10 \
              "$(command -v python3.11 || true)" "$(command -v python3.10 || true)"; do
    if [ -n "$cand" ] && [ -x "$cand" ]; then PY="$cand"; break; fi
  done
fi
if [ -z "$PY" ]; then
  echo "no python 3.10/3.11 found; set RKNN_PYTHON" >&2
  exit 2
fi

echo "rknn-env: creating $VENV with $PY ($("$PY" --version 2>&1))"
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip
"${PIP[@]}" install \
  "numpy>=1.24,<=1.26.4" \
  "protobuf>=4.21.6,<=4.25.4" \
  "onnx>=1.16.1,<=1.18.0" \
  "onnxruntime>=1.17.0,<1.21" \
  "psutil>=5.9.0" \
  "ruamel.yaml>=0.17.21" \
  "scipy>=1.9.3,<1.14" \
  "tqdm>=4.64.1" \
  "fast-histogram>=0.11" \
  "opencv-python-headless>=4.5.5.64,<4.11" \
  "setuptools>=77.0.3,<81"
"${PIP[@]}" install --no-deps "rknn-toolkit2==${VERSION}"

PYTAG="cp$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')"
whl=$(ls "$WHEELS"/torch-*-"$PYTAG"-*.whl 2>/dev/null | head -n1 || true)
if [ "$TORCH" = "auto" ]; then
  if [ -n "$whl" ]; then TORCH=local; else TORCH=pypi; fi
fi
echo "rknn-env: torch from: $TORCH ${whl:-}"
case "$TORCH" in
  skip) ;;
  local)
    if [ -z "$whl" ]; then echo "no torch wheel for $PYTAG in $WHEELS" >&2; exit 2; fi
    # Newer than the toolkit's torch<=2.4 pin: the ONNX path only uses torch for utilities.
    "${PIP[@]}" install --no-deps "$whl"
    "${PIP[@]}" install filelock "typing-extensions>=4.10" "sympy>=1.13.3" "networkx>=2.5.1" \
      jinja2 "fsspec>=0.8.5" ;;
  pypi) "${PIP[@]}" install "torch>=1.10.1,<=2.4.0" ;;
  *) echo "RKNN_TORCH must be skip, local or pypi" >&2; exit 2 ;;
esac

"$VENV/bin/python" - <<'PY'
from rknn.api import RKNN
import numpy, onnx, google.protobuf
print("rknn-env: ok: rknn-toolkit2 importable; numpy", numpy.__version__, "onnx", onnx.__version__,
      "protobuf", google.protobuf.__version__)
PY
