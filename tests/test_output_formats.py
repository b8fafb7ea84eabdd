"""iris_predict --output_type dicom_seg / rtstruct, structure names, --statistics; iris_demo on the bundled cases."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from conftest import cli_error
from test_predict import VALUES, build_model_folder, make_case

from iris_nnu.inference.dicom_output import write_dicom_series
from iris_nnu.inference.evaluate import main as evaluate_main
from iris_nnu.inference.images import dicom_series_files, read_dicom_series
from iris_nnu.inference.predict import main
from iris_nnu.model import TaskEmbedding

NAMES = {17: "alpha", 53: "beta", 2035: "gamma"}


@pytest.fixture(scope="module")
def dicom_world(tmp_path_factory) -> dict:
    """A model, a reference folder (nnU-Net raw layout, dataset.json naming VALUES), a DICOM series query made from
    a small volume, and the same volume as NIfTI."""
    root = tmp_path_factory.mktemp("dicom_outputs")
    model = build_model_folder(root / "model", seed=5)
    raw = root / "Dataset009_Refs"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    for i in range(2):
        make_case(raw / "imagesTr" / f"r{i}_0000.nii.gz", raw / "labelsTr" / f"r{i}.nii.gz", seed=10 + i)
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MR"}, "labels": {"background": 0, **{n: v for v, n in NAMES.items()}},
        "numTraining": 2, "file_ending": ".nii.gz"}))
    nifti = root / "caseA_0000.nii.gz"
    make_case(nifti, None, seed=20)
    series = root / "dicom" / "patient7"
    write_dicom_series(sitk.ReadImage(str(nifti)), str(series))
    return {"root": root, "model": str(model), "raw": str(raw), "series": series, "nifti": nifti}


def run(world: dict, *argv: str) -> None:
    """iris_predict with the random-weight model, by the network alone unless --registration_fusion is given: the
    outputs' formats are tested here, fusion in test_alignment.py."""
    fusion = [] if "--registration_fusion" in argv else ["--registration_fusion", "off"]
    main(["-m", world["model"], "--disable_tta", *fusion, *argv])


def source_datasets(series: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f) for f in dicom_series_files(str(series))]


def rasterise(rtstruct: pydicom.Dataset, roi_number: int, image: sitk.Image) -> np.ndarray:
    """An RTSTRUCT ROI's contours filled on the series' grid (Z, Y, X)."""
    mask = np.zeros(image.GetSize()[::-1], dtype=np.uint8)
    contours = next(c for c in rtstruct.ROIContourSequence if c.ReferencedROINumber == roi_number)
    polygons: dict[int, list] = {}
    for contour in getattr(contours, "ContourSequence", []):
        points = np.array(contour.ContourData, dtype=float).reshape(-1, 3)
        index = np.array([image.TransformPhysicalPointToContinuousIndex(p.tolist()) for p in points])
        z = int(round(index[0, 2]))
        assert np.allclose(index[:, 2], z, atol=1e-3)  # planar, on a slice
        polygons.setdefault(z, []).append(np.round(index[:, :2]).astype(np.int32))
    for z, polys in polygons.items():
        layer = mask[z].copy()
        cv2.fillPoly(layer, polys, 1)
        mask[z] = layer
    return mask.astype(bool)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_dicom_seg_rtstruct_statistics_and_names(dicom_world, tmp_path):
    w = dicom_world
    names_file = tmp_path / "names.json"
    names_file.write_text(json.dumps({"2035": "gamma ray"}))  # overrides the reference folder's name
    out, task_file = tmp_path / "out", tmp_path / "task.pt"
    # at 0.5: the random-weight model's references would calibrate two of its three structures away
    run(w, "-i", str(w["series"].parent), "-o", str(out), "-r", w["raw"], "--output_type", "both", "rtstruct",
        "--label_names", str(names_file), "--statistics", "--save_task", str(task_file), "--threshold", "0.5")
    names = {**NAMES, 2035: "gamma ray"}
    nifti = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "patient7.nii.gz")))
    assert len(set(np.unique(nifti).tolist()) & set(VALUES)) >= 2  # structures segmented: the masks test something
    source = source_datasets(w["series"])

    # DICOM-SEG: read back by highdicom, referencing the series, named segments that decode to the NIfTI's masks
    seg = hd.seg.segread(str(out / "patient7_seg.dcm"))
    assert seg.FrameOfReferenceUID == source[0].FrameOfReferenceUID
    assert seg.StudyInstanceUID == source[0].StudyInstanceUID
    assert seg.PatientID == source[0].PatientID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source[0].SeriesInstanceUID
    assert seg.SeriesInstanceUID != source[0].SeriesInstanceUID
    referenced = {uid for _, _, uid in seg.get_source_image_uids()}
    assert referenced == {ds.SOPInstanceUID for ds in source}
    for frame in seg.PerFrameFunctionalGroupsSequence:  # each frame names its source slice
        assert frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID in referenced
    labels = [seg.get_segment_description(n).segment_label for n in (1, 2, 3)]
    assert labels == [names[v] for v in VALUES]
    description = seg.get_segment_description(3)
    assert "gamma ray" in description.SegmentDescription and "2035" in description.SegmentDescription
    algorithm = description.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "iris-nnu" and algorithm.AlgorithmVersion
    assert "model_id" in algorithm.AlgorithmParameters
    decoded = seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in source], segment_numbers=[1, 2, 3],
                                                combine_segments=True, assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(np.array([0, *VALUES])[decoded], nifti)

    # RTSTRUCT: named ROIs referencing the series, contours that rasterise back to the masks
    rt = pydicom.dcmread(str(out / "patient7_rtstruct.dcm"))
    assert rt.Modality == "RTSTRUCT" and rt.Manufacturer == "iris-nnu"
    assert [r.ROIName for r in rt.StructureSetROISequence] == [names[v] for v in VALUES]
    frame_ref = rt.ReferencedFrameOfReferenceSequence[0]
    assert frame_ref.FrameOfReferenceUID == source[0].FrameOfReferenceUID
    series_ref = frame_ref.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series_ref.SeriesInstanceUID == source[0].SeriesInstanceUID
    assert {c.ReferencedSOPInstanceUID for c in series_ref.ContourImageSequence} == referenced
    image = read_dicom_series(str(w["series"]))
    for number, value in enumerate(VALUES, start=1):
        mask = nifti == value
        if mask.sum() >= 50:
            assert dice(rasterise(rt, number, image), mask) > 0.9, value

    # statistics: volume = voxel count x voxel volume of the query, mean intensity inside
    stats = json.loads((out / "patient7_statistics.json").read_text())
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000
    assert stats["voxel_volume_ml"] == pytest.approx(voxel_ml)
    intensities = sitk.GetArrayFromImage(image)
    assert [r["label"] for r in stats["structures"]] == list(VALUES)
    for row in stats["structures"]:
        mask = nifti == row["label"]
        assert row["name"] == names[row["label"]]
        assert row["voxels"] == int(mask.sum())
        assert row["volume_ml"] == pytest.approx(row["voxels"] * voxel_ml)
        if row["voxels"]:
            assert row["mean_intensity"] == pytest.approx(float(intensities[mask].mean()), rel=1e-5)
        else:
            assert row["mean_intensity"] is None
    with open(out / "patient7_statistics.csv") as f:
        table = list(csv.DictReader(f))
    assert [(int(r["label"]), r["name"], int(r["voxels"])) for r in table] == \
        [(r["label"], r["name"], r["voxels"]) for r in stats["structures"]]

    # the task file keeps the names: DICOM outputs from it carry them without --label_names
    assert TaskEmbedding.load(task_file).names == names
    again = tmp_path / "again"
    run(w, "-i", str(w["series"]), "-o", str(again), "--task", str(task_file), "--output_type", "dicom_seg")
    assert sorted(p.name for p in again.iterdir()) == ["patient7_seg.dcm"]  # no NIfTI without nifti
    seg2 = hd.seg.segread(str(again / "patient7_seg.dcm"))
    assert [seg2.get_segment_description(n).segment_label for n in (1, 2, 3)] == labels


def test_dicom_output_rules(dicom_world, tmp_path, capsys):
    w = dicom_world
    # a non-DICOM query with dicom_seg: one line, exit 2, before anything is written
    out = tmp_path / "never"
    line = cli_error(capsys, main, "iris_predict", ["-m", w["model"], "-i", str(w["nifti"]), "-o", str(out),
                                                    "-r", w["raw"], "--output_type", "dicom_seg"])
    assert "DICOM-series" in line and str(w["nifti"]) in line
    assert not out.exists()
    # a DICOM output inside the query's own series folder is refused (the folder would hold two series)
    line = cli_error(capsys, main, "iris_predict", ["-m", w["model"], "-i", str(w["series"]), "-o", str(w["series"]),
                                                    "-r", w["raw"], "--output_type", "rtstruct"])
    assert "series folder" in line
    # an existing SEG is refused without --overwrite; --continue_prediction skips the finished query
    out = tmp_path / "out"
    run(w, "-i", str(w["series"]), "-o", str(out), "-r", w["raw"], "--output_type", "dicom_seg")
    before = (out / "patient7_seg.dcm").read_bytes()
    line = cli_error(capsys, main, "iris_predict", ["-m", w["model"], "-i", str(w["series"]), "-o", str(out),
                                                    "-r", w["raw"], "--output_type", "dicom_seg"])
    assert "patient7_seg.dcm" in line and "--overwrite" in line
    run(w, "-i", str(w["series"]), "-o", str(out), "-r", w["raw"], "--output_type", "dicom_seg",
        "--continue_prediction")
    assert "already segmented" in capsys.readouterr().out
    assert (out / "patient7_seg.dcm").read_bytes() == before
    # a bad --label_names file: one line
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero": "x"}))
    line = cli_error(capsys, main, "iris_predict", ["-m", w["model"], "-i", str(w["series"]), "-o", str(out),
                                                    "-r", w["raw"], "--label_names", str(bad)])
    assert "--label_names" in line


def test_nifti_statistics_in_the_query_geometry(dicom_world, tmp_path):
    w = dicom_world
    query = tmp_path / "scanB.mha"
    make_case(query, None, seed=21, shape=(24, 28, 30), spacing=(0.8, 1.2, 1.1))
    out = tmp_path / "out"
    # at 0.5: the random-weight model's references would calibrate its structures away
    run(w, "-i", str(query), "-o", str(out), "-r", w["raw"], "--statistics", "--threshold", "0.5")
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "scanB.mha")))
    stats = json.loads((out / "scanB_statistics.json").read_text())
    voxel_ml = 0.8 * 1.2 * 1.1 / 1000
    assert sum(r["voxels"] for r in stats["structures"]) == int((seg > 0).sum()) > 0
    for row in stats["structures"]:
        assert row["name"] == NAMES[row["label"]]  # from the reference folder's dataset.json
        assert row["voxels"] == int((seg == row["label"]).sum())
        assert row["volume_ml"] == pytest.approx(row["voxels"] * voxel_ml)


def test_task_names_through_select_concatenate_mean_and_old_files(tmp_path):
    tokens = [torch.randn(1, 3, 2, 4)]
    a = TaskEmbedding(tokens, [1, 2, 3], torch.ones(1, 3, dtype=torch.bool), "m", names={1: "x", 2: "y", 3: "z"})
    b = TaskEmbedding([torch.randn(1, 1, 2, 4)], [4], torch.ones(1, 1, dtype=torch.bool), "m", names={4: "w"})
    assert a.select([3, 1]).names == {3: "z", 1: "x"}
    both = TaskEmbedding.concatenate([a, b])
    assert both.names == {1: "x", 2: "y", 3: "z", 4: "w"}
    assert both.select([2, 4]).mean().to("cpu").names == {2: "y", 4: "w"}
    a.save(tmp_path / "t.pt")
    assert TaskEmbedding.load(tmp_path / "t.pt").names == {1: "x", 2: "y", 3: "z"}
    state = torch.load(tmp_path / "t.pt", weights_only=True)
    del state["names"]  # a file written before names
    torch.save(state, tmp_path / "old.pt")
    assert TaskEmbedding.load(tmp_path / "old.pt").names is None


def test_evaluate_table_names_structures_from_dataset_json(dicom_world, tmp_path, capsys):
    raw = Path(dicom_world["raw"])
    pred = tmp_path / "pred"
    pred.mkdir()
    (pred / "r0.nii.gz").write_bytes((raw / "labelsTr" / "r0.nii.gz").read_bytes())
    evaluate_main(["-ref", str(raw / "labelsTr"), "-pred", str(pred)])
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header == ["case", "alpha", "beta", "gamma"]
    summary = json.loads((pred / "summary.json").read_text())
    assert summary["label_names"] == {"17": "alpha", "53": "beta", "2035": "gamma"}


def test_demo_without_a_data_folder_runs_on_the_bundled_held_out_cases(tmp_path, monkeypatch, capsys):
    from iris_nnu import demo
    from iris_nnu.io.model_folder import read_held_out

    monkeypatch.delenv("IRIS_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # demo looks for ../shared/data beside the current folder
    assert not (tmp_path.parent / "shared" / "data").exists()
    out = tmp_path / "out"
    assert demo.main(["-o", str(out)]) == 0
    printed, warned = capsys.readouterr()
    assert "bundled" in printed
    assert "CT window" not in warned  # a real CT in HU, mostly air around the body, is not questioned
    bundled = Path(demo.BUNDLED_DATA) / "Dataset001_Hippocampus"
    model_held_out = read_held_out(None)
    held_out = model_held_out["Dataset001_Hippocampus"]
    queries = sorted(p.name[: -len("_0000.nii.gz")] for p in (bundled / "imagesTr").iterdir()
                     if p.name[: -len("_0000.nii.gz")] in held_out)
    assert len(queries) == 3
    reference = [p.name for p in (bundled / "labelsTr").iterdir() if p.name[: -len(".nii.gz")] not in held_out]
    assert len(reference) == 1  # the one training case
    summary = json.loads((out / "Dataset001_Hippocampus" / "summary.json").read_text())
    assert sorted(r["case"] for r in summary["metric_per_case"]) == queries
    for case in queries:
        seg = sitk.ReadImage(str(out / "Dataset001_Hippocampus" / f"{case}.nii.gz"))
        image = sitk.ReadImage(str(bundled / "imagesTr" / f"{case}_0000.nii.gz"))
        assert seg.GetSize() == image.GetSize() and seg.GetDirection() == image.GetDirection()
        np.testing.assert_allclose(seg.GetOrigin(), image.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(seg.GetSpacing(), image.GetSpacing(), rtol=1e-5)
        assert (sitk.GetArrayFromImage(seg) > 0).sum() > 100
        assert (out / "Dataset001_Hippocampus" / f"{case}.png").stat().st_size > 1000
        assert f"{case}: mean Dice" in printed
    assert summary["foreground_mean"]["Dice"] > 0.6  # measured 0.84 (the default model on held-out cases)
    # the bundled CT and abdominal MR, each from its benchmark reference: cases the model never trained on
    for name, structures, modality, least in (("Dataset003_HeadNeckCT", 5, "CT", 0.3),
                                              ("Dataset004_AbdomenMR", 3, "other", 0.55)):
        reference, queries = demo.DEMO_CASES[name]
        summary = json.loads((out / name / "summary.json").read_text())
        assert [r["case"] for r in summary["metric_per_case"]] == [queries[0]]
        assert queries[0] in model_held_out.get(name, [queries[0]])
        kind = "held-out" if name in model_held_out else "a dataset the default model never trained on"
        # each reference's modality read from its intensities, as iris_predict's --modality auto
        assert f"{name}: reference {reference} ({structures} structures, modality {modality}," in printed
        assert f"1 query ({kind})" in printed
        assert f"{queries[0]}: mean Dice" in printed
        # measured (stage 16, CT at the window step 0.33 its reference chose): CT 0.492 over 5 organs, 0.616 over the 4
        # labelled in the query (mandible 0.70), ANTs SyN 0.382; abdomen 0.668 (liver 0.83, kidneys at 0.99: 0.74 /
        # 0.44; at 0.5 0.590), ANTs SyN 0.537
        assert summary["foreground_mean"]["Dice"] > least, name
    # headneck_train_007 has no brainstem label: left out of the printed mean, and said so
    assert "over 4 structures" in printed and "not labelled in this query: Brainstem" in printed
    # the CT's reference hides the edges of its brainstem and right parotid (hidden_edge_share 0.48 and 0.22), the
    # abdomen's none (under 0.2)
    lines = {name: next(x for x in printed.splitlines() if f"{name}: reference" in x)
             for name in ("Dataset003_HeadNeckCT", "Dataset004_AbdomenMR")}
    assert "fused with its registration (its weight x2 for 2 structure(s) whose edges the reference hides)" in \
        lines["Dataset003_HeadNeckCT"]
    assert "fused with its registration)" in lines["Dataset004_AbdomenMR"]


def test_demo_dicom_path_writes_a_seg_of_a_bundled_case(tmp_path, monkeypatch, capsys):
    from iris_nnu import demo

    monkeypatch.delenv("IRIS_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert demo.main(["-o", str(out), "--queries", "1", "--dicom"]) == 0
    printed = capsys.readouterr().out
    assert "equals the NIfTI output: yes" in printed
    case = json.loads((Path(demo.BUNDLED_DATA) / "Dataset001_Hippocampus" / "dataset.json").read_text())[
        "iris_demo"]["queries"][0]
    series = out / "dicom" / "series" / case
    seg = hd.seg.segread(str(out / "dicom" / f"{case}_seg.dcm"))
    assert [seg.get_segment_description(n).segment_label for n in (1, 2)] == ["anterior", "posterior"]
    source = source_datasets(series)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source[0].SeriesInstanceUID
    nifti = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "dicom" / f"{case}.nii.gz")))
    decoded = seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in source], segment_numbers=[1, 2],
                                                combine_segments=True, assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(decoded, nifti)
    assert (nifti > 0).sum() > 100
    # the suggested iris_predict line reproduces the SEG's segmentation
    line = next(x for x in printed.splitlines() if "the same with iris_predict:" in x).split("iris_predict: ", 1)[1]
    main(line.split()[1:])
    again = hd.seg.segread(str(out / "dicom" / f"{case}_seg.dcm"))
    np.testing.assert_array_equal(again.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in source], segment_numbers=[1, 2], combine_segments=True,
        assert_missing_frames_are_empty=True), nifti)
