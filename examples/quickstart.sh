#!/usr/bin/env bash
# The README's first command: on a fresh machine, create .venv, install cbir, render a small
# courtyard with exact poses from the photos scikit-image ships (examples/make_scene.py),
# then localize its queries against its map end to end with the weight-free extractors
# (SIFT + DenseVLAD, gharm retrieval, COLMAP triangulation and PnP, config1) and print
# the evaluation table. About a minute on 2 CPU cores.
# Extra arguments go to `cbir pipeline`, e.g. R2D2 when its weights are at hand:
#   bash examples/quickstart.sh --set extract.local='"r2d2"' --set extract.weights='"../shared/weights/r2d2"'
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../.ci/venv.sh" '[example]'
cd "$CBIR_ROOT"
python examples/make_scene.py examples/_out/scene
cbir pipeline examples/scene.toml "$@"
