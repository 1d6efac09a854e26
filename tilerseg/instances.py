"""Instance labels of a chunked foreground, exact across chunk borders. numpy and scipy only.

The algorithm (see docs/instances.md):

1. Each chunk is labelled on its own (face connectivity, as :func:`scipy.ndimage.label`)
   with *provisional* ids that are unique without coordination: ``chunk * span + local``
   (:func:`label_chunk`).
2. The labels on the faces of adjacent chunks give equivalences (:func:`face_pairs`),
   merged into equivalence classes, each represented by its smallest id
   (:meth:`IdMap.build`): only labels that touch a chunk face take part, so this costs
   the boundary labels, never the image.
3. One relabel pass maps every provisional id to a compact final id
   (:meth:`IdMap.lookup`): the final ids of a chunk follow those of the chunks before it,
   in chunk order, then local order.

The optional split of touching objects (:func:`split_components`) is a seeded watershed
within each connected component: markers are the connected components of the
foreground eroded by a disc (ball) of radius ``r``, and the flood follows the
foreground probability (:func:`elevation`) on the component's own bounding box. It is
computed per chunk on a window of context around it, which is exact for every component
whose extent is at most that context (larger components are kept whole).

Examples
--------
>>> fg = np.array([[1, 1, 0, 1],
...                [0, 1, 0, 1]], bool)
>>> a, n = label_chunk(fg[:, :2], chunk=0, span=5)
>>> b, m = label_chunk(fg[:, 2:], chunk=1, span=5)
>>> ids = IdMap.build([n, m], face_pairs(a[:, -1], b[:, 0]), span=5)
>>> np.hstack([ids.lookup(a), ids.lookup(b)]).tolist()
[[1, 1, 0, 2], [0, 1, 0, 2]]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# scipy.ndimage is imported inside the functions that use it: every run imports this
# module (through the engine), and scipy.ndimage costs 0.23 s of a run's start-up

__all__ = ["label_chunk", "label_local", "provisional_ids", "face_pairs", "IdMap", "ball", "markers", "elevation",
           "split_components", "id_dtype", "ObjectStats", "span_of"]

BACKGROUND_ELEVATION = np.uint16(65535)


def span_of(chunk_shape: Sequence[int]) -> int:
    """The id span of one chunk: more than the most labels a chunk can hold."""
    return math.prod(int(c) for c in chunk_shape) + 1


def id_dtype(count: int) -> np.dtype:
    """``uint32`` for up to 2**32 - 1 ids, else ``uint64``."""
    return np.dtype(np.uint32) if count < 2**32 else np.dtype(np.uint64)


def label_local(foreground: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of one chunk (face connectivity), ids ``1..count`` (uint32)."""
    from scipy import ndimage
    local, count = ndimage.label(foreground)
    return local.astype(np.uint32, copy=False), int(count)


def provisional_ids(local: np.ndarray, chunk: int, span: int) -> np.ndarray:
    """Chunk-local ids made unique across chunks: ``chunk * span + local`` (0 stays 0)."""
    out = local.astype(np.uint64)
    out[local > 0] += np.uint64(chunk * span)
    return out


def label_chunk(foreground: np.ndarray, chunk: int, span: int) -> tuple[np.ndarray, int]:
    """Connected components of one chunk, with provisional ids unique across chunks.

    Parameters
    ----------
    foreground : numpy.ndarray of bool
        The chunk's foreground (any number of axes).
    chunk : int
        The chunk's linear index (C order over the chunk grid).
    span : int
        Ids per chunk (:func:`span_of` of the chunk shape).

    Returns
    -------
    labels : numpy.ndarray of uint64
        0 for background, else ``chunk * span + k`` with ``k`` in ``1..count``.
    count : int
        Number of components.
    """
    local, count = label_local(foreground)
    return provisional_ids(local, chunk, span), count


def face_pairs(last: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Equivalent id pairs across one chunk face.

    Parameters
    ----------
    last, first : numpy.ndarray
        The last slab of one chunk and the first slab of its neighbour along the same
        axis (same shape).

    Returns
    -------
    numpy.ndarray
        ``(K, 2)`` unique pairs of provisional ids that touch across the face.
    """
    both = (last > 0) & (first > 0)
    pairs = np.stack([last[both], first[both]], axis=1).astype(np.uint64)
    return np.unique(pairs, axis=0) if len(pairs) else pairs.reshape(0, 2)


@dataclass(frozen=True)
class IdMap:
    """Provisional ids to compact final ids, from chunk label counts and face equivalences.

    Attributes
    ----------
    span : int
        Ids per chunk.
    keys, roots : numpy.ndarray of uint64
        Sorted provisional ids that belong to a component represented by a smaller id,
        and that id (the component's smallest provisional id).
    offsets : numpy.ndarray of int64
        Final ids before each chunk's own components.
    count : int
        Number of components (the largest final id).
    """

    span: int
    keys: np.ndarray
    roots: np.ndarray
    offsets: np.ndarray
    count: int

    @classmethod
    def build(cls, counts: Sequence[int], pairs: Sequence[np.ndarray] | np.ndarray,
              span: int) -> IdMap:
        """Merge the equivalences of every chunk face (a union-find over boundary ids).

        Parameters
        ----------
        counts : sequence of int
            Components of each chunk, by linear chunk index.
        pairs : (K, 2) array or sequence of them
            Equivalent provisional ids (:func:`face_pairs`).
        span : int
            Ids per chunk.
        """
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        edges = (np.concatenate([np.asarray(p, np.uint64).reshape(-1, 2) for p in pairs])
                 if len(pairs) and not isinstance(pairs, np.ndarray) else
                 np.asarray(pairs, np.uint64).reshape(-1, 2))
        nodes = np.unique(edges)
        keys = roots = np.zeros(0, np.uint64)
        if len(nodes):
            index = np.searchsorted(nodes, edges)
            graph = coo_matrix((np.ones(len(index), np.int8), (index[:, 0], index[:, 1])),
                               shape=(len(nodes), len(nodes)))
            _, component = connected_components(graph, directed=False)
            smallest = np.full(component.max() + 1, np.iinfo(np.int64).max, np.int64)
            np.minimum.at(smallest, component, np.arange(len(nodes)))  # nodes are sorted
            root = nodes[smallest[component]]
            merged = root != nodes
            keys, roots = nodes[merged], root[merged]
        counts = np.asarray(counts, np.int64)
        merged_per_chunk = np.bincount((keys // np.uint64(span)).astype(np.int64),
                                       minlength=len(counts))
        own = counts - merged_per_chunk[: len(counts)]
        offsets = np.concatenate([[0], np.cumsum(own)[:-1]]).astype(np.int64)
        return cls(int(span), keys, roots, offsets, int(own.sum()))

    def root(self, ids: np.ndarray) -> np.ndarray:
        """The representative (smallest) provisional id of each id's component."""
        ids = np.asarray(ids, np.uint64)
        out = ids.copy()
        if len(self.keys):
            pos = np.minimum(np.searchsorted(self.keys, ids), len(self.keys) - 1)
            hit = self.keys[pos] == ids
            out[hit] = self.roots[pos[hit]]
        return out

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Final ids (int64; 0 stays 0) of provisional ids of any shape."""
        ids = np.asarray(ids, np.uint64)
        values, inverse = np.unique(ids, return_inverse=True)
        root = self.root(values)
        span = np.uint64(self.span)
        chunk = (root // span).astype(np.int64)
        local = (root % span).astype(np.int64)
        before = (np.searchsorted(self.keys, root)
                  - np.searchsorted(self.keys, chunk.astype(np.uint64) * span))
        final = np.where(values == 0, 0,
                         self.offsets[np.minimum(chunk, len(self.offsets) - 1)] + local - before)
        return final[inverse].reshape(ids.shape)


def ball(radius: int, ndim: int) -> np.ndarray:
    """A digital disc (ball): the offsets within Euclidean ``radius``."""
    r = int(radius)
    grid = np.indices((2 * r + 1,) * ndim) - r
    return (grid**2).sum(axis=0) <= r * r


def markers(foreground: np.ndarray, radius: int) -> np.ndarray:
    """The foreground eroded by :func:`ball` of ``radius`` (outside the array is background).

    Only pixels at least ``radius`` from the array's edge are exact for a larger image;
    callers read that much context around a chunk.
    """
    from scipy import ndimage
    if radius == 0:
        return foreground.astype(bool, copy=True)
    return ndimage.binary_erosion(foreground, structure=ball(radius, foreground.ndim),
                                  border_value=0)


def elevation(probability: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """The flood's relief: ``round(65534 (1 - p))`` on the foreground, 65535 elsewhere."""
    relief = np.rint((1.0 - np.clip(probability.astype(np.float32), 0, 1)) * 65534.0)
    out = relief.astype(np.uint16)
    out[~foreground] = BACKGROUND_ELEVATION
    return out


def split_components(index: np.ndarray, present: np.ndarray, seeds: np.ndarray,
                     relief: np.ndarray, whole: Callable[[np.ndarray], np.ndarray], offset: int,
                     region: tuple[slice, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split the connected components of a window by a seeded watershed, one at a time.

    Parameters
    ----------
    index : numpy.ndarray of int
        Every pixel's component as an index into ``present`` (0 = background); every
        component that ``region`` meets must lie entirely inside the window.
    present : numpy.ndarray of int64
        The final ids of the window's components, ``present[0] == 0``.
    seeds : numpy.ndarray of int64
        Final marker id of every marker pixel (0 elsewhere); markers lie in components.
    relief : numpy.ndarray of uint16
        :func:`elevation`.
    whole : callable
        ``whole(ids) -> bool array``: components to keep whole (too large to split).
    offset : int
        A component kept whole, or without a marker, gets id ``offset + component id``.
    region : tuple of slice, optional
        The part of the window wanted (default all of it); only components meeting it
        are flooded.

    Returns
    -------
    (dense, ids)
        Over ``region``, local labels ``dense`` (0 = background) and each local label's
        object id ``ids[dense]``: a component with one marker takes that marker's id; one
        with several is flooded from them by :func:`scipy.ndimage.watershed_ift`, on its
        own bounding box with everything outside the component at the top of the relief
        (65535) and unseeded. Each flood sees only its component's box, so the result
        does not depend on the window around it: the same on a chunk's window as on the
        whole image.
    """
    from scipy import ndimage
    region = region or tuple(slice(0, n) for n in index.shape)
    at_seed = seeds > 0
    top = np.int64(seeds.max(initial=0)) + 1
    keys = np.unique(index[at_seed].astype(np.int64) * top + seeds[at_seed])
    owner, marker = keys // top, keys % top  # (component, marker) pairs, sorted
    count = np.bincount(owner, minlength=len(present))
    first = np.zeros(len(present), np.int64)
    seeded, where = np.unique(owner, return_index=True)
    first[seeded] = marker[where]  # the smallest marker id of each seeded component
    keep = whole(present) | (count == 0)
    ids = np.where(keep, present + offset, first)
    ids[0] = 0
    dense = index[region].astype(np.int64)
    wanted = np.flatnonzero(np.bincount(dense.ravel(), minlength=len(present)))
    split = wanted[(count[wanted] > 1) & ~keep[wanted] & (wanted != 0)]
    if not len(split):
        return dense, ids
    boxes = ndimage.find_objects(index)  # component index k is label k
    extra = [ids]
    for k in split:
        box = boxes[k - 1]
        inside = index[box] == k
        local = np.where(inside, seeds[box], 0)
        values, compact = np.unique(local, return_inverse=True)  # values[0] == 0
        flooded = ndimage.watershed_ift(np.where(inside, relief[box], BACKGROUND_ELEVATION),
                                        compact.reshape(local.shape).astype(np.int32))
        # the component's pixels that fall in the region get new local labels
        cut = tuple(slice(max(b.start, r.start), min(b.stop, r.stop)) for b, r in zip(box, region))
        in_box = tuple(slice(c.start - b.start, c.stop - b.start) for c, b in zip(cut, box))
        in_region = tuple(slice(c.start - r.start, c.stop - r.start) for c, r in zip(cut, region))
        mine = inside[in_box]
        base = sum(len(e) for e in extra)
        dense[in_region][mine] = base + flooded[in_box][mine] - 1  # watershed labels 1..
        extra.append(values[1:])
    return dense, np.concatenate(extra)


class ObjectStats:
    """Area, bounding box and centroid of objects, accumulated over chunks.

    Each row: id, area (pixels), bounding box (min per axis, then max per axis,
    exclusive) and centroid per axis, in level-0 pixel coordinates.
    """

    def __init__(self, ndim: int) -> None:
        self.ndim = ndim
        self._parts: dict[int, np.ndarray] = {}

    @staticmethod
    def of_dense(dense: np.ndarray, count: int, ids: np.ndarray,
                 origin: Sequence[int]) -> np.ndarray:
        """Rows ``[id, area, min..., max..., coordinate sums...]`` of one chunk.

        Parameters
        ----------
        dense : numpy.ndarray of int
            Chunk-local labels ``0..count`` (0 = background).
        count : int
            Largest local label.
        ids : numpy.ndarray
            Final id of each local label (``ids[0]`` is ignored).
        origin : sequence of int
            The chunk's position in the image.

        Returns
        -------
        numpy.ndarray
            One float64 row per local label; two local labels of one chunk may share an
            id (parts joined outside the chunk): :meth:`add` merges such rows.
        """
        from scipy import ndimage
        ndim = dense.ndim
        flat = dense.ravel()
        rows = np.zeros((count + 1, 2 + 3 * ndim), np.float64)
        rows[:, 0] = ids[: count + 1]
        rows[:, 1] = np.bincount(flat, minlength=count + 1)
        for k, box in enumerate(ndimage.find_objects(dense, max_label=count), start=1):
            if box is None:
                continue
            for a, s in enumerate(box):
                rows[k, 2 + a] = s.start + origin[a]
                rows[k, 2 + ndim + a] = s.stop + origin[a]
        for a in range(ndim):
            shape = [1] * ndim
            shape[a] = -1
            coords = np.arange(dense.shape[a], dtype=np.float64).reshape(shape) + origin[a]
            rows[:, 2 + 2 * ndim + a] = np.bincount(
                flat, np.broadcast_to(coords, dense.shape).ravel(), count + 1)
        rows = rows[1:]
        return rows[rows[:, 1] > 0]

    @staticmethod
    def boxes(dense: np.ndarray, chosen: np.ndarray, origin: Sequence[int]) -> np.ndarray:
        """Rows ``[local label, min..., max...]`` (max exclusive) of the ``chosen`` local
        labels of a chunk (:meth:`of_dense`'s labels)."""
        from scipy import ndimage
        ndim = dense.ndim
        slices = ndimage.find_objects(dense, max_label=int(chosen.max(initial=0)))
        rows = np.zeros((len(chosen), 1 + 2 * ndim), np.float64)
        rows[:, 0] = chosen
        for k, label in enumerate(chosen):
            for a, s in enumerate(slices[int(label) - 1]):
                rows[k, 1 + a] = s.start + origin[a]
                rows[k, 1 + ndim + a] = s.stop + origin[a]
        return rows

    def add(self, rows: np.ndarray) -> None:
        """Merge rows of objects that may continue in other chunks."""
        nd = self.ndim
        for row in rows:
            key = int(row[0])
            have = self._parts.get(key)
            if have is None:
                self._parts[key] = row.copy()
                continue
            have[1] += row[1]
            have[2:2 + nd] = np.minimum(have[2:2 + nd], row[2:2 + nd])
            have[2 + nd:2 + 2 * nd] = np.maximum(have[2 + nd:2 + 2 * nd], row[2 + nd:2 + 2 * nd])
            have[2 + 2 * nd:] += row[2 + 2 * nd:]

    def merged(self) -> np.ndarray:
        """The merged rows, sorted by id."""
        if not self._parts:
            return np.zeros((0, 2 + 3 * self.ndim))
        return np.stack([self._parts[k] for k in sorted(self._parts)])

    @staticmethod
    def finish(rows: np.ndarray, ndim: int) -> np.ndarray:
        """Rows with the coordinate sums turned into centroids."""
        out = rows.copy()
        area = np.maximum(out[:, 1:2], 1)
        out[:, 2 + 2 * ndim:] = out[:, 2 + 2 * ndim:] / area
        return out
