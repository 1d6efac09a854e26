"""Per-channel z-score normalisation (multi-modal MRI): statistics, exact tiling, records."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tilerseg
from tilerseg.errors import InvalidArgumentError, InvalidImageError
from tilerseg.normalize import Normalization, resolve_normalization
from tilerseg.synthetic import tumour_volume

from .reference import one_shot_reference


def _expected_zscore(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of each channel over the voxels nonzero in some channel, by a loop."""
    means, stds = [], []
    flat = image.reshape(image.shape[0], -1).astype(np.float64)
    keep = [i for i in range(flat.shape[1]) if any(flat[c, i] != 0 for c in range(len(flat)))]
    for channel in flat:
        values = channel[keep]
        means.append(sum(values) / len(values))
        stds.append(np.sqrt(sum((v - means[-1]) ** 2 for v in values) / len(values)))
    return np.array(means), np.array(stds)


def test_zscore_statistics_are_per_channel_over_the_foreground() -> None:
    image, _ = tumour_volume((8, 20, 20), modalities=3, seed=2)
    norm = resolve_normalization("zscore", image.dtype, lambda: image)
    mean, std = _expected_zscore(image)
    assert norm.method == "zscore" and norm.channels == 3
    np.testing.assert_allclose(norm.low, mean, rtol=1e-9)
    np.testing.assert_allclose(np.subtract(norm.high, norm.low), std, rtol=1e-9)
    out = norm(image)
    brain = (image != 0).any(axis=0)
    for c in range(3):  # the foreground of every channel is now mean 0, deviation 1
        assert abs(out[c][brain].mean()) < 1e-4 and abs(out[c][brain].std() - 1) < 1e-4
    # the background of skull-stripped MRI (0 everywhere) is not counted
    assert not np.isclose(norm.low[0], image[0].mean())


def test_zscore_of_a_flat_or_empty_channel_does_not_divide_by_zero() -> None:
    sample = np.stack([np.zeros((4, 4)), np.full((4, 4), 7.0)])
    norm = resolve_normalization("zscore", sample.dtype, lambda: sample)
    assert norm.low == (0.0, 7.0) and norm.high == (1.0, 8.0)
    assert np.isfinite(norm(sample)).all()


def test_per_channel_record_round_trips_and_checks_channels() -> None:
    norm = Normalization("zscore", (1.0, 2.0), (3.0, 5.0))
    again = Normalization(**norm.as_dict())  # as a run's manifest records it (JSON lists)
    assert again == norm and norm.as_dict()["low"] == [1.0, 2.0]
    with pytest.raises(InvalidImageError, match="2 channel"):
        norm(np.zeros((3, 4, 4)))
    with pytest.raises(InvalidArgumentError):
        Normalization("zscore", (1.0, 2.0), 3.0)
    with pytest.raises(InvalidArgumentError):
        Normalization("zscore", (1.0, 2.0), (3.0, 2.0))


@pytest.mark.parametrize("tile", [(4, 8, 8), (8, 16, 24)])
def test_zscore_run_is_exact_at_any_tile(tile: tuple[int, ...]) -> None:
    """Tiled 3D output of a 4-channel volume equals one pass over the whole volume
    normalised with statistics computed independently."""
    image, _ = tumour_volume((10, 30, 26), spacing=(3.0, 1.0, 1.0), seed=5)
    torch.manual_seed(0)
    model = tilerseg.create_model("unet3d", depth=2, base_channels=4, in_channels=4,
                                  num_classes=3)
    mean, std = _expected_zscore(image)
    shape = (-1, 1, 1, 1)
    normalised = ((image - mean.reshape(shape)) / std.reshape(shape)).astype(np.float32)
    expected = one_shot_reference(normalised, model)
    got = tilerseg.segment(image, model, tile=tile, normalize="zscore", backend="torch")
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4


def test_a_model_stating_zscore_is_run_with_it() -> None:
    image, _ = tumour_volume((8, 24, 24), modalities=2, seed=1)
    torch.manual_seed(1)
    model = tilerseg.create_model("unet3d", depth=2, base_channels=4, in_channels=2)
    plain = tilerseg.segment(image, model, normalize="zscore", backend="torch")
    model.metadata = {"normalize": "zscore"}
    assert np.array_equal(tilerseg.segment(image, model, backend="torch"), plain)
    other = tilerseg.segment(image, model, normalize="meanstd", backend="torch")
    assert np.abs(other - plain).max() > 1e-3


def test_cli_normalize_option(tmp_path, capsys) -> None:
    from tilerseg.cli import main
    from tilerseg.io.writers import open_output

    image, _ = tumour_volume((8, 24, 24), modalities=2, seed=3)
    np.save(tmp_path / "case.npy", image)
    torch.manual_seed(2)
    model = tilerseg.create_model("unet3d", depth=2, base_channels=4, in_channels=2)
    tilerseg.save_model(model, tmp_path / "m.pt")
    out = tmp_path / "seg.zarr"
    assert main(["run", str(tmp_path / "case.npy"), "--model", str(tmp_path / "m.pt"),
                 "--normalize", "zscore", "--output", "probabilities", "--dtype", "float32",
                 "--backend", "torch", "-o", str(out), "-q"]) == 0
    written = np.asarray(open_output(out)["probabilities"][...])
    expected = tilerseg.segment(image, model, normalize="zscore", backend="torch")
    assert np.abs(written - expected).max() <= 1e-6
    capsys.readouterr()
    assert main(["run", str(tmp_path / "case.npy"), "--model", str(tmp_path / "m.pt"),
                 "--normalize", "bogus", "-o", str(tmp_path / "b.zarr")]) == 2
    err = capsys.readouterr().err.strip()
    assert "normalize='bogus' is not understood" in err and len(err.splitlines()) == 1


def test_a_run_computes_zscore_from_every_voxel(tmp_path) -> None:
    """Larger than the strided sample other methods use (4 Mi values): the recorded
    statistics are those of the whole volume, read slab by slab."""
    import zarr

    image, _ = tumour_volume((48, 160, 160), spacing=(1.0, 1.0, 1.0), seed=4)
    assert image.size > 1 << 22
    torch.manual_seed(0)
    model = tilerseg.create_model("unet3d", depth=1, base_channels=2, in_channels=4)
    out = tilerseg.segment_to_zarr(image, model, tmp_path / "z.zarr", normalize="zscore",
                                   backend="torch", tile=(48, 160, 160))
    recorded = zarr.open_group(str(out), mode="r").attrs["tilerseg"]["normalization"]
    brain = (image != 0).any(axis=0)
    values = image[:, brain].astype(np.float64)
    np.testing.assert_allclose(recorded["low"], values.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(np.subtract(recorded["high"], recorded["low"]),
                               values.std(axis=1), rtol=1e-12)
