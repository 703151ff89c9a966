#!/usr/bin/env bash
# The README's first command: on a fresh machine, create .venv, install cbir, render a small
# courtyard with exact poses from the photos scikit-image ships (examples/make_scene.py),
# then localize its queries against its map end to end with the weight-free extractors
# (SIFT + DenseVLAD, gharm retrieval, COLMAP triangulation and PnP, config1) and print
# the evaluation table, and write the run's report (examples/_out/scene/query/cbir/localization/
# <name>/report.html: open it in a browser). With Debian's chromium installed, also a
# screenshot of the report (examples/_out/report.png: the README's picture).
# About a minute on 2 CPU cores.
# Extra arguments go to `cbir pipeline`, e.g. R2D2 when its weights are at hand:
#   bash examples/quickstart.sh --set extract.local='"r2d2"' --set extract.weights='"../shared/weights/r2d2"'
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../.ci/venv.sh" '[example]'
cd "$CBIR_ROOT"
python examples/make_scene.py examples/_out/scene
cbir pipeline examples/scene.toml "$@"
report=$(ls -d examples/_out/scene/query/cbir/localization/*/report.html | head -n 1)
echo "report: $report"
if command -v chromium >/dev/null; then
  chromium --headless --no-sandbox --enable-unsafe-swiftshader --use-angle=swiftshader --hide-scrollbars \
    --window-size=1280,1500 --virtual-time-budget=20000 --screenshot="$PWD/examples/_out/report.png" \
    "file://$PWD/$report" 2>/dev/null && echo "screenshot: examples/_out/report.png"
fi
