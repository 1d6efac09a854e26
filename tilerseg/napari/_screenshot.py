"""The documentation's screenshot of the widget docked in napari, drawn from a real run.

    python -m tilerseg.napari._screenshot OUT.png

opens a viewer with a synthetic slide, runs the bundled model on it from the widget (in
its worker thread, as a user would), segments a view, and saves the window. napari's
canvas draws with OpenGL, so the drawing runs in a child process with a display: a
private Xvfb when one is installed (Debian's ``xvfb``), else the ``DISPLAY`` already set.
:func:`draw_screenshot` starts that child and says why it drew nothing when it cannot.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["draw_screenshot", "missing_requirement", "virtual_display"]

log = logging.getLogger(__name__)

SLIDE = 1024
"""Side of the synthetic slide shown (pixels)."""


def missing_requirement() -> str | None:
    """Why the screenshot cannot be drawn here (napari, a Qt binding or a display is
    missing), or None."""
    if importlib.util.find_spec("napari") is None:
        return 'napari is not installed (pip install "tilerseg[napari]")'
    if not any(importlib.util.find_spec(b) for b in ("PyQt6", "PyQt5", "PySide6", "PySide2")):
        return "no Qt binding is installed (PyQt6, PyQt5, PySide6 or PySide2)"
    if shutil.which("Xvfb") is None and not os.environ.get("DISPLAY"):
        return "no display for OpenGL: install Xvfb (Debian: xvfb) or set DISPLAY"
    return None


@contextlib.contextmanager
def virtual_display(size: tuple[int, int] = (1600, 1000)) -> Iterator[str]:
    """A private Xvfb display for the duration of the block.

    Parameters
    ----------
    size : (int, int)
        Screen width and height in pixels.

    Yields
    ------
    str
        Its ``DISPLAY`` value, e.g. ``":5"``.
    """
    read, write = os.pipe()
    server = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write), "-screen", "0", f"{size[0]}x{size[1]}x24",
         "-nolisten", "tcp"], pass_fds=(write,), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    os.close(write)
    try:
        with os.fdopen(read) as pipe:
            number = pipe.readline().strip()
        if not number:
            raise OSError("Xvfb did not start")
        yield f":{number}"
    finally:
        server.terminate()
        server.wait(timeout=10)


def draw_screenshot(path: str | os.PathLike, timeout: float = 300) -> Path | None:
    """Draw the screenshot into ``path`` (PNG) in a child process with a display.

    Parameters
    ----------
    path : str or os.PathLike
        The PNG file to write.
    timeout : float
        Seconds before the child is stopped.

    Returns
    -------
    pathlib.Path or None
        ``path``, or None when :func:`missing_requirement` says it cannot be drawn here
        (logged).

    Raises
    ------
    subprocess.CalledProcessError, subprocess.TimeoutExpired
        The child failed.
    """
    why = missing_requirement()
    if why is not None:
        log.warning("no screenshot of the napari widget: %s", why)
        return None
    path = Path(path)
    here = str(Path(__file__).resolve().parents[2])  # this tilerseg, installed or not
    env = dict(os.environ, QT_QPA_PLATFORM="xcb",
               PYTHONPATH=os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "tilerseg.napari._screenshot", str(path)]
    with contextlib.ExitStack() as stack:
        if shutil.which("Xvfb") is not None:
            env["DISPLAY"] = stack.enter_context(virtual_display())
        subprocess.run(command, env=env, check=True, timeout=timeout)
    return path


def _wait(app: object, done: object, timeout: float = 240) -> None:
    """Process Qt events until ``done()`` is True."""
    end = time.monotonic() + timeout
    while not done():  # type: ignore[operator]
        if time.monotonic() > end:
            raise TimeoutError("the widget did not finish in time")
        app.processEvents()  # type: ignore[attr-defined]
        time.sleep(0.02)


def _draw(path: Path) -> None:
    """Open the viewer, run the widget and save the window (in this process)."""
    import tempfile

    import napari
    from napari.layers import Layer
    from qtpy.QtWidgets import QApplication

    from ..pictures import save_png
    from . import register
    from ._sample import demo_slide
    from ._view import camera

    register()
    viewer = napari.Viewer(show=True, title="tilerseg in napari")
    viewer.window._qt_window.resize(1500, 900)
    layer = viewer.add_layer(Layer.create(*demo_slide(SLIDE)[0]))
    _, widget = viewer.window.add_plugin_dock_widget("tilerseg", "Segment")
    app = QApplication.instance()
    with tempfile.TemporaryDirectory() as folder:
        widget.layer_box.setCurrentText(layer.name)
        widget.tile_box.setValue(256)
        widget.backend_box.setCurrentText("torch")
        widget.output_box.setCurrentText("both")
        widget.out_edit.setText(str(Path(folder) / "slide.tilerseg.zarr"))
        widget.run_button.click()
        _wait(app, lambda: widget._run_worker is None)
        if widget.last_error is not None:
            raise widget.last_error
        viewer.reset_view()
        camera(viewer).zoom *= 3  # a view of part of the slide
        widget.view_button.click()
        _wait(app, lambda: widget.view_button.isEnabled())
        if widget.last_error is not None:
            raise widget.last_error
        for other in viewer.layers:  # the slide, and the view's labels where it was
            other.visible = other is layer or other.name.endswith("preview: segmentation")
            other.opacity = 1.0 if other is layer else 0.6
        viewer.reset_view()
        viewer.layers.selection.active = layer
        for _ in range(20):
            app.processEvents()
            time.sleep(0.05)
        picture = viewer.screenshot(canvas_only=False, flash=False)
        save_png(picture[..., :3], path)
    viewer.close()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tilerseg.napari._screenshot OUT.png")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _draw(Path(sys.argv[1]))
