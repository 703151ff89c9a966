#!/usr/bin/env bash
# A tour of the format layer: validate the golden sample dataset, convert it to COLMAP and
# kapture and back, and validate the result. Needs nothing but this repository.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../.ci/venv.sh"
cd "$CBIR_ROOT"
out=examples/_out/formats_tour
rm -rf "$out" && mkdir -p "$out"
cp -r formats/samples/dataset "$out/dataset"

cbir info "$out/dataset"
cbir check "$out/dataset"
cbir export colmap "$out/dataset" "$out/colmap" --map sample --local sample
cbir export kapture "$out/dataset" "$out/kapture" --all
cbir import kapture "$out/kapture" "$out/roundtrip"
cbir check "$out/roundtrip"
cbir info "$out/roundtrip"
