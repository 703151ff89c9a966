#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install cbir into it.
# Usage: source .ci/venv.sh [EXTRAS]     e.g. `source .ci/venv.sh '[test]'`
# torch is installed first from `torch==2.13.0`, so that no CUDA build is pulled in.
set -euo pipefail
CBIR_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CBIR_VENV="${CBIR_VENV:-$CBIR_ROOT/.venv}"
extras="${1:-}"
if [ ! -x "$CBIR_VENV/bin/python" ]; then
  python3 -m venv "$CBIR_VENV"
fi
stamp="$CBIR_VENV/.cbir-installed${extras}"
if [ ! -f "$stamp" ] || [ "$CBIR_ROOT/pyproject.toml" -nt "$stamp" ] || [ "${BASH_SOURCE[0]}" -nt "$stamp" ]; then
  echo "installing cbir${extras} into $CBIR_VENV" >&2
  "$CBIR_VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  "$CBIR_VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0"
  "$CBIR_VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$CBIR_ROOT${extras}"
  if [[ "$extras" == *test* ]]; then
    # the peer whose late fusion the tests compare against; --no-deps: its fusion and pairing
    # modules need only kapture and numpy, and its full requirements (cvxpy, numba,
    # opencv-python) would clash with opencv-python-headless
    "$CBIR_VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "kapture-localization==1.1.10"
  fi
  if [[ "$extras" == *test* && "$extras" == *convert* ]]; then
    # Keras 2 for TensorFlow >= 2.16, the Keras of the official DELG training code: the test that
    # exports DELG as the official script does needs it. --no-deps: it requires the package
    # `tensorflow`, which tensorflow-cpu provides under another name
    tf_version="$("$CBIR_VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("tensorflow-cpu"))')"
    "$CBIR_VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "tf-keras~=${tf_version%.*}.0"
  fi
  touch "$stamp"
fi
export PATH="$CBIR_VENV/bin:$PATH"
