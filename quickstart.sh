#!/usr/bin/env bash
# The README's main job: segment held-out real MRI scans with the default model bundled in the package, each from
# one real reference, offline; writes segmentations, overlay PNGs and Dice into ./iris_demo_output.
# Data: IRIS_DATA (a folder holding Dataset001_Hippocampus and/or Dataset002_OASISBrain in nnU-Net raw format),
# default ../shared/data.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
data="${IRIS_DATA:-$here/../shared/data}"
if [ ! -d "$data/Dataset001_Hippocampus" ] && [ ! -d "$data/Dataset002_OASISBrain" ]; then
    echo "quickstart: $data holds neither Dataset001_Hippocampus nor Dataset002_OASISBrain; set IRIS_DATA" >&2
    exit 2
fi
iris_demo --data "$data" -o "${IRIS_DEMO_OUTPUT:-$here/iris_demo_output}"
