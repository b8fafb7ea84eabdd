#!/usr/bin/env bash
# The README's main job: segment real MR and CT scans the default model bundled in the package never saw (held-out
# cases of the datasets it trained on), each from one real reference, offline; writes segmentations, overlay PNGs and
# Dice into ./iris_demo_output.
# Data: IRIS_DATA, else ../shared/data (a folder holding Dataset001_Hippocampus and/or Dataset002_OASISBrain in
# nnU-Net raw format, with Dataset003_HeadNeckCT and Dataset004_AbdomenMR if present); without either, the cases
# bundled in the package (iris_nnu/demo_data).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
data="${IRIS_DATA:-$here/../shared/data}"
out="${IRIS_DEMO_OUTPUT:-$here/iris_demo_output}"
if [ -d "$data/Dataset001_Hippocampus" ] || [ -d "$data/Dataset002_OASISBrain" ]; then
    iris_demo --data "$data" -o "$out"
elif [ -n "${IRIS_DATA:-}" ]; then
    echo "quickstart: IRIS_DATA=$IRIS_DATA holds neither Dataset001_Hippocampus nor Dataset002_OASISBrain" >&2
    exit 2
else
    iris_demo -o "$out"  # the bundled held-out cases
fi
