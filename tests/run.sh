#!/usr/bin/env bash
# Run the whole test suite in the project's virtual environment (created on first use).
# Extra arguments go to pytest, e.g. `bash tests/run.sh -m "not slow"` or `--shared /path/to/shared`.
# Three report tests need headless Chromium (Debian: `apt-get install chromium chromium-driver`,
# as .ci/run does); without it they are skipped.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../.ci/venv.sh" '[test,convert]'
cd "$CBIR_ROOT"
exec python -m pytest -q "$@"
