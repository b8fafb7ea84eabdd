"""The dock widget "Iris: segment from references": pick reference (image, labels) pairs and query images among the
open layers, run iris-nnu in a worker thread, get one labels layer per query.

Everything it does to images and the model goes through `iris_nnu.napari.segment` (the same IrisPredictor calls as
iris_predict); this module is the Qt side only: controls, the worker, notifications.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import napari
from napari.layers import Image, Labels
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from iris_nnu.errors import IrisInputError
from iris_nnu.inference.strategies import FUSION_SETTINGS
from iris_nnu.napari.segment import (
    SEGMENTATION_KEY,
    STRATEGIES,
    Note,
    Progress,
    Segmented,
    Settings,
    TaskEncoded,
    Volume,
    check_reference,
    one_line,
    parse_classes,
    parse_folds,
    protected_paths,
    save_segmentation,
    save_task,
    segment,
    segmentation_layer_kwargs,
    volume_from_layer,
)

DEFAULT_MODEL = "bundled default model"
NOTIFY = {"error": show_error, "warning": show_warning, "info": show_info}


class ReferenceRow(QWidget):
    """One reference: an image layer and the labels layer drawn on it."""

    def __init__(self, remove: Any):
        super().__init__()
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.image = QComboBox()
        self.image.setToolTip("reference image layer")
        self.labels = QComboBox()
        self.labels.setToolTip("its labels layer: every non-zero value is a structure to find in the queries")
        self.remove = QPushButton("−")
        self.remove.setToolTip("remove this reference")
        self.remove.setFixedWidth(28)
        self.remove.clicked.connect(lambda: remove(self))
        layout.addWidget(self.image, 1)
        layout.addWidget(QLabel(":"))
        layout.addWidget(self.labels, 1)
        layout.addWidget(self.remove)


def set_items(combo: QComboBox, names: list[str]) -> None:
    """Replace a combo box's items, keeping its choice when it is still there."""
    current = combo.currentText()
    combo.blockSignals(True)
    combo.clear()
    combo.addItems(names)
    if current in names:
        combo.setCurrentText(current)
    combo.blockSignals(False)


class IrisWidget(QWidget):
    """Segment the checked query image layers with the structures of the reference labels layers."""

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.worker = None
        self.workdir: str | None = None
        self.task_file: str | None = None
        self.last_task: TaskEncoded | None = None
        self.results: list[Labels] = []
        self._queries: dict[str, tuple[Volume, dict]] = {}  # of the running job: query name -> volume, transform
        self._known: set[str] = set()  # image layers already offered as queries (new ones start checked)
        self._build()
        events = self.viewer.layers.events
        for event in (events.inserted, events.removed, events.moved):
            event.connect(self._layers_changed)
        for layer in self.viewer.layers:
            layer.events.name.connect(self._refresh)
        self._refresh()

    # ------------------------------------------------------------------------------------ layout
    def _build(self) -> None:
        layout = QVBoxLayout(self)

        refs = QGroupBox("References (image : labels)")
        refs_layout = QVBoxLayout(refs)
        self.rows_layout = QVBoxLayout()
        refs_layout.addLayout(self.rows_layout)
        self.rows: list[ReferenceRow] = []
        add = QPushButton("+ reference")
        add.clicked.connect(lambda: self.add_reference_row())
        task_line = QHBoxLayout()
        self.task_label = QLabel("or a task file: none")
        self.load_task_button = QPushButton("Load task…")
        self.load_task_button.clicked.connect(self._choose_task_file)
        self.clear_task_button = QPushButton("Clear")
        self.clear_task_button.clicked.connect(lambda: self.load_task_file(None))
        task_line.addWidget(self.task_label, 1)
        task_line.addWidget(self.load_task_button)
        task_line.addWidget(self.clear_task_button)
        refs_layout.addWidget(add)
        refs_layout.addLayout(task_line)
        layout.addWidget(refs)

        queries = QGroupBox("Queries (image layers to segment)")
        queries_layout = QVBoxLayout(queries)
        self.query_list = QListWidget()
        self.query_list.setMaximumHeight(110)
        queries_layout.addWidget(self.query_list)
        layout.addWidget(queries)

        options = QGroupBox("Model")
        form = QFormLayout(options)
        model_line = QHBoxLayout()
        self.model_combo = QComboBox()
        self.model_combo.addItem(DEFAULT_MODEL, None)
        self.model_combo.setToolTip("the bundled default model (a CPU-trained demonstration model over MR and CT), or "
                                    "an iris_train model folder")
        browse = QPushButton("Folder…")
        browse.clicked.connect(self._choose_model_folder)
        model_line.addWidget(self.model_combo, 1)
        model_line.addWidget(browse)
        form.addRow("model", model_line)
        self.folds = QLineEdit("0")
        self.folds.setToolTip("fold(s) of the model: 0, 0 1 2 (a fold ensemble) or all")
        form.addRow("folds", self.folds)
        self.strategy = QComboBox()
        self.strategy.addItems(STRATEGIES)
        self.strategy.setToolTip("ensemble: per class, the mean of the references holding it; oneshot: one reference")
        form.addRow("strategy", self.strategy)
        self.classes = QLineEdit("all")
        self.classes.setToolTip("label values to segment, e.g. 1 2 (all: every value of the references)")
        form.addRow("classes", self.classes)
        self.fusion = QComboBox()
        self.fusion.addItems(FUSION_SETTINGS)
        self.fusion.setToolTip("as iris_predict --registration_fusion. auto: with one reference its label registered "
                               "onto each query moves the network's decision (not for a crop, such as a hippocampus "
                               "patch: the network alone); with two or more, each class the way that segments the "
                               "second reference from the first best. on: fused; off: the network alone (faster by "
                               "the registration); registration: the registered labels alone")
        form.addRow("registration fusion", self.fusion)
        self.tta = QCheckBox("mirrored TTA (about 6x the time)")
        form.addRow("", self.tta)
        self.device = QComboBox()
        self.device.addItem("auto", None)
        self.device.addItem("cpu", "cpu")
        self.device.addItem("cuda", "cuda")
        form.addRow("device", self.device)
        layout.addWidget(options)

        run_line = QHBoxLayout()
        self.run_button = QPushButton("Segment")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        run_line.addWidget(self.run_button, 1)
        run_line.addWidget(self.cancel_button)
        layout.addLayout(run_line)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        layout.addWidget(self.progress)
        self.status = QLabel("pick a reference and the queries, then Segment")
        self.status.setWordWrap(True)
        layout.addWidget(self.status)

        save = QGroupBox("Save")
        save_layout = QVBoxLayout(save)
        self.save_task_button = QPushButton("Save task…")
        self.save_task_button.setToolTip("the encoded references of the last run, as iris_predict --save_task writes "
                                         "them (for --task, or Load task)")
        self.save_task_button.setEnabled(False)
        self.save_task_button.clicked.connect(self._choose_task_target)
        seg_line = QHBoxLayout()
        self.segmentation_combo = QComboBox()
        self.segmentation_combo.setToolTip("labels layer to save, in its query's geometry")
        self.save_segmentation_button = QPushButton("Save segmentation…")
        self.save_segmentation_button.clicked.connect(self._choose_segmentation_target)
        seg_line.addWidget(self.segmentation_combo, 1)
        seg_line.addWidget(self.save_segmentation_button)
        save_layout.addWidget(self.save_task_button)
        save_layout.addLayout(seg_line)
        layout.addWidget(save)
        layout.addStretch(1)
        self.add_reference_row()

    # ------------------------------------------------------------------------------------ layers
    def _layers_changed(self, event: Any = None) -> None:
        value = getattr(event, "value", None)
        if getattr(event, "type", None) == "inserted" and value is not None:
            value.events.name.connect(self._refresh)
        self._refresh()

    def _layers(self, kind: type) -> list[str]:
        return [layer.name for layer in self.viewer.layers if isinstance(layer, kind)]

    def _refresh(self, event: Any = None) -> None:
        """Offer the open layers in every control, keeping the choices that are still there."""
        images, labels = self._layers(Image), self._layers(Labels)
        for row in self.rows:
            set_items(row.image, images)
            set_items(row.labels, labels)
        self._pair_rows(images, labels)
        reference_images = {row.image.currentText() for row in self.rows}
        checked = {name for name in self.checked_queries()}
        self.query_list.clear()
        for name in images:
            item = QListWidgetItem(name)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            new = name not in self._known
            state = (new and name not in reference_images) or (not new and name in checked)
            item.setCheckState(Qt.CheckState.Checked if state else Qt.CheckState.Unchecked)
            self.query_list.addItem(item)
        self._known = set(images)
        results = [layer.name for layer in self.viewer.layers
                   if isinstance(layer, Labels) and SEGMENTATION_KEY in (layer.metadata or {})]
        set_items(self.segmentation_combo, results[::-1] + [n for n in labels if n not in results])

    def _pair_rows(self, images: list[str], labels: list[str]) -> None:
        """A labels layer just picked gets the image of its shape (the one it was drawn on, most likely)."""
        for row in self.rows:
            name = row.labels.currentText()
            if not name or name not in self.viewer.layers:
                continue
            shape = self.viewer.layers[name].data.shape
            chosen = row.image.currentText()
            if chosen and chosen in self.viewer.layers and self.viewer.layers[chosen].data.shape == shape:
                continue
            match = next((n for n in images if self.viewer.layers[n].data.shape == shape), None)
            if match:
                row.image.setCurrentText(match)

    def add_reference_row(self) -> ReferenceRow:
        row = ReferenceRow(self._remove_row)
        row.labels.currentTextChanged.connect(lambda _: self._pair_rows(self._layers(Image), self._layers(Labels)))
        self.rows.append(row)
        self.rows_layout.addWidget(row)
        set_items(row.image, self._layers(Image))
        set_items(row.labels, self._layers(Labels))
        self._pair_rows(self._layers(Image), self._layers(Labels))
        return row

    def _remove_row(self, row: ReferenceRow) -> None:
        if len(self.rows) == 1:
            return  # one row stays (it may be left empty when a task file is loaded)
        self.rows.remove(row)
        row.setParent(None)
        row.deleteLater()

    def set_reference(self, index: int, image: str, labels: str) -> None:
        """Choose reference `index` (rows are added as needed)."""
        while len(self.rows) <= index:
            self.add_reference_row()
        self.rows[index].labels.setCurrentText(labels)
        self.rows[index].image.setCurrentText(image)

    def checked_queries(self) -> list[str]:
        return [self.query_list.item(i).text() for i in range(self.query_list.count())
                if self.query_list.item(i).checkState() == Qt.CheckState.Checked]

    def set_queries(self, names: list[str]) -> None:
        for i in range(self.query_list.count()):
            item = self.query_list.item(i)
            item.setCheckState(Qt.CheckState.Checked if item.text() in names else Qt.CheckState.Unchecked)

    def set_model_folder(self, folder: str | None) -> None:
        """Use this model folder (None: the bundled default model)."""
        if folder is None:
            self.model_combo.setCurrentIndex(0)
            return
        folder = os.path.abspath(folder)
        index = self.model_combo.findData(folder)
        if index < 0:
            self.model_combo.addItem(os.path.basename(folder.rstrip(os.sep)) or folder, folder)
            index = self.model_combo.count() - 1
            self.model_combo.setItemData(index, folder, Qt.ItemDataRole.ToolTipRole)
        self.model_combo.setCurrentIndex(index)

    def load_task_file(self, path: str | None) -> None:
        """Segment with this task file instead of the references (None: back to the references)."""
        self.task_file = os.path.abspath(path) if path else None
        self.task_label.setText(f"or a task file: {os.path.basename(path)}" if path else "or a task file: none")
        self.task_label.setToolTip(self.task_file or "")

    # ------------------------------------------------------------------------------------ running
    def settings(self) -> Settings:
        return Settings(model_folder=self.model_combo.currentData(), folds=parse_folds(self.folds.text()),
                        strategy=self.strategy.currentText(), classes=parse_classes(self.classes.text()),
                        tta=self.tta.isChecked(), device=self.device.currentData(),
                        registration_fusion=self.fusion.currentText())

    def selected_references(self) -> list[tuple[Volume, Volume]]:
        """The (image, labels) of every complete reference row, checked (labels snapshot as painted now)."""
        references = []
        for row in self.rows:
            image, labels = row.image.currentText(), row.labels.currentText()
            if not image and not labels:
                continue
            if not image or not labels or image not in self.viewer.layers or labels not in self.viewer.layers:
                raise IrisInputError("a reference needs an image layer and its labels layer")
            pair = (volume_from_layer(self.viewer.layers[image]), volume_from_layer(self.viewer.layers[labels], True))
            check_reference(*pair)
            references.append(pair)
        return references

    def notify(self, message: str, level: str = "error") -> None:
        NOTIFY[level](message)
        if level != "info":
            self.status.setText(message)

    def run(self) -> Any:
        """Start a run in a worker thread; returns the worker (None, with a notification, when inputs are refused)."""
        if self.worker is not None:
            return None
        try:
            settings = self.settings()
            references = [] if self.task_file else self.selected_references()
            queries = {}
            for name in self.checked_queries():
                layer = self.viewer.layers[name]
                transform = {"scale": tuple(layer.scale), "translate": tuple(layer.translate),
                             "rotate": layer.rotate, "shear": layer.shear, "affine": layer.affine}
                queries[name] = (volume_from_layer(layer), transform)
            if not references and not self.task_file:
                raise IrisInputError("no reference: pick an image layer and the labels layer drawn on it, or load a "
                                     "task file")
            if not queries and self.task_file:
                raise IrisInputError("no query: check the image layers to segment")
        except IrisInputError as e:
            self.notify(one_line(e))
            return None
        self._queries = queries
        self.workdir = tempfile.mkdtemp(prefix="iris_napari_")
        worker = thread_worker(segment)(settings, references, [v for v, _ in queries.values()], self.workdir,
                                        self.task_file, _start_thread=False)
        worker.yielded.connect(self._on_event)
        worker.aborted.connect(lambda: self.status.setText("cancelled"))
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.status.setText("starting")
        worker.start()
        return worker

    def cancel(self) -> None:
        """Stop the run at its next step (the query being segmented finishes first)."""
        if self.worker is not None:
            self.worker.quit()
            self.cancel_button.setEnabled(False)
            self.status.setText("cancelling after the current step…")

    def _on_event(self, event: Any) -> None:
        if self.worker is not None and self.worker.abort_requested:
            return  # cancelled: what it still sends is dropped
        if isinstance(event, Progress):
            self.progress.setRange(0, event.total)
            self.progress.setValue(event.done)
            self.status.setText(event.message)
        elif isinstance(event, Note):
            self.notify(event.message, event.level)
        elif isinstance(event, TaskEncoded):
            self.last_task = event
            self.save_task_button.setEnabled(True)
            self.status.setText(f"task: classes {' '.join(map(str, event.classes))} from {event.description}")
        elif isinstance(event, Segmented):
            volume, transform = self._queries[event.query]
            layer = self.viewer.add_labels(event.segmentation, **segmentation_layer_kwargs(event, volume),
                                           **transform)
            self.results.append(layer)
            self.segmentation_combo.setCurrentText(layer.name)

    def _on_finished(self) -> None:
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir = None
        self.worker = None
        self._queries = {}
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        if self.status.text().startswith("cancelling"):
            self.status.setText("cancelled")
        if self.status.text() == "cancelled":
            self.progress.setValue(0)

    # ------------------------------------------------------------------------------------ files
    def save_task_to(self, path: str) -> str | None:
        """Write the last run's task file; None (with a notification) when refused."""
        if self.last_task is None:
            self.notify("no task yet: run Segment first (with no query checked it only encodes the references)")
            return None
        try:
            written = save_task(self.last_task.pool, self.last_task.names, path, protected_paths(self.viewer.layers))
        except IrisInputError as e:
            self.notify(one_line(e))
            return None
        show_info(f"task written to {written}")
        return written

    def save_segmentation_to(self, layer_name: str, path: str) -> str | None:
        """Write a labels layer in its query's geometry; None (with a notification) when refused."""
        try:
            if layer_name not in self.viewer.layers:
                raise IrisInputError(f"no labels layer {layer_name!r}")
            written = save_segmentation(self.viewer.layers[layer_name], path, protected_paths(self.viewer.layers))
        except IrisInputError as e:
            self.notify(one_line(e))
            return None
        show_info(f"segmentation written to {written}")
        return written

    def _choose_model_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "iris_train model folder (holding fold_0/, plans.json ...)")
        if folder:
            self.set_model_folder(folder)

    def _choose_task_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Task file (iris_predict --save_task)", "",
                                              "Task files (*.pt);;All files (*)")
        if path:
            self.load_task_file(path)

    def _choose_task_target(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save task", "task.pt", "Task files (*.pt)")
        if path:
            self.save_task_to(path)

    def _choose_segmentation_target(self) -> None:
        name = self.segmentation_combo.currentText()
        if not name:
            self.notify("no labels layer to save")
            return
        layer = self.viewer.layers[name]
        of = (layer.metadata or {}).get(SEGMENTATION_KEY) or {}
        source = of.get("source")
        folder = os.path.dirname(source) if source and os.path.isfile(source) else os.getcwd()
        suggestion = os.path.join(folder, f"{of.get('query', name)}_iris.nii.gz")
        path, _ = QFileDialog.getSaveFileName(self, "Save segmentation", suggestion,
                                              "Images (*.nii.gz *.nii *.mha *.nrrd)")
        if path:
            self.save_segmentation_to(name, path)
