"""The napari plugin (iris_nnu/napari): its reader, its glue, and the dock widget run on the bundled default model.

Skipped without the napari extra (`pip install -e ".[napari]"`). napari draws every layer with OpenGL, which Qt's
offscreen platform does not offer without a display (adding a layer fails in vispy): with no DISPLAY these tests start
Xvfb, a virtual X screen (nothing appears anywhere), and use Qt's xcb platform on it; with neither a display nor
Xvfb the viewer tests skip (fail under CI, whose .ci/run installs Xvfb). IRIS_NAPARI_SCREENSHOT=PATH also writes the
README's screenshot (docs/napari_plugin.png) from the widget test.
"""
from __future__ import annotations

import atexit
import os
import select
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

napari = pytest.importorskip("napari")
pytest.importorskip("pytestqt")

import SimpleITK as sitk  # noqa: E402

from iris_nnu.errors import IrisInputError  # noqa: E402
from iris_nnu.inference import predict as iris_predict  # noqa: E402
from iris_nnu.napari import reader, segment  # noqa: E402

DEMO = reader.DEMO_FOLDER
REFERENCE = "hippocampus_004"
QUERY = "hippocampus_026"
WIDGET = "Iris: segment from references"
PROBE = ("import napari, numpy; v = napari.Viewer(show=False); v.add_image(numpy.zeros((4, 4, 4), 'float32')); "
         "v.screenshot(canvas_only=False); v.close()")


def image_path(case: str) -> str:
    return os.path.join(DEMO, "imagesTr", f"{case}_0000.nii.gz")


def label_path(case: str) -> str:
    return os.path.join(DEMO, "labelsTr", f"{case}.nii.gz")


def _die_with_parent() -> None:
    """In the Xvfb child: end when this test process ends (Linux), after Qt has let go of the display."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _start_xvfb() -> str | None:
    """Start Xvfb on a free display for the rest of this process; its display number, None when it does not start."""
    read, write = os.pipe()
    linux = sys.platform.startswith("linux")
    process = subprocess.Popen([shutil.which("Xvfb"), "-displayfd", str(write), "-screen", "0", "1920x1200x24",
                                "-nolisten", "tcp"], pass_fds=(write,), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent if linux else None)
    os.close(write)
    number = b""
    while select.select([read], [], [], 20)[0]:
        chunk = os.read(read, 16)
        if not chunk:
            break
        number += chunk
        if number.endswith(b"\n"):
            break
    os.close(read)
    if not number.strip().isdigit():
        process.kill()
        return None
    if not linux:
        atexit.register(process.terminate)
    return number.strip().decode()


def _display() -> str | None:
    """Make Qt draw with OpenGL (the display, else Xvfb's); None when it can, else why not. A subprocess tries first:
    Qt aborts the whole process when its platform cannot start."""
    if not os.environ.get("DISPLAY"):
        if not shutil.which("Xvfb"):
            return "napari draws with OpenGL: these tests need a display or Xvfb (apt-get install xvfb)"
        number = _start_xvfb()
        if number is None:
            return "Xvfb did not start"
        os.environ["DISPLAY"] = f":{number}"
    os.environ["QT_QPA_PLATFORM"] = "xcb"
    probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        lines = [line for line in (probe.stderr or "").splitlines() if line.strip()]
        return (f"napari cannot draw on display {os.environ['DISPLAY']} (Qt xcb; Debian packages libxcb-cursor0 "
                f"libxcb-icccm4 libxcb-keysyms1 may be missing): {lines[-1] if lines else probe.returncode}")
    return None


@pytest.fixture(scope="session")
def drawing() -> None:
    """A display Qt draws on with OpenGL, set up before pytest-qt's QApplication exists (the viewer fixture asks for
    this first)."""
    reason = _display()
    if reason:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(reason)


@pytest.fixture
def viewer(drawing, make_napari_viewer):
    return make_napari_viewer()


def open_layer(viewer, path: str):
    layers = viewer.open(path, plugin="iris-nnu")
    assert len(layers) == 1
    return layers[0]


def iris_widget(viewer):
    _, widget = viewer.window.add_plugin_dock_widget("iris-nnu", WIDGET)
    return widget


def wait_for(qtbot, widget, timeout_s: float = 300) -> None:
    qtbot.waitUntil(lambda: widget.worker is None, timeout=int(timeout_s * 1000))


def last_error() -> str:
    from napari.utils.notifications import NotificationSeverity, notification_manager

    errors = [n for n in notification_manager.records if n.severity == NotificationSeverity.ERROR]
    return errors[-1].message if errors else ""


# ------------------------------------------------------------------------------------------ without a viewer
def test_plugin_modules_import_without_napari_or_qt():
    """The reader and the glue are plain Python: importing them (and iris_nnu) loads neither napari nor Qt."""
    code = ("import sys, iris_nnu, iris_nnu.inference, iris_nnu.napari.reader, iris_nnu.napari.segment; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('napari', 'qtpy', 'PySide6', 'PyQt5', 'PyQt6')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_reader_keeps_geometry_and_names(tmp_path):
    from iris_nnu.inference.dicom_output import write_dicom_series

    image = sitk.ReadImage(image_path(QUERY))
    data, kwargs, kind = reader.get_reader(image_path(QUERY))(image_path(QUERY))[0]
    assert kind == "image" and kwargs["name"] == f"{QUERY}_0000"
    np.testing.assert_array_equal(data, sitk.GetArrayFromImage(image))
    assert kwargs["scale"] == image.GetSpacing()[::-1] and kwargs["translate"] == image.GetOrigin()[::-1]
    assert kwargs["metadata"][reader.SOURCE_KEY] == image_path(QUERY)
    assert kwargs["metadata"][reader.GEOMETRY_KEY]["direction"] == image.GetDirection()

    labels, label_kwargs, label_kind = reader.read_layers(label_path(REFERENCE))[0]
    assert label_kind == "labels" and set(np.unique(labels)) == {0, 1, 2}
    assert label_kwargs["metadata"][reader.NAMES_KEY] == {1: "anterior", 2: "posterior"}
    assert label_kwargs["features"]["name"] == ["background", "anterior", "posterior"]

    series = tmp_path / "series"
    files = write_dicom_series(image, str(series))
    for path in (str(series), files[0]):  # the folder, or one of its files: the whole series
        dicom, dicom_kwargs, dicom_kind = reader.get_reader(path)(path)[0]
        assert dicom_kind == "image" and dicom.shape == data.shape
        np.testing.assert_allclose(dicom, data, atol=1e-3 * np.abs(data).max())
        np.testing.assert_allclose(dicom_kwargs["scale"], kwargs["scale"], atol=1e-4)
        np.testing.assert_allclose(dicom_kwargs["translate"], kwargs["translate"], atol=1e-4)
        assert dicom_kwargs["metadata"][reader.SOURCE_KEY] == str(series)
    (tmp_path / "notes.txt").write_text("not a scan")
    assert reader.get_reader(str(tmp_path / "notes.txt")) is None
    assert reader.get_reader(str(tmp_path)) is None  # a folder without a DICOM series


def test_saving_refuses_inputs_and_foreign_files(tmp_path):
    seg = np.zeros((4, 5, 6), np.uint8)
    seg[1:3, 2:4, 3:5] = 2
    layer = type("Layer", (), {"name": "seg", "data": seg, "scale": np.ones(3), "translate": np.zeros(3),
                               "metadata": {}, "features": None})()
    written = segment.save_segmentation(layer, str(tmp_path / "seg.nrrd"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(written)), seg)
    with pytest.raises(IrisInputError, match="never overwrites"):
        segment.save_segmentation(layer, written, protected={os.path.realpath(written)})
    with pytest.raises(IrisInputError, match="save a segmentation as"):
        segment.save_segmentation(layer, str(tmp_path / "seg.png"))
    foreign = tmp_path / "notes.pt"
    foreign.write_text("mine")
    with pytest.raises(IrisInputError, match="not a task file"):
        segment.save_task(object(), {}, str(foreign))
    assert foreign.read_text() == "mine"
    with pytest.raises(IrisInputError, match="fold ensemble"):
        segment.save_task([object(), object()], {}, str(tmp_path / "task.pt"))
    assert segment.parse_classes(" all ") is None and segment.parse_classes("2, 1 2") == [1, 2]
    with pytest.raises(IrisInputError, match="positive"):
        segment.parse_classes("0 1")
    assert segment.parse_folds("0 1") == ["0", "1"] and segment.parse_folds("") == ["0"]


def file_volume(path: str) -> segment.Volume:
    """A file as the widget sees a layer our reader opened from it."""
    data, kwargs, _ = reader.read_layers(path)[0]
    metadata = kwargs["metadata"]
    geometry = metadata[reader.GEOMETRY_KEY]
    return segment.Volume(kwargs["name"], data, geometry["spacing"], geometry["origin"], geometry["direction"],
                          source=path, names=metadata.get(reader.NAMES_KEY) or {})


def test_segment_fuses_with_the_registration_as_iris_predict(tmp_path):
    """The widget's run chooses the registration fusion as iris_predict does: `on` gives iris_predict
    --registration_fusion on's segmentation, `auto` leaves the hippocampus crop to the network alone and says so, and
    `on` with a task file is refused in one line."""
    references = [(file_volume(image_path(REFERENCE)), file_volume(label_path(REFERENCE)))]
    query = file_volume(image_path(QUERY))
    (tmp_path / "work").mkdir()

    def run(fusion: str, task: str | None = None) -> tuple[list[str], list[str], list[np.ndarray]]:
        events = list(segment.segment(segment.Settings(registration_fusion=fusion), [] if task else references,
                                      [query], str(tmp_path / "work"), task))
        notes = [e.message for e in events if isinstance(e, segment.Note) and e.level != "error"]
        errors = [e.message for e in events if isinstance(e, segment.Note) and e.level == "error"]
        return notes, errors, [e.segmentation for e in events if isinstance(e, segment.Segmented)]

    reference = f"{image_path(REFERENCE)}:{label_path(REFERENCE)}"
    assert iris_predict.main(["-i", image_path(QUERY), "-o", str(tmp_path / "fused"), "-r", reference,
                              "--registration_fusion", "on", "--save_task", str(tmp_path / "task.pt")]) == 0
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "fused" / f"{QUERY}.nii.gz")))
    notes, errors, (fused,) = run("on")
    assert not errors
    np.testing.assert_array_equal(fused, expected)
    notes, errors, (alone,) = run("auto")
    assert not errors and any("the reference is a crop" in n for n in notes), notes
    assert (alone != fused).any()  # the fusion moved some voxels
    notes, errors, segmentations = run("on", str(tmp_path / "task.pt"))
    assert not segmentations and len(errors) == 1
    assert "registration fusion on registers the reference images" in errors[0], errors


# ------------------------------------------------------------------------------------------ the widget
def test_widget_segments_as_iris_predict(viewer, qtbot, tmp_path):
    """Reference and query opened with the plugin's reader; the widget's labels layer equals iris_predict's output
    for the same files (voxels and geometry); save segmentation, save task; with the task file loaded, the query and a
    copy of it without a file (a temporary NIfTI) give what iris_predict --task gives."""
    reference_image = open_layer(viewer, image_path(REFERENCE))
    reference_labels = open_layer(viewer, label_path(REFERENCE))
    query = open_layer(viewer, image_path(QUERY))
    assert isinstance(reference_labels, napari.layers.Labels) and isinstance(query, napari.layers.Image)
    widget = iris_widget(viewer)
    widget.set_reference(0, reference_image.name, reference_labels.name)
    assert widget.checked_queries() == [query.name]  # new image layers start checked, reference images not
    before = len(viewer.layers)
    assert widget.run() is not None
    wait_for(qtbot, widget)
    assert len(viewer.layers) == before + 1, last_error()
    result = viewer.layers[-1]
    assert widget.segmentation_combo.currentText() == result.name  # the newest result, ready to save

    out = tmp_path / "cli"
    # both with their defaults (registration fusion auto: the hippocampus crop left to the network alone)
    assert iris_predict.main(["-i", image_path(QUERY), "-o", str(out), "-r",
                              f"{image_path(REFERENCE)}:{label_path(REFERENCE)}"]) == 0
    cli = sitk.ReadImage(str(out / f"{QUERY}.nii.gz"))
    expected = sitk.GetArrayFromImage(cli)
    assert set(np.unique(expected)) == {0, 1, 2}
    assert isinstance(result, napari.layers.Labels) and result.name == f"{query.name} segmentation"
    np.testing.assert_array_equal(result.data, expected)
    np.testing.assert_array_equal(result.scale, query.scale)
    np.testing.assert_array_equal(result.translate, query.translate)
    assert list(result.features["name"]) == ["background", "anterior", "posterior"]
    assert result.metadata[reader.NAMES_KEY] == {1: "anterior", 2: "posterior"}

    if os.environ.get("IRIS_NAPARI_SCREENSHOT"):
        write_screenshot(viewer, os.environ["IRIS_NAPARI_SCREENSHOT"])
    shot = viewer.screenshot(canvas_only=False)
    assert shot.ndim == 3 and shot.shape[0] > 200 and shot[..., :3].std() > 0

    saved = widget.save_segmentation_to(result.name, str(tmp_path / "saved.nii.gz"))
    back = sitk.ReadImage(saved)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), expected)
    assert (back.GetSpacing(), back.GetOrigin(), back.GetDirection()) == \
        (cli.GetSpacing(), cli.GetOrigin(), cli.GetDirection())
    untouched = os.path.getmtime(image_path(QUERY))
    assert widget.save_segmentation_to(result.name, image_path(QUERY)) is None  # an input: refused
    assert "never overwrites" in last_error() and os.path.getmtime(image_path(QUERY)) == untouched

    task = widget.save_task_to(str(tmp_path / "task.pt"))
    assert task and iris_predict.is_task_file(task)
    # a task file holds no reference image: its queries meet the prior through the frames, as iris_predict --task
    assert iris_predict.main(["-i", image_path(QUERY), "-o", str(tmp_path / "cli_task"), "--task", task]) == 0
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "cli_task" / f"{QUERY}.nii.gz")))
    widget.load_task_file(task)
    copy = viewer.add_image(np.array(query.data), name="query copy", scale=query.scale, translate=query.translate,
                            metadata={reader.GEOMETRY_KEY: query.metadata[reader.GEOMETRY_KEY]})
    widget.set_queries([query.name, copy.name])
    before = len(viewer.layers)
    assert widget.run() is not None
    wait_for(qtbot, widget)
    assert len(viewer.layers) == before + 2, last_error()
    for layer in viewer.layers[-2:]:
        np.testing.assert_array_equal(layer.data, expected)
        assert layer.metadata[reader.NAMES_KEY] == {1: "anterior", 2: "posterior"}  # the task file keeps them


def write_screenshot(viewer, path: str) -> None:
    """The README's picture: the widget beside the reference (its labels) and the query (its segmentation)."""
    from PIL import Image as PILImage

    viewer.window.resize(1500, 900)
    viewer.grid.enabled = True
    viewer.grid.stride = 2
    viewer.grid.shape = (1, -1)
    segmentation = viewer.layers[-1]
    counts = [(segmentation.data[z] == 1).sum(axis=None) for z in range(len(segmentation.data))], \
        [(segmentation.data[z] == 2).sum(axis=None) for z in range(len(segmentation.data))]
    best = int(np.argmax(np.minimum(*counts)))  # the slice that shows both structures best
    viewer.dims.set_point(0, segmentation.data_to_world(np.array([best, 0, 0]))[0])
    viewer.reset_view()
    viewer.layers.selection.active = viewer.layers[-1]
    PILImage.fromarray(viewer.screenshot(canvas_only=False)).convert("RGB").save(path, optimize=True)


def test_invalid_reference_label_notifies_and_adds_nothing(viewer, qtbot, tmp_path):
    """Refused before any work, each in one line naming the layer; an error in the worker (a folder that holds no
    model) is one line too."""
    viewer.open_sample("iris-nnu", "hippocampus")  # the bundled reference (image, labels) and 3 queries
    assert [type(layer).__name__ for layer in viewer.layers] == ["Image"] * 4 + ["Labels"]
    image, query = viewer.layers[f"{REFERENCE}_0000"], viewer.layers[f"{QUERY}_0000"]
    widget = iris_widget(viewer)
    cases = {"wrong shape": (np.ones((5, 6, 7), np.uint8), "differs from image layer"),
             "empty": (np.zeros(image.data.shape, np.uint8), "no voxel is labelled"),
             "negative": (np.full(image.data.shape, -1, np.int32), "negative label value -1")}
    for name, (data, message) in cases.items():
        labels = viewer.add_labels(data, name=name, scale=image.scale, translate=image.translate)
        widget.set_reference(0, image.name, labels.name)
        widget.set_queries([query.name])
        before = len(viewer.layers)
        assert widget.run() is None and widget.worker is None
        assert message in last_error() and name in last_error() and "\n" not in last_error()
        assert len(viewer.layers) == before
        assert widget.run_button.isEnabled()

    widget.set_reference(0, image.name, REFERENCE)
    widget.set_model_folder(str(tmp_path))
    before = len(viewer.layers)
    assert widget.run() is not None
    wait_for(qtbot, widget)
    assert str(tmp_path) in last_error() and "\n" not in last_error() and "Traceback" not in last_error()
    assert len(viewer.layers) == before and widget.run_button.isEnabled()


def test_cancelled_run_adds_no_layer_and_widget_stays_usable(viewer, qtbot, monkeypatch):
    """Cancel while the references are being encoded: no labels layer, no temporary files; the next run works."""
    from iris_nnu.inference.predictor import IrisPredictor

    encode = IrisPredictor.encode_references
    release, entered = threading.Event(), threading.Event()

    def held(self, *args, **kwargs):
        entered.set()
        assert release.wait(60)
        return encode(self, *args, **kwargs)

    monkeypatch.setattr(IrisPredictor, "encode_references", held)
    image = open_layer(viewer, image_path(REFERENCE))
    labels = open_layer(viewer, label_path(REFERENCE))
    query = open_layer(viewer, image_path(QUERY))
    widget = iris_widget(viewer)
    widget.set_reference(0, image.name, labels.name)
    widget.set_queries([query.name])
    before = len(viewer.layers)
    worker = widget.run()
    assert worker is not None and not widget.run_button.isEnabled()
    qtbot.waitUntil(entered.is_set, timeout=120_000)
    workdir = widget.workdir
    widget.cancel()
    release.set()
    wait_for(qtbot, widget)
    assert len(viewer.layers) == before and widget.status.text() == "cancelled"
    assert not os.path.exists(workdir) and widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()
    assert widget.last_task is None

    widget.set_queries([])  # usable again: a run with no query only encodes the task
    assert widget.run() is not None
    wait_for(qtbot, widget)
    assert widget.last_task is not None and widget.last_task.classes == [1, 2], last_error()
    assert len(viewer.layers) == before and widget.save_task_button.isEnabled()
