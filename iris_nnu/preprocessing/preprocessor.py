"""Preprocess a member dataset with its Iris plan, reusing nnU-Net's `DefaultPreprocessor.run_case`.

What differs from nnU-Net's `DefaultPreprocessor.run`: normalisation classes are resolved here (nnU-Net looks
names up only inside its own package), finished cases are skipped on a re-run, and each case is written under
a temporary name and renamed into place, the .pkl last, so an interrupted run never leaves a case that looks
complete but is not.
"""
from __future__ import annotations

import json
import os
import shutil
from multiprocessing import get_context

import numpy as np
import SimpleITK as sitk
from nnunetv2.preprocessing.preprocessors.default_preprocessor import (
    DefaultPreprocessor,
)
from nnunetv2.training.dataloading.nnunet_dataset import (
    comp_blosc2_params,
    nnUNetDatasetBlosc2,
)
from nnunetv2.utilities.plans_handling.plans_handler import (
    ConfigurationManager,
    PlansManager,
)
from tqdm import tqdm

from iris_nnu.files import write_json_atomic
from iris_nnu.orientation import orientation_code, reorient
from iris_nnu.preprocessing.normalization import get_normalizer
from iris_nnu.preprocessing.planner import CONFIGURATION

PARTIAL_FOLDER = ".partial"
# Beside the data folder, not in it: nnU-Net infers the dataset format from the file endings inside it.
SIGNATURE_SUFFIX = ".signature.json"
# Plan entries that change the preprocessed voxels; any change invalidates finished cases.
SIGNATURE_KEYS = ("spacing", "normalization_schemes", "use_mask_for_norm", "resampling_fn_data",
                  "resampling_fn_data_kwargs", "resampling_fn_seg", "resampling_fn_seg_kwargs")


class IrisPreprocessor(DefaultPreprocessor):
    """nnU-Net's preprocessor with Iris's normalisation classes."""

    def _normalize(self, data: np.ndarray, seg: np.ndarray, configuration_manager: ConfigurationManager,
                   foreground_intensity_properties_per_channel: dict) -> np.ndarray:
        for c in range(data.shape[0]):
            normalizer = get_normalizer(configuration_manager.normalization_schemes[c])(
                use_mask_for_norm=configuration_manager.use_mask_for_norm[c],
                intensityproperties=foreground_intensity_properties_per_channel[str(c)])
            data[c] = normalizer.run(data[c], seg[0])
        return data


def case_files(folder: str, case: str) -> list[str]:
    """The files of one preprocessed case, in the order they are renamed into place (the .pkl last)."""
    return [os.path.join(folder, case + ".b2nd"), os.path.join(folder, case + "_seg.b2nd"),
            os.path.join(folder, case + ".pkl")]


def is_case_complete(folder: str, case: str) -> bool:
    return all(os.path.isfile(f) for f in case_files(folder, case))


def preprocess_case(output_folder: str, case: str, images: list[str], label: str | None, plans: dict,
                    dataset_json: dict, orientation: str | None = None) -> str | None:
    """Preprocess and save one case atomically, in the voxel order `orientation` (iris_nnu/orientation.py; None: as
    stored); returns an error message naming the case, or None."""
    plans_manager = PlansManager(plans)
    configuration = plans_manager.get_configuration(CONFIGURATION)
    preprocessor = IrisPreprocessor(verbose=False)
    try:  # nnU-Net's run_case, with the reorientation between reading and preprocessing
        reader_writer = plans_manager.image_reader_writer_class()
        data, properties = reader_writer.read_images(images)
        seg = reader_writer.read_seg(label)[0] if label is not None else None
        if "sitk_stuff" in properties:
            data, properties, seg = reorient(data, properties, orientation, seg)
        data, seg, properties = preprocessor.run_case_npy(data, seg, properties, plans_manager, configuration,
                                                          dataset_json)
    except Exception as e:  # noqa: BLE001 - reported as one line naming the case's files
        return f"{images[0]} / {label}: preprocessing failed ({type(e).__name__}: {e})"
    data = data.astype(np.float32, copy=False)
    seg = seg.astype(np.int16, copy=False)
    properties.setdefault("class_locations", {})  # a case of images only: nothing labelled to sample
    patch = tuple(configuration.patch_size)
    blocks_data, chunks_data = comp_blosc2_params(data.shape, patch, data.itemsize)
    blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, patch, seg.itemsize)
    partial = os.path.join(output_folder, PARTIAL_FOLDER)
    nnUNetDatasetBlosc2.save_case(data, seg, properties, os.path.join(partial, case), chunks=chunks_data,
                                  blocks=blocks_data, chunks_seg=chunks_seg, blocks_seg=blocks_seg)
    for src, dst in zip(case_files(partial, case), case_files(output_folder, case)):
        os.replace(src, dst)
    return None


def _preprocess_case_star(args: tuple) -> str | None:
    return preprocess_case(*args)


def preprocessing_signature(plans: dict) -> dict:
    configuration = plans["configurations"][CONFIGURATION]
    return {"configuration": {k: configuration[k] for k in SIGNATURE_KEYS},
            "foreground_intensity_properties_per_channel": plans["foreground_intensity_properties_per_channel"],
            "orientation": plans.get("iris", {}).get("orientation")}


def preprocess_member(name: str, cases: dict[str, dict], plans: dict, dataset_json: dict, output_folder: str,
                      num_processes: int = 1) -> list[str]:
    """Preprocess every unfinished case of a member into `output_folder`; returns error messages (empty if ok).

    A folder made with a different plan (spacing, normalisation, resampling) is cleared first.
    """
    signature = preprocessing_signature(plans)
    signature_file = output_folder.rstrip(os.sep) + SIGNATURE_SUFFIX
    if os.path.isdir(output_folder):
        try:
            with open(signature_file) as f:
                same = json.load(f) == json.loads(json.dumps(signature))
        except (OSError, json.JSONDecodeError):
            same = False
        if not same:
            shutil.rmtree(output_folder)
    shutil.rmtree(os.path.join(output_folder, PARTIAL_FOLDER), ignore_errors=True)
    os.makedirs(os.path.join(output_folder, PARTIAL_FOLDER))
    write_json_atomic(signature, signature_file)

    todo = [c for c in cases if not is_case_complete(output_folder, c)]
    orientation = plans.get("iris", {}).get("orientation")
    if orientation is None:  # plans before the rule: one voxel order per member, its first case's
        first = sitk.ImageFileReader()
        first.SetFileName(cases[next(iter(cases))]["images"][0])
        first.ReadImageInformation()
        orientation = orientation_code(first.GetDirection())
    jobs = [(output_folder, c, cases[c]["images"], cases[c]["label"], plans, dataset_json, orientation) for c in todo]
    desc = f"{name}: preprocessing"
    errors: list[str] = []
    with tqdm(total=len(cases), initial=len(cases) - len(todo), desc=desc, unit="case") as bar:
        if num_processes > 1 and len(jobs) > 1:
            with get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
                for error in pool.imap_unordered(_preprocess_case_star, jobs):
                    if error:
                        errors.append(error)
                    bar.update()
        else:
            for job in jobs:
                error = _preprocess_case_star(job)
                if error:
                    errors.append(error)
                bar.update()
    shutil.rmtree(os.path.join(output_folder, PARTIAL_FOLDER), ignore_errors=True)
    return errors
