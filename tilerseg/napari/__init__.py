"""tilerseg in napari (``pip install "tilerseg[napari]"``): a dock widget that segments an
image layer or a file into an OME-Zarr output in a background thread, with Cancel and
Resume, and segments the tiles in view on demand; a reader for tilerseg outputs; the demo
slide as sample data.

The contributions are declared in ``napari.yaml`` (npe2, found through the package's
``napari.manifest`` entry point) and imported only when napari asks for them: this
package imports neither napari nor Qt.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["MANIFEST", "register"]

MANIFEST = Path(__file__).with_name("napari.yaml")
"""The npe2 manifest."""


def register() -> None:
    """Register the manifest with npe2's plugin manager unless it is already (installed
    through the entry point): for a source tree that is not installed."""
    import npe2

    manager = npe2.PluginManager.instance()
    manager.discover()
    try:
        manager.get_manifest("tilerseg")
    except KeyError:
        manager.register(npe2.PluginManifest.from_file(MANIFEST))
