"""Pack an iris_train model folder into iris_nnu/default_model/ (the model `iris_predict` uses without -m).

Keeps plans, dataset.json, manifest and fp16 inference weights, and records the fold's validation cases as
held_out.json (the demo and benchmarks/accuracy.py take their queries from it). The model card is written by hand.

    python scripts/pack_default_model.py $nnUNet_results/Dataset900_Hippocampus_OASISBrain/IrisTrainer__IrisPlans__3d_fullres \
        --collection 900 -f 0
"""
from __future__ import annotations

import argparse
import os

from iris_nnu.inference.model_folder import DEFAULT_CHECKPOINT, DEFAULT_MODEL_FOLDER, pack_model_folder
from iris_nnu.preprocessing.collection import load_collection


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_folder", help="iris_train output folder")
    p.add_argument("--collection", required=True, help="the collection it was trained on (id or name; reads "
                                                       "its splits from nnUNet_preprocessed)")
    p.add_argument("-f", type=int, default=0, help="fold")
    p.add_argument("-chk", default=DEFAULT_CHECKPOINT, help="checkpoint to pack (written as checkpoint_final.pth)")
    p.add_argument("-o", default=DEFAULT_MODEL_FOLDER, help="destination")
    p.add_argument("--fp32", action="store_true", help="keep float32 weights")
    args = p.parse_args()
    held_out = load_collection(args.collection).fold_cases(args.f, "val")
    target = pack_model_folder(args.model_folder, args.o, args.f, args.chk, held_out, half=not args.fp32)
    print(f"packed {target} ({os.path.getsize(target) / 1e6:.1f} MB); held out: "
          + ", ".join(f"{k} {len(v)}" for k, v in held_out.items()))


if __name__ == "__main__":
    main()
