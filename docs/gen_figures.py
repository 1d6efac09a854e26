"""Generate the figures of the documentation with tilerseg's own code.

    python docs/gen_figures.py OUT_DIR

writes into OUT_DIR (the Markdown pages refer to them as ``figures/NAME.png``):

* ``geometry.png``: one tile at the image's corner: input window, halo, output crop, the
  pooling grid from its origin, the mirrored border;
* ``plan.png``: the tile plan over a synthetic slide;
* ``preview.png``: a real run of the bundled model on a synthetic membrane slide, the
  membrane probability over the slide;
* ``instances.png``: the instance labels of the same run, a full-resolution crop;
* ``napari.png``: the napari widget docked in the viewer after a run and a view preview
  (:func:`napari_figure`; where napari, a Qt binding or a display is missing, a note
  drawn in its place, and the same note printed).

Needs Pillow (``pip install "tilerseg[plot]"``); runs on the CPU in a few seconds.
"""

from __future__ import annotations

import logging
import pathlib
import sys
import tempfile
import time

__all__ = ["generate"]

logger = logging.getLogger("tilerseg.docs")

SLIDE = (1024, 768)
TILE = 256


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Write the documentation's figures into ``out_dir``.

    Parameters
    ----------
    out_dir : pathlib.Path
        Created if missing.

    Returns
    -------
    list of pathlib.Path
        The files written.
    """
    import tilerseg
    from tilerseg.pictures import plot_plan, plot_tile, preview, save_png
    from tilerseg.synthetic import write_membrane_tiff

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[pathlib.Path] = []

    def save(picture, name: str) -> None:
        path = out_dir / name
        save_png(picture, path)
        written.append(path)

    model = tilerseg.load_model()  # the bundled ISBI 2012 EM U-Net
    with tempfile.TemporaryDirectory() as folder:
        slide = str(pathlib.Path(folder) / "slide.tif")
        write_membrane_tiff(slide, SLIDE, tile=256, pixel_size=0.5, seed=0)
        save(plot_tile(slide, model, tile=TILE, index=(0, 0), size=800), "geometry.png")
        save(plot_plan(slide, model, tile=TILE, size=900, device="cpu"), "plan.png")
        start = time.perf_counter()
        out = tilerseg.segment_to_zarr(slide, model, pathlib.Path(folder) / "slide.zarr",
                                       tile=512, device="cpu", backend="torch",
                                       output="instances")
        logger.info("segmented the %s slide in %.1f s", SLIDE, time.perf_counter() - start)
        save(preview(out, size=1024, show="probabilities", class_index=0), "preview.png")
        save(preview(out, region=((0, 384), (0, 512)), show="instances"), "instances.png")
    written.append(napari_figure(out_dir / "napari.png"))
    return written


def napari_figure(path: pathlib.Path) -> pathlib.Path:
    """Draw ``napari.png``: the widget docked in napari, in a child process with a display
    (see :mod:`tilerseg.napari._screenshot`); where that cannot run here, print why and
    draw the reason in its place.

    Parameters
    ----------
    path : pathlib.Path
        The PNG file.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    from tilerseg.napari._screenshot import draw_screenshot, missing_requirement

    why = missing_requirement()
    if why is None:
        start = time.perf_counter()
        draw_screenshot(path)
        logger.info("drew the napari screenshot in %.1f s", time.perf_counter() - start)
        return path
    print(f"napari.png: no screenshot of the napari widget here: {why}", file=sys.stderr)
    from PIL import Image, ImageDraw

    picture = Image.new("RGB", (900, 80), (38, 40, 45))
    ImageDraw.Draw(picture).text((20, 30), f"No screenshot: {why}.", fill=(230, 230, 230))
    picture.save(path)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python docs/gen_figures.py OUT_DIR")
    # the tilerseg of this checkout, wherever the script is started from
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    for path in generate(pathlib.Path(sys.argv[1])):
        print(path)
    print(f"in {time.perf_counter() - start:.1f} s")
