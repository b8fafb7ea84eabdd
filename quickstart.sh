#!/usr/bin/env bash
# The README's main job: plan and preprocess a real dataset into ./iris_workspace with iris-nnu.
# Data: IRIS_DATA (a folder holding Dataset001_Hippocampus in nnU-Net raw format), default ../shared/data.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
data="${IRIS_DATA:-$here/../shared/data}"
if [ ! -f "$data/Dataset001_Hippocampus/dataset.json" ]; then
    echo "quickstart: $data/Dataset001_Hippocampus not found; set IRIS_DATA to a folder that holds it" >&2
    exit 2
fi
work="${IRIS_WORKSPACE:-$here/iris_workspace}"
mkdir -p "$work/nnUNet_raw" "$work/nnUNet_preprocessed" "$work/nnUNet_results"
ln -sfn "$(cd "$data/Dataset001_Hippocampus" && pwd)" "$work/nnUNet_raw/Dataset001_Hippocampus"
export nnUNet_raw="$work/nnUNet_raw" nnUNet_preprocessed="$work/nnUNet_preprocessed" nnUNet_results="$work/nnUNet_results"
export nnUNet_n_proc_DA="${nnUNet_n_proc_DA:-0}"
iris_plan_and_preprocess -d 1 -np "$(nproc 2>/dev/null || echo 2)"
echo "quickstart: done; plans at $nnUNet_preprocessed/Dataset001_Hippocampus/IrisPlans.json"
