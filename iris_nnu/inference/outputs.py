"""iris_predict's outputs beside the segmentation: --output_type (NIfTI, DICOM-SEG, RTSTRUCT) and --statistics."""
from __future__ import annotations

import os
from typing import Sequence

from nnunetv2.imageio.base_reader_writer import BaseReaderWriter
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

from iris_nnu.inference.dicom_output import RTSTRUCT_SUFFIX, SEG_SUFFIX, write_dicom_seg, write_rtstruct
from iris_nnu.inference.images import Query, read_images, read_label, reader_writer_for
from iris_nnu.inference.names import structure_name
from iris_nnu.inference.statistics import CSV_SUFFIX, JSON_SUFFIX, structure_statistics, write_statistics

OUTPUT_TYPES = ("nifti", "dicom_seg", "rtstruct", "both")


def resolve_output_types(values: Sequence[str]) -> tuple[str, ...]:
    """--output_type values as the files kinds written: 'both' is nifti + dicom_seg."""
    kinds = {kind for value in values for kind in (("nifti", "dicom_seg") if value == "both" else (value,))}
    return tuple(k for k in ("nifti", "dicom_seg", "rtstruct") if k in kinds)


def query_output_files(query: Query, output_folder: str, types: Sequence[str], statistics: bool) -> list[str]:
    """The files of one query besides its probabilities, in the order they are written (the last marks it done)."""
    target = os.path.join(output_folder, query.name)
    return ([target + query.output_ending] if "nifti" in types else []) + \
        ([target + CSV_SUFFIX, target + JSON_SUFFIX] if statistics else []) + \
        ([target + RTSTRUCT_SUFFIX] if "rtstruct" in types else []) + \
        ([target + SEG_SUFFIX] if "dicom_seg" in types else [])


def write_query_outputs(query: Query, segmentation_file: str, output_folder: str, types: Sequence[str],
                        statistics: bool, classes: Sequence[int], names: dict[int, str] | None, model_id: str,
                        description: str, reader_writer_class: type[BaseReaderWriter]) -> None:
    """Statistics and DICOM outputs of a query from its written segmentation (in the query's geometry)."""
    dicom = os.path.isdir(query.images[0])
    reader_writer = SimpleITKIO() if dicom else reader_writer_for(query.images[0], reader_writer_class)
    labels = read_label(segmentation_file, reader_writer)[0]
    named = {int(c): structure_name(c, names) for c in classes}
    target = os.path.join(output_folder, query.name)
    if statistics:
        image, properties = read_images(query.images, reader_writer)
        write_statistics(structure_statistics(labels, image, properties["spacing"], classes, named), target,
                         properties["spacing"])
    if "rtstruct" in types:
        write_rtstruct(labels, query.images[0], target + RTSTRUCT_SUFFIX, classes, named, model_id, description)
    if "dicom_seg" in types:
        write_dicom_seg(labels, query.images[0], target + SEG_SUFFIX, classes, named, model_id, description)
