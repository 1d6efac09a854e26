"""Instance labels of a run (``output="instances"``), in passes over whole chunks.

Free of torch: the passes after the model need only the run's work directory, so the
process that commits (``tilerseg finalize`` too) runs them, on a cluster's workers when
there is one. The algorithm is :mod:`tilerseg.instances`; this module owns its files::

    OUT.zarr.partial/instances/
        provisional.zarr/components     uint32 chunk-local ids (with each tile); the
                                        provisional id adds the chunk's base
        provisional.zarr/markers        the same for the markers ("split", pass 2)
        first/K.npz                     chunk K: component count, face slabs, boxes of
                                        the components on its faces (with each tile)
        markers/K.npz                   chunk K: marker count and face slabs (pass 2)
        final/K.npz                     chunk K: its object rows (pass 3, after the
                                        chunk of labels/instances/0 is stored)
        objects.csv | objects.parquet   the table, moved beside the output at commit

Every file is written atomically after the data it describes, so a pass redone after a
crash rewrites the same values (the ids are a function of the chunk grid only).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from upath import UPath

from ..errors import InvalidArgumentError
from ..instances import (IdMap, ObjectStats, elevation, face_pairs, id_dtype, label_local,
                         markers, provisional_ids, span_of, split_components)
from ..io import remote
from ..io.chunks import COMPRESSOR
from ..io.writers import INSTANCE_NAME, OutputSpec, decode_probabilities, encode_probabilities
from ..labels import LabelPolicy
from .cores import available_cores
from .workdir import store_of
from .options import INSTANCE_MODES, TABLE_FORMATS

__all__ = ["INSTANCE_MODES", "TABLE_FORMATS", "InstanceRun", "create_provisional",
           "table_path", "foreground", "Mapper", "local_mapper"]

log = logging.getLogger(__name__)

PROVISIONAL = "provisional.zarr"
DEFAULT_CONTEXT = {2: 128, 3: 32}
"""``split_context`` by number of spatial axes, when not given."""

Mapper = Callable[[Callable[..., Any], list], list]
"""``mapper(fn, items) -> [fn(*item) for item in items]``, possibly in parallel."""


def local_mapper(fn: Callable[..., Any], items: list) -> list:
    """Run ``fn(*item)`` for each item on this process's threads (one per core it may use)."""
    with ThreadPoolExecutor(max_workers=max(1, min(len(items), available_cores())),
                            thread_name_prefix="tilerseg-instances") as pool:
        return list(pool.map(lambda item: fn(*item), items))


def table_path(out: UPath, fmt: str) -> UPath:
    """Where the object table of output ``out`` (a location, see
    :func:`~tilerseg.io.remote.output_location`) goes: ``slide.zarr`` ->
    ``slide.objects.csv`` beside it."""
    name = out.name[: -len(".zarr")] if out.name.endswith(".zarr") else out.name
    return out.with_name(f"{name}.objects.{fmt}")


def foreground(probs: np.ndarray, policy: LabelPolicy, dtype: str) -> np.ndarray:
    """The instance foreground (boolean, ``(*spatial)``) of ``(C, *spatial)`` float
    probabilities, as stored.

    The probabilities are first rounded as the output stores them (``dtype``), so that
    the instances can be recomputed from the output. The foreground is the foreground
    class of a two-class (or sigmoid) model, and every class but 0 of a larger one.
    """
    labels = policy(decode_probabilities(encode_probabilities(probs, dtype)))
    return labels == policy.foreground if policy.num_classes <= 2 else labels != 0


def foreground_probability(probs: np.ndarray, policy: LabelPolicy) -> np.ndarray:
    """The probability of the instance foreground: the foreground class of a one- or
    two-class model, 1 - p(class 0) of a larger one."""
    if policy.num_classes > 2:
        return np.asarray(1.0 - probs[0], np.float32)
    return np.asarray(policy.foreground_probability(probs), np.float32)


def create_provisional(work_path: Path, spec: OutputSpec, mode: str) -> None:
    """Create the provisional label arrays of a new work directory (before it is renamed
    into place, so that processes never race to create them)."""
    store = os.fspath(work_path / "instances" / PROVISIONAL)
    names = ["components"] + (["markers"] if mode == "split" else [])
    for name in names:
        zarr.create_array(store, name=name, shape=spec.shape, chunks=spec.chunks,
                          dtype=np.uint32, fill_value=0, zarr_format=3)
    for sub in ("first", "markers", "final"):
        (work_path / "instances" / sub).mkdir(parents=True, exist_ok=True)


def _save(path: Path, **arrays: Any) -> None:
    """Write a compressed npz atomically."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _faces(labels: np.ndarray) -> dict[str, np.ndarray]:
    """The first and last slab of each axis."""
    out = {}
    for a in range(labels.ndim):
        out[f"lo{a}"] = np.ascontiguousarray(labels.take(0, axis=a))
        out[f"hi{a}"] = np.ascontiguousarray(labels.take(-1, axis=a))
    return out


def _on_faces(faces: dict[str, np.ndarray]) -> np.ndarray:
    """The distinct nonzero ids of a chunk's faces (:func:`_faces`)."""
    ids = np.unique(np.concatenate([f.ravel() for f in faces.values()]))
    return ids[ids != 0]


class InstanceRun:
    """The instance passes of one run, from its work directory.

    Parameters
    ----------
    work_path : Path
        The run's work directory (``OUT.zarr.partial``).
    manifest : dict
        Its manifest.
    """

    def __init__(self, work_path: Path, manifest: dict[str, Any]) -> None:
        from ..io.writers import spec_from_dict

        self.path = Path(work_path) / "instances"
        self.store = store_of(work_path, manifest)  # remote: a URL
        self.spec = spec_from_dict(manifest["spec"])
        options = manifest["options"]
        self.shape = tuple(self.spec.shape)
        self.mode = options.get("instances", "components")
        self.radius = int(options.get("split_radius", 3))
        self.context = int(options.get("split_context") or DEFAULT_CONTEXT[len(self.shape)])
        self.table = options.get("object_table")
        self.policy = LabelPolicy(self.spec.num_classes, **manifest["resolved"]["labels"])
        self.chunks = tuple(min(c, n) for c, n in zip(self.spec.chunks, self.shape))
        self.grid = tuple(-(-n // c) for n, c in zip(self.shape, self.chunks))
        self.span = span_of(self.chunks)
        self.ndim = len(self.shape)
        self._arrays: dict[str, zarr.Array] = {}

    @classmethod
    def of(cls, work_path: Path, manifest: dict[str, Any]) -> InstanceRun | None:
        """The instance passes of a run, or None when it writes no instances."""
        if not manifest["spec"].get("instances"):
            return None
        return cls(work_path, manifest)

    # -- chunk arithmetic ------------------------------------------------------------------
    def __len__(self) -> int:
        return math.prod(self.grid)

    def chunk_of(self, region: Sequence[slice]) -> int:
        """Linear index of the chunk a region starts in."""
        return int(np.ravel_multi_index(
            tuple(s.start // c for s, c in zip(region, self.chunks)), self.grid))

    def region(self, chunk: int) -> tuple[slice, ...]:
        """The spatial region of a chunk."""
        index = np.unravel_index(chunk, self.grid)
        return tuple(slice(i * c, min((i + 1) * c, n))
                     for i, c, n in zip(index, self.chunks, self.shape))

    def window(self, chunk: int, margin: int) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
        """A chunk grown by ``margin`` (clipped to the image), and the chunk within it."""
        region = self.region(chunk)
        grown = tuple(slice(max(0, s.start - margin), min(n, s.stop + margin))
                      for s, n in zip(region, self.shape))
        inner = tuple(slice(s.start - g.start, s.stop - g.start) for s, g in zip(region, grown))
        return grown, inner

    def parts(self, window: Sequence[slice]) -> Iterator[tuple[int, tuple[slice, ...],
                                                             tuple[slice, ...]]]:
        """The chunks a window overlaps: (chunk, region in the image, region in the window)."""
        ranges = [range(s.start // c, -(-s.stop // c)) for s, c in zip(window, self.chunks)]
        for index in np.ndindex(*[len(r) for r in ranges]):
            cell = tuple(r[i] for r, i in zip(ranges, index))
            image = tuple(slice(max(w.start, i * c), min(w.stop, (i + 1) * c))
                          for w, i, c in zip(window, cell, self.chunks))
            local = tuple(slice(s.start - w.start, s.stop - w.start) for s, w in zip(image, window))
            yield int(np.ravel_multi_index(cell, self.grid)), image, local

    def array(self, name: str) -> zarr.Array:
        """A provisional array (``components``, ``markers``), ``instances`` (the final
        level 0) or ``probabilities`` (level 0 of the output), opened once."""
        if name not in self._arrays:
            store, path = {
                "instances": (self.store, f"labels/{INSTANCE_NAME}/0"),
                "probabilities": (self.store, "0"),
            }.get(name, (self.path / PROVISIONAL, name))
            self._arrays[name] = zarr.open_array(str(store), path=path, mode="r+",
                                                 zarr_format=3)
        return self._arrays[name]

    # -- pass 1: with each tile --------------------------------------------------------------
    def first_pass(self, region: Sequence[slice], probs: np.ndarray) -> None:
        """Label one chunk of a tile's probabilities and record its faces."""
        chunk = self.chunk_of(region)
        local, count = label_local(foreground(probs, self.policy, self.spec.probabilities))
        self.array("components")[tuple(region)] = local
        faces = _faces(local)
        boxes = ObjectStats.boxes(local, _on_faces(faces), [s.start for s in region])
        boxes[:, 0] += chunk * self.span  # provisional ids
        _save(self.path / "first" / f"{chunk}.npz", count=count, boxes=boxes, **faces)

    # -- pass 2: markers ("split") -------------------------------------------------------------
    def marker_pass(self, chunk: int) -> None:
        """Erode the foreground around one chunk and label the markers in it."""
        grown, inner = self.window(chunk, self.radius)
        mask = self.array("components")[grown] > 0
        eroded = markers(mask, self.radius)[inner]
        local, count = label_local(eroded)
        self.array("markers")[self.region(chunk)] = local
        _save(self.path / "markers" / f"{chunk}.npz", count=count, **_faces(local))

    # -- between the passes: the id maps -------------------------------------------------------
    def _records(self, sub: str) -> Iterator[tuple[int, Any]]:
        for k in range(len(self)):
            with np.load(self.path / sub / f"{k}.npz") as record:
                yield k, {name: record[name] for name in record.files}

    def build_ids(self, sub: str) -> tuple[IdMap, np.ndarray]:
        """Merge the face equivalences of one pass (``first`` or ``markers``).

        Returns
        -------
        (IdMap, numpy.ndarray)
            The ids, and the boxes of the components on chunk faces (rows ``[id,
            min..., max...]``, level-0 pixels; empty for ``markers``).
        """
        counts, pairs, boxes, his = [], [], [], {}
        for k, record in self._records(sub):
            counts.append(int(record["count"]))
            if "boxes" in record:
                boxes.append(record["boxes"])
            index = np.unravel_index(k, self.grid)
            for a in range(self.ndim):
                if index[a] > 0:  # the face shared with the chunk before along axis a
                    before = list(index)
                    before[a] -= 1
                    prev = int(np.ravel_multi_index(tuple(before), self.grid))
                    pairs.append(face_pairs(his.pop((prev, a)),
                                            provisional_ids(record[f"lo{a}"], k, self.span)))
                if index[a] + 1 < self.grid[a]:
                    his[(k, a)] = provisional_ids(record[f"hi{a}"], k, self.span)
        ids = IdMap.build(counts, pairs, self.span)
        box = (np.concatenate(boxes) if boxes else np.zeros((0, 1 + 2 * self.ndim)))
        return ids, box

    def oversized(self, ids: IdMap, boxes: np.ndarray) -> np.ndarray:
        """Sorted root ids of components larger than the split context on some axis."""
        if not len(boxes):
            return np.zeros(0, np.uint64)
        nd = self.ndim
        roots = ids.root(boxes[:, 0].astype(np.uint64))
        order = np.argsort(roots, kind="stable")
        roots, boxes = roots[order], boxes[order]
        starts = np.flatnonzero(np.r_[True, roots[1:] != roots[:-1]])
        lo = np.minimum.reduceat(boxes[:, 1:1 + nd], starts, axis=0)
        hi = np.maximum.reduceat(boxes[:, 1 + nd:], starts, axis=0)
        big = ((hi - lo) > self.context).any(axis=1)
        return roots[starts][big]

    # -- pass 3: final ids ---------------------------------------------------------------------
    def final_pass(self, chunk: int, maps: dict[str, Any]) -> None:
        """Write one chunk of ``labels/instances`` and its object rows."""
        region = self.region(chunk)
        comps: IdMap = maps["components"]
        if self.mode == "components":
            dense = self.array("components")[region]
            count = int(dense.max(initial=0))
            table = comps.lookup(chunk * self.span + np.arange(count + 1, dtype=np.uint64))
            table[0] = 0
            final = table[dense]
        else:
            final, dense, count, table = self._split(chunk, maps)
        self.array("instances")[region] = final.astype(self.array("instances").dtype)
        rows = ObjectStats.of_dense(dense, count, table, [s.start for s in region])
        edge = np.isin(rows[:, 0], _on_faces(_faces(final)))
        _save(self.path / "final" / f"{chunk}.npz", complete=rows[~edge], partial=rows[edge])

    def _tables(self, name: str, ids: IdMap, window: tuple[slice, ...]
                ) -> list[tuple[tuple[slice, ...], np.ndarray, np.ndarray]]:
        """The chunk parts of a provisional array over a window: (where in the window,
        stored local ids, final id of each local id)."""
        array, out = self.array(name), []
        for chunk, image, local in self.parts(window):
            stored = array[image]
            count = int(stored.max(initial=0))
            table = ids.lookup(chunk * self.span + np.arange(count + 1, dtype=np.uint64))
            table[0] = 0
            out.append((local, stored, table))
        return out

    def _lookup(self, name: str, ids: IdMap, window: tuple[slice, ...]) -> np.ndarray:
        """Final ids of a provisional array over a window, chunk by chunk."""
        out = np.zeros(tuple(s.stop - s.start for s in window), np.int64)
        for local, stored, table in self._tables(name, ids, window):
            out[local] = table[stored]
        return out

    def _compact(self, name: str, ids: IdMap, window: tuple[slice, ...]
                 ) -> tuple[np.ndarray, np.ndarray]:
        """A window's ids as indices into its sorted final ids (``present[0] == 0``)."""
        parts = self._tables(name, ids, window)
        present = np.unique(np.concatenate([np.zeros(1, np.int64)] + [t for _, _, t in parts]))
        index = np.zeros(tuple(s.stop - s.start for s in window), np.int32)
        for local, stored, table in parts:
            index[local] = np.searchsorted(present, table).astype(np.int32)[stored]
        return index, present

    def _split(self, chunk: int, maps: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, int,
                                                                np.ndarray]:
        grown, inner = self.window(chunk, self.context)
        comps, marks = maps["components"], maps["markers"]
        index, present = self._compact("components", comps, grown)
        seeds = self._lookup("markers", marks, grown)
        probs = decode_probabilities(self.array("probabilities")[(slice(None), *grown)])
        relief = elevation(foreground_probability(probs, self.policy), index > 0)
        big = maps["oversized"]  # sorted final ids of the components kept whole

        def whole(ids: np.ndarray) -> np.ndarray:
            at = np.minimum(np.searchsorted(big, ids), max(len(big) - 1, 0))
            return big[at] == ids if len(big) else np.zeros(len(ids), bool)

        dense, table = split_components(index, present, seeds, relief, whole, marks.count,
                                        inner)
        return table[dense], dense, len(table) - 1, table

    # -- driving the passes ------------------------------------------------------------------------
    def missing(self, sub: str) -> list[int]:
        """Chunks without a record of a pass."""
        have = {int(p.stem) for p in (self.path / sub).glob("*.npz")}
        return [k for k in range(len(self)) if k not in have]

    def run(self, mapper: Mapper | None = None) -> dict[str, Any]:
        """Passes 2 and 3 and the table, for a run whose tiles are all done.

        Parameters
        ----------
        mapper : callable, optional
            Runs ``(work path, pass, chunk)`` items, e.g. on a cluster (default: this
            process's threads).

        Returns
        -------
        dict
            ``mode``, ``objects``, ``dtype``, ``seconds`` and, when splitting,
            ``kept_whole`` (components larger than the context).
        """
        mapper = mapper or local_mapper
        start = time.perf_counter()
        work = os.fspath(self.path.parent)
        if self.mode == "split":
            todo = self.missing("markers")
            if todo:
                mapper(run_chunk, [(work, "markers", k) for k in todo])
        comps, boxes = self.build_ids("first")
        maps: dict[str, Any] = {"components": comps}
        count = comps.count
        info: dict[str, Any] = {"mode": self.mode}
        if self.mode == "split":
            maps["markers"], _ = self.build_ids("markers")
            maps["oversized"] = np.sort(comps.lookup(self.oversized(comps, boxes)))
            count += maps["markers"].count
            info["kept_whole"] = int(len(maps["oversized"]))
            if len(maps["oversized"]):
                log.warning("%d object(s) larger than the split context (%d px) were kept "
                            "whole; a larger --split-context splits them", len(maps["oversized"]),
                            self.context)
        dtype = id_dtype(count)
        self._create_output(dtype)
        _save(self.path / "ids.npz", **_pack(maps))
        todo = self.missing("final")
        if todo:
            mapper(run_chunk, [(work, "final", k) for k in todo])
        objects = self._write_table()
        info.update(objects=objects, dtype=str(dtype),
                    seconds=round(time.perf_counter() - start, 3))
        log.info("instances: %d objects (%s, %s) in %.1f s", objects, self.mode, dtype,
                 info["seconds"])
        return info

    def _create_output(self, dtype: np.dtype) -> None:
        """Create ``labels/instances/0`` (kept as it is when a resumed run made it)."""
        name = f"labels/{INSTANCE_NAME}/0"
        try:
            existing = zarr.open_array(str(self.store), path=name, mode="r",
                                       zarr_format=3)
        except (FileNotFoundError, KeyError, ValueError, zarr.errors.NodeNotFoundError):
            existing = None
        if existing is not None and existing.dtype == dtype:
            return
        zarr.create_array(str(self.store), name=name, shape=self.shape,
                          chunks=self.chunks, dtype=dtype, fill_value=0,
                          dimension_names=tuple(self.spec.spatial_axes.lower()),
                          zarr_format=3, compressors=COMPRESSOR, overwrite=True)

    def _write_table(self) -> int:
        """Count the objects; write the table into the work directory when asked.

        Rows stream out chunk by chunk (objects inside one chunk, in id order), then the
        objects that cross chunks, merged from their parts: memory holds one chunk's rows
        plus the parts of the crossing objects.
        """
        parts, count = ObjectStats(self.ndim), 0
        for _, record in self._records("final"):
            count += len(record["complete"])
            parts.add(record["partial"])
        merged = parts.merged()
        if self.table:
            def rows() -> Iterator[np.ndarray]:
                for _, record in self._records("final"):
                    yield ObjectStats.finish(record["complete"], self.ndim)
                yield ObjectStats.finish(merged, self.ndim)

            write_table(rows(), self.spec.spatial_axes, self.path / f"objects.{self.table}")
        return count + len(merged)



def place_tables(run: InstanceRun | None, out: Path, replacing: bool) -> None:
    """Move a run's object table beside ``out`` (once the output itself is there: see
    :meth:`~tilerseg.engine.workdir.WorkDir.commit`) and, when the run replaced an existing
    output, remove that output's other tables.

    Parameters
    ----------
    run : InstanceRun or None
        The run's instance passes (None: it writes no instances).
    out : Path
        The final output path.
    replacing : bool
        Whether the run replaces an existing output at ``out`` (``--overwrite``).
    """
    keep = run.table if run is not None else None
    if keep:
        remote.move_file(run.path / f"objects.{keep}", table_path(out, keep))
    if replacing:
        for fmt in TABLE_FORMATS:
            if fmt != keep:
                remote.remove(table_path(out, fmt))


def _pack(maps: dict[str, Any]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, value in maps.items():
        if isinstance(value, IdMap):
            for field in ("keys", "roots", "offsets"):
                out[f"{name}.{field}"] = getattr(value, field)
            out[f"{name}.meta"] = np.array([value.span, value.count], np.int64)
        else:
            out[name] = value
    return out


def _unpack(data: Any) -> dict[str, Any]:
    maps: dict[str, Any] = {}
    for name in {k.split(".")[0] for k in data.files}:
        if f"{name}.meta" in data.files:
            span, count = (int(v) for v in data[f"{name}.meta"])
            maps[name] = IdMap(span, data[f"{name}.keys"], data[f"{name}.roots"],
                               data[f"{name}.offsets"], count)
        else:
            maps[name] = data[name]
    return maps


@functools.lru_cache(maxsize=4)
def _opened(work: str, stamp: tuple[int, ...]) -> tuple[InstanceRun, dict[str, Any]]:
    """The run and its id maps, once per process for each version of their files."""
    import json

    with open(Path(work) / "manifest.json", encoding="utf-8") as f:
        run = InstanceRun(Path(work), json.load(f))
    maps = {}
    ids = run.path / "ids.npz"
    if ids.is_file():
        with np.load(ids) as data:
            maps = _unpack(data)
    return run, maps


def run_chunk(work: str, stage: str, chunk: int) -> None:
    """Run one pass on one chunk (a plain function of plain data, for cluster workers)."""
    manifest = os.stat(Path(work) / "manifest.json")  # a new run has a new manifest
    ids = Path(work) / "instances" / "ids.npz"
    stamp = (manifest.st_ino, manifest.st_mtime_ns,
             ids.stat().st_mtime_ns if ids.is_file() else 0)
    run, maps = _opened(work, stamp)
    if stage == "markers":
        run.marker_pass(chunk)
    elif stage == "final":
        run.final_pass(chunk, maps)
    else:
        raise InvalidArgumentError(f"unknown instance pass {stage!r}")


def write_table(batches: Iterable[np.ndarray], axes: str, path: Path) -> None:
    """Write object rows (:meth:`ObjectStats.finish`, in batches) as CSV or Parquet,
    atomically."""
    letters = axes.lower()
    names = ["label", "area"] + [f"bbox_min_{a}" for a in letters]
    names += [f"bbox_max_{a}" for a in letters] + [f"centroid_{a}" for a in letters]
    ints = 2 + 2 * len(letters)
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([(n, pa.int64() if k < ints else pa.float64())
                            for k, n in enumerate(names)])
        with pq.ParquetWriter(tmp, schema) as writer:
            for rows in batches:
                columns = [rows[:, k].astype(np.int64) if k < ints else rows[:, k]
                           for k in range(len(names))]
                writer.write_table(pa.Table.from_arrays(columns, schema=schema))
    else:
        fmt = ["%d"] * ints + ["%.3f"] * len(letters)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(",".join(names) + "\n")
            for rows in batches:
                np.savetxt(f, rows, fmt=fmt, delimiter=",")
    os.replace(tmp, path)


def check_table_format(fmt: str | None) -> None:
    """Refuse a table format (checked by :class:`RunOptions`) that cannot be written here."""
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise InvalidArgumentError(
                "object_table='parquet' needs pyarrow (pip install 'tilerseg[parquet]'); use csv") from None
