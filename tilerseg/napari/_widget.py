"""The dock widget: segment an image layer or a file into an OME-Zarr output in a
background thread, with a progress bar and Cancel; or segment only the tiles in view.

Nothing is computed on the Qt thread: the run (:func:`~tilerseg.napari._run.run_request`)
and the view (:func:`~tilerseg.napari._view.segment_region`) run in napari's thread
workers, and their layers are added when they return.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..engine.backends import BACKENDS
from ..engine.options import OUTPUTS, PRECISIONS, RunOptions, run_options
from ..errors import InvalidArgumentError, TilersegError
from ._input import default_output, layer_image, spatial_placement
from ._layers import LayerData, output_layers, preview_layers
from ._run import RunOutcome, RunRequest, load_model_spec, run_request
from ._view import ViewPreview, segment_region, visible_region

__all__ = ["EXACT_VIEW_NOTE", "SegmentWidget"]

log = logging.getLogger(__name__)

EXACT_VIEW_NOTE = (
    "Segment the view runs the model on the output tiles under the view, each with its "
    "halo, on the tile plan of Run: what it shows equals what Run writes there, pixel for "
    "pixel on this computer's CPU with the same runtime (instance labels need the whole "
    "run).")
"""What the widget says about the view's exactness."""


class SegmentWidget(QWidget):
    """Segment an image with tilerseg from napari.

    Parameters
    ----------
    napari_viewer : napari.Viewer
        The viewer whose image layers it segments and to which it adds the results.

    Attributes
    ----------
    progressed : Signal(int, int)
        ``(tiles_done, tiles_total)`` of the run, emitted from the run's threads.
    last_outcome : RunOutcome or None
        How the last run ended.
    last_error : Exception or None
        The error of the last run or view, if it failed.
    """

    progressed = Signal(int, int)

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.last_outcome: RunOutcome | None = None
        self.last_error: BaseException | None = None
        self._run_worker: Any = None
        self._view_worker: Any = None
        self._running_out: Path | None = None

        self.layer_box = QComboBox()
        self.file_edit = QLineEdit()
        self.file_edit.setPlaceholderText("or an image file, instead of the layer")
        self.model_edit = QLineEdit()
        self.model_edit.setPlaceholderText("the bundled model")
        self.model_edit.setToolTip("a tilerseg model file (.pt), a bioimage.io package "
                                   "(.zip, rdf.yaml) or a bundled model's name")
        self.tile_box = QSpinBox()
        self.tile_box.setRange(0, 16384)
        self.tile_box.setSingleStep(16)
        self.tile_box.setSpecialValueText("default")
        self.precision_box = _choices(PRECISIONS)
        self.backend_box = _choices(BACKENDS)
        self.output_box = _choices(OUTPUTS, "both")
        self.out_edit = QLineEdit()
        self.resume_check = QCheckBox("Resume an unfinished run")
        self.resume_check.setChecked(True)
        self.overwrite_check = QCheckBox("Replace an existing output")
        self.run_button = QPushButton("Run")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.view_button = QPushButton("Segment the view")
        self.progress_bar = QProgressBar()
        self.status = QLabel()
        self.status.setWordWrap(True)
        note = QLabel(EXACT_VIEW_NOTE)
        note.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Image layer", self.layer_box)
        form.addRow("File", _with_button(self.file_edit, "...", self._browse_file))
        form.addRow("Model", _with_button(self.model_edit, "...", self._browse_model))
        form.addRow("Tile", self.tile_box)
        form.addRow("Precision", self.precision_box)
        form.addRow("Backend", self.backend_box)
        form.addRow("Output", self.output_box)
        form.addRow("Output path", _with_button(self.out_edit, "...", self._browse_output))
        buttons = QHBoxLayout()
        for button in (self.run_button, self.cancel_button):
            buttons.addWidget(button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.resume_check)
        layout.addWidget(self.overwrite_check)
        layout.addLayout(buttons)
        layout.addWidget(self.progress_bar)
        layout.addWidget(self.view_button)
        layout.addWidget(note)
        layout.addWidget(self.status)
        layout.addStretch()

        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.view_button.clicked.connect(self.segment_view)
        self.progressed.connect(self._on_progress)
        self.layer_box.currentIndexChanged.connect(self._update_output_hint)
        self.file_edit.textChanged.connect(self._update_output_hint)
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed,
                      self.viewer.layers.events.moved):
            event.connect(self._refresh_layers)
        self._refresh_layers()

    # -- the form ---------------------------------------------------------------------------

    def image_layers(self) -> list[Any]:
        """The viewer's image layers."""
        from napari.layers import Image

        return [layer for layer in self.viewer.layers if isinstance(layer, Image)]

    def selected_layer(self) -> Any | None:
        """The image layer chosen, or None."""
        name = self.layer_box.currentText()
        return next((layer for layer in self.image_layers() if layer.name == name), None)

    def _refresh_layers(self, *_: Any) -> None:
        current = self.layer_box.currentText()
        names = [layer.name for layer in self.image_layers()]
        self.layer_box.blockSignals(True)
        self.layer_box.clear()
        self.layer_box.addItems(names)
        if current in names:
            self.layer_box.setCurrentText(current)
        self.layer_box.blockSignals(False)
        self._update_output_hint()

    def _update_output_hint(self, *_: Any) -> None:
        try:
            hint = str(default_output(self.selected_layer(), self.file_edit.text().strip()))
        except TilersegError:
            hint = ""
        self.out_edit.setPlaceholderText(hint)

    def options(self) -> RunOptions:
        """The run's options from the form.

        Raises
        ------
        tilerseg.InvalidArgumentError
        """
        return run_options(tile=self.tile_box.value() or None,
                           precision=self.precision_box.currentText(),
                           backend=self.backend_box.currentText(),
                           output=self.output_box.currentText())

    def request(self, layer: Any | None) -> RunRequest:
        """The run the form describes, of the file, else of ``layer``.

        Reads no pixel: a layer's image is resolved in the worker (``image`` is None
        then).

        Raises
        ------
        tilerseg.InvalidArgumentError
            Neither a file nor a layer, or options that are not usable.
        """
        file = self.file_edit.text().strip()
        if not file and layer is None:
            raise InvalidArgumentError("choose an image layer or a file")
        out = self.out_edit.text().strip() or str(default_output(layer, file))
        return RunRequest(image=file or None, model=self.model_edit.text().strip() or None,
                          out=Path(out).expanduser(), options=self.options(),
                          resume=self.resume_check.isChecked(),
                          overwrite=self.overwrite_check.isChecked())

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> None:
        """Start the run in a background thread (the Run button)."""
        from napari.qt.threading import create_worker

        if self._run_worker is not None:
            return
        layer = None if self.file_edit.text().strip() else self.selected_layer()
        try:
            request = self.request(layer)
            placement = spatial_placement(layer) if layer is not None else None
        except TilersegError as err:
            self._fail(err)
            return
        prefix = f"{layer.name if layer is not None else Path(request.image).name}: "

        def work() -> tuple[RunOutcome, list[LayerData]]:
            image = layer_image(layer) if request.image is None else request.image
            outcome = run_request(dataclasses.replace(request, image=image),
                                  should_stop=lambda: worker.abort_requested,
                                  progress=self.progressed.emit)
            if outcome.cancelled:
                return outcome, []
            return outcome, output_layers(outcome.out, prefix=prefix,
                                          **(placement or {}))

        worker = create_worker(work, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(self._on_run_returned)
        worker.errored.connect(self._fail)
        worker.finished.connect(self._on_run_finished)
        self._run_worker, self._running_out = worker, request.out
        self.last_outcome = self.last_error = None
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress_bar.setRange(0, 0)  # busy until the first tile
        self.status.setText(f"segmenting into {request.out} ...")
        worker.start()

    def cancel(self) -> None:
        """Stop the run after the tile in flight (the Cancel button); what is done is
        kept for Resume."""
        if self._run_worker is not None:
            self._run_worker.quit()
            self.cancel_button.setEnabled(False)
            self.status.setText("cancelling after the tiles in flight ...")

    def _on_progress(self, done: int, total: int) -> None:
        self.progress_bar.setRange(0, max(total, 1))
        self.progress_bar.setValue(done)

    def _on_run_returned(self, result: tuple[RunOutcome, list[LayerData]]) -> None:
        outcome, layers = result
        self.last_outcome = outcome
        if outcome.cancelled:
            return
        self.add_layers(layers)
        self.status.setText(f"wrote {outcome.out} in {outcome.seconds:.1f} s")

    def _on_run_finished(self) -> None:
        worker, out = self._run_worker, self._running_out
        self._run_worker = self._running_out = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(1 if self.last_outcome is not None else 0)
        if worker is not None and worker.abort_requested and self.last_error is None:
            from ..engine.workdir import work_path

            partial = work_path(out) if out is not None else None
            if partial is not None and partial.is_dir():
                self.status.setText(f"cancelled: the tiles done are kept in {partial}; Run "
                                    "with Resume continues it")
            elif out is not None and out.exists():
                self.status.setText(f"cancelled once {out} was complete: Run (with Resume) "
                                    "shows it")
            else:
                self.status.setText("cancelled")

    # -- the view ---------------------------------------------------------------------------

    def segment_view(self) -> None:
        """Segment the tiles under the view and show them at once (the Segment the view
        button), in a background thread."""
        from napari.qt.threading import create_worker

        layer = self.selected_layer()
        try:
            if layer is None or self.file_edit.text().strip():
                raise InvalidArgumentError("Segment the view needs an image layer (not a file)")
            if self.viewer.dims.ndisplay != 2 or len(spatial_placement(layer)["scale"]) != 2:
                raise InvalidArgumentError("Segment the view works on 2D images in a 2D view")
            region = visible_region(self.viewer, layer)
            if region is None:
                raise InvalidArgumentError("the view shows none of the layer")
            options = self.options()
        except TilersegError as err:
            self._fail(err)
            return
        model = self.model_edit.text().strip() or None
        placement = spatial_placement(layer)
        prefix = f"{layer.name}: preview: "

        def work() -> list[LayerData]:
            preview: ViewPreview = segment_region(layer_image(layer), load_model_spec(model),
                                                  region, options)
            return preview_layers(preview, prefix=prefix, **placement)

        worker = create_worker(work, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(lambda layers: self._on_view_returned(layers, region))
        worker.errored.connect(self._fail)
        worker.finished.connect(lambda: self.view_button.setEnabled(True))
        self._view_worker = worker
        self.last_error = None
        self.view_button.setEnabled(False)
        rows, cols = region
        self.status.setText(f"segmenting the view (rows {rows.start}-{rows.stop}, columns "
                            f"{cols.start}-{cols.stop}) ...")
        worker.start()

    def _on_view_returned(self, layers: list[LayerData], region: tuple[slice, ...]) -> None:
        self.add_layers(layers)
        rows, cols = region
        self.status.setText(f"the view is segmented (rows {rows.start}-{rows.stop}, columns "
                            f"{cols.start}-{cols.stop}, whole tiles)")

    # -- shared -----------------------------------------------------------------------------

    def add_layers(self, layers: list[LayerData]) -> list[Any]:
        """Add ``layers`` to the viewer, replacing layers of the same names.

        Parameters
        ----------
        layers : list of LayerData

        Returns
        -------
        list of napari.layers.Layer
        """
        from napari.layers import Layer

        added = []
        for data, meta, kind in layers:
            if meta["name"] in self.viewer.layers:
                self.viewer.layers.remove(meta["name"])
            added.append(self.viewer.add_layer(Layer.create(data, dict(meta), kind)))
        return added

    def _fail(self, err: BaseException) -> None:
        self.last_error = err
        if isinstance(err, TilersegError):
            log.info("%s", err)
        else:
            log.error("the run failed", exc_info=err)
        self.status.setText(f"error: {err}")

    def _browse_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Image file")
        if path:
            self.file_edit.setText(path)

    def _browse_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Model", filter="Models (*.pt *.zip *.yaml);;All files (*)")
        if path:
            self.model_edit.setText(path)

    def _browse_output(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "OME-Zarr output", filter="*.zarr")
        if path:
            self.out_edit.setText(path if path.endswith(".zarr") else path + ".zarr")


def _choices(values: tuple[str, ...], current: str | None = None) -> QComboBox:
    box = QComboBox()
    box.addItems(list(values))
    if current is not None:
        box.setCurrentText(current)
    return box


def _with_button(edit: QLineEdit, text: str, slot: Any) -> QWidget:
    row = QWidget()
    layout = QHBoxLayout(row)
    layout.setContentsMargins(0, 0, 0, 0)
    layout.addWidget(edit)
    button = QPushButton(text)
    button.setMaximumWidth(32)
    button.clicked.connect(slot)
    layout.addWidget(button)
    return row
