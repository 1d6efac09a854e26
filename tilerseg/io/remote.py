"""Locations: local paths and fsspec URLs as one type, and what an output needs of them.

A *location* is where an input or output lives, as a :class:`upath.UPath` (universal-pathlib):
a local path is a ``PosixUPath`` (a :class:`pathlib.Path`, with every guarantee of one),
a URL on an fsspec filesystem (``memory://``, ``s3://``, ``gs://``, ``https://``...) a
``UPath`` of that filesystem, with the same path algebra (``/``, ``name``, ``with_name``,
``parent``) and its fsspec filesystem at ``.fs``. :func:`location` makes one from what a
user gives (``file://`` URLs are local paths); Zarr reads and writes ``str(location)``
(zarr takes URL strings as stores, through ``zarr.storage.FsspecStore``).

What this module adds to universal-pathlib is the policy of an output's life, the same on
every filesystem: :func:`exists`, :func:`remove`, :func:`move` and :func:`move_file` turn
what a filesystem raises into one-line errors naming the location, look past fsspec's
listing caches (zarr writes through its own filesystem instance), and move a store with
its root ``zarr.json`` last. On an object store a "move" is a copy and a delete, not an
atomic rename, and there are no exclusive-create lock files; so the engine refuses, for
non-local outputs, what relies on them (``--resume``, ``--shard``, clusters): see
:func:`check_remote_run`.

Examples
--------
>>> is_url("s3://bucket/slide.tif"), is_url("/data/slide.tif"), is_remote("file:///tmp/a")
(True, False, False)
>>> out = location("memory://runs/out.zarr")
>>> str(out.with_name(".out.zarr.partial-1")), out.name, is_local(out)
('memory://runs/.out.zarr.partial-1', 'out.zarr', False)
>>> here = location("file:///data/out.zarr")
>>> here.as_posix(), is_local(here), staging_name(here).startswith(".out.zarr.partial-")
('/data/out.zarr', True, True)
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from upath import UPath

from tilerseg.errors import (ImageNotFoundError, InvalidArgumentError, InvalidImageError,
                             OutputError, TilersegError)
from tilerseg.io.raw import short_reason

__all__ = [
    "PATHS", "check_remote_run", "exists", "filesystem", "identity", "is_local", "is_remote", "is_url",
    "local_path", "location", "move", "move_file", "open_file", "output_location", "probe",
    "protocol", "remove", "staging_name",
]

#: what names a location: a path, a URL string, a ``UPath`` (a remote ``UPath`` is no
#: ``os.PathLike``: it has no local path)
PATHS = (str, os.PathLike, UPath)
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*(?:::[A-Za-z][A-Za-z0-9+.\-]*)*)://")
_LOCAL_PROTOCOLS = ("file", "local")


def is_url(path: Any) -> bool:
    """Whether ``path`` is a string of the form ``protocol://...``."""
    return isinstance(path, str) and _URL.match(path) is not None


def protocol(url: str) -> str:
    """The protocol of a URL (the last one of a chain such as ``simplecache::s3://``).

    Examples
    --------
    >>> protocol("gs://bucket/a.zarr"), protocol("simplecache::s3://b/k")
    ('gs', 's3')
    """
    match = _URL.match(url)
    if match is None:
        raise InvalidArgumentError(f"'{url}' is not a URL (protocol://...)")
    return match.group(1).split("::")[-1].lower()


def is_remote(path: Any) -> bool:
    """Whether ``path`` is a URL that is not a local file (``file://``)."""
    return is_url(path) and protocol(path) not in _LOCAL_PROTOCOLS


def local_path(path: str | os.PathLike | UPath) -> str:
    """A ``file://`` URL as an absolute local path; any other path unchanged.

    Raises
    ------
    InvalidArgumentError
        A ``file://`` URL whose path is not absolute (``file://out.zarr``): one line.

    Examples
    --------
    >>> local_path("file:///data/slide.tif"), local_path("/data/slide.tif")
    ('/data/slide.tif', '/data/slide.tif')
    """
    text = str(path) if isinstance(path, UPath) else os.fspath(path)  # a URL's: its URL
    if is_url(text) and protocol(text) in _LOCAL_PROTOCOLS and "::" not in text:
        rest = text.split("://", 1)[1]
        if not rest.startswith("/"):
            raise InvalidArgumentError(
                f"'{text}': a file:// URL needs an absolute path (file:///...; or give the "
                "path without file://)")
        return os.path.abspath(rest)
    return text


def location(path: str | os.PathLike | UPath) -> UPath:
    """The location of ``path``: a local path (a ``file://`` URL too) as a ``PosixUPath``,
    as given (relative stays relative), or a URL as the ``UPath`` of its fsspec filesystem,
    which is made now, so that a URL no filesystem can serve fails here.

    Raises
    ------
    InvalidArgumentError
        A relative ``file://`` URL; an unknown protocol, or one whose implementation
        package (s3fs, gcsfs, adlfs...) is not installed; a URL its filesystem cannot be
        made from alone: one line naming what to do.

    Examples
    --------
    >>> location("memory://runs/out.zarr/")
    MemoryPath('/runs/out.zarr', protocol='memory')
    >>> location("file:///data/slide.tif") == Path("/data/slide.tif")
    True
    """
    if isinstance(path, UPath) and not isinstance(path, Path) and \
            path.protocol not in _LOCAL_PROTOCOLS:  # file:// UPaths: local paths, below
        return path
    text = local_path(path)
    if not is_url(text):
        return UPath(text)
    name = protocol(text)
    try:
        with warnings.catch_warnings():  # a protocol universal-pathlib has no class of its
            warnings.filterwarnings("ignore", "UPath .* not explicitly implemented")  # own
            loc = UPath(text)
        loc.fs  # noqa: B018 - made now: the URL's errors come here
        return loc
    except ImportError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InvalidArgumentError(
            f"{text}: the '{name}' protocol needs a package that is not installed ({reason})"
        ) from None
    except ValueError as err:
        if any(m in str(err).lower() for m in ("protocol not known", "unsupported filesystem")):
            raise InvalidArgumentError(
                f"{text}: unknown URL protocol '{name}' (no fsspec implementation of it)"
            ) from None
        raise InvalidArgumentError(f"{text}: {err}") from None
    except TilersegError:
        raise
    except Exception as err:  # noqa: BLE001 - a protocol that needs other arguments...
        raise InvalidArgumentError(f"{text}: cannot use this URL ({_reason(err)})") from None


def is_local(loc: os.PathLike) -> bool:
    """Whether the location ``loc`` is on this machine's filesystem (a :class:`~pathlib.Path`:
    renames are atomic, lock files exclusive)."""
    return isinstance(loc, Path)


def filesystem(loc: UPath) -> tuple[Any, str]:
    """The fsspec filesystem of a remote location and the path on it, its listing caches
    cleared (listings cached earlier miss what zarr's own filesystem instance wrote)."""
    fs = loc.fs
    fs.invalidate_cache()
    return fs, loc.path


def _reason(err: BaseException) -> str:
    """An exception as ``"Type: message"`` on one line."""
    text = short_reason(err)
    return f"{type(err).__name__}: {text}" if text != type(err).__name__ else text


@contextlib.contextmanager
def _reporting(location: UPath, what: str,
               error: type[TilersegError] = OutputError) -> Iterator[None]:
    """Turn what a filesystem raises that is neither a :class:`TilersegError` nor an
    ``OSError`` (missing credentials, a protocol's own errors) into a one-line ``error``
    naming ``location``; ``KeyboardInterrupt`` passes."""
    try:
        yield
    except (TilersegError, OSError):
        raise
    except Exception as err:  # noqa: BLE001
        raise error(f"cannot {what} '{location}': {_reason(err)}") from None


def open_file(loc: UPath) -> Any:
    """A seekable binary file object on a remote file, reading only what is asked for.

    Remote filesystems read ahead in blocks of 256 KiB (fsspec's default is 5 MiB), so a
    tile of a tiled TIFF fetches about the tile, not megabytes around it.

    Raises
    ------
    ImageNotFoundError
        There is no file at ``loc``.
    """
    fs, path = filesystem(loc)
    try:
        f = fs.open(path, "rb", block_size=1 << 18, cache_type="readahead")
    except FileNotFoundError:
        raise ImageNotFoundError(f"image {loc} does not exist") from None
    except TypeError:  # a filesystem that takes no block options
        f = fs.open(path, "rb")
    return _ReadOnly(f) if f.writable() else f  # memory:// files are BytesIO


class _ReadOnly(io.RawIOBase):
    """A file opened for reading that says so (tifffile writes to writable files)."""

    def __init__(self, f: Any) -> None:
        super().__init__()
        self._f = f
        self.name = getattr(f, "name", None) or getattr(f, "path", "")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def read(self, size: int | None = -1) -> bytes:
        return self._f.read(-1 if size is None else size)

    def readinto(self, buffer: Any) -> int:
        data = self._f.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def close(self) -> None:
        self._f.close()
        super().close()


def identity(url: str) -> dict[str, Any]:
    """A remote input's identity without reading its pixels: its URL as given, and the
    number and total size of the files that make it up (a Zarr store: its metadata
    files), with their latest modification time where the filesystem reports one (else 0)."""
    loc = location(url)
    fs, path = filesystem(loc)
    names = ("zarr.json", ".zarray", ".zgroup", ".zattrs")
    with _reporting(loc, "read", InvalidImageError):
        kind, info = probe(fs, path)
        if kind == "file":
            infos = [info]
        else:
            infos = [i for i in fs.find(path, maxdepth=3, detail=True).values()
                     if i["name"].rsplit("/", 1)[-1] in names]
    mtimes = [_mtime_ns(i) for i in infos]
    return {"path": url, "files": len(infos),
            "size": sum(int(i.get("size") or 0) for i in infos),
            "mtime_ns": max(mtimes, default=0)}


def probe(fs: Any, path: str) -> tuple[str | None, dict[str, Any] | None]:
    """What is at ``path`` on the fsspec filesystem ``fs``, without reading a file's
    contents: ``"zarr"`` (a Zarr store), ``"file"``, ``"folder"`` or None (nothing),
    and the filesystem's ``info`` of it (None if nothing).

    A file is asked about with ``info`` (a HEAD request over HTTP), not with ``isdir`` or
    ``isfile``: fsspec's HTTP ``isdir`` downloads the whole file and its ``isfile`` starts
    to. A Zarr store is recognised by its metadata file; over HTTP(S) it is looked for
    also when the URL answers like a file (a server's listing page).

    Examples
    --------
    >>> import fsspec
    >>> fs = fsspec.filesystem("memory")
    >>> fs.pipe_file("/probe-doc/a.tif", b"II*")
    >>> probe(fs, "/probe-doc/a.tif")[0], probe(fs, "/probe-doc")[0], probe(fs, "/none")[0]
    ('file', 'folder', None)
    >>> fs.rm("/probe-doc", recursive=True)
    """
    try:
        info = fs.info(path)
    except FileNotFoundError:
        info = None
    is_file = info is not None and info.get("type") != "directory"
    http = any(p in ("http", "https") for p in (fs.protocol if isinstance(
        fs.protocol, (tuple, list)) else (fs.protocol,)))
    if (not is_file or http) and any(fs.exists(f"{path.rstrip('/')}/{m}")
                                     for m in ("zarr.json", ".zarray", ".zgroup")):
        return "zarr", info
    return ("file" if is_file else "folder" if info is not None else None), info


def _mtime_ns(info: dict[str, Any]) -> int:
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if hasattr(value, "timestamp"):
            return int(value.timestamp() * 1e9)
        if isinstance(value, (int, float)):
            return int(value * 1e9)
    return 0


# -- output locations ---------------------------------------------------------------------


def output_location(out: str | os.PathLike) -> UPath:
    """Where an output goes: a local absolute path (``file://`` URLs included), or a
    remote location (its filesystem made, see :func:`location`).

    Raises
    ------
    InvalidArgumentError
        A chained URL (``simplecache::s3://...``: for inputs only), a relative
        ``file://`` URL, or an unusable protocol.

    Examples
    --------
    >>> output_location("file:///data/out.zarr").as_posix()
    '/data/out.zarr'
    >>> str(output_location("memory://runs/out.zarr/"))
    'memory://runs/out.zarr'
    """
    if is_url(out) and "::" in str(out).split("://", 1)[0]:
        raise InvalidArgumentError(
            f"'{out}': a chained URL cannot be an output (caches are for reading); give "
            "the URL of the filesystem itself")
    loc = location(out)
    return UPath(os.path.abspath(loc)) if is_local(loc) else loc


def exists(loc: UPath | str) -> bool:
    """Whether anything is at ``loc`` (locally, a dangling symbolic link counts)."""
    loc = location(loc)
    if is_local(loc):
        return os.path.lexists(loc)
    with _reporting(loc, "reach"):
        fs, path = filesystem(loc)
        return bool(fs.exists(path))


def remove(loc: UPath | str, *, ignore_errors: bool = False) -> None:
    """Delete whatever is at ``loc`` (a folder or prefix recursively); nothing if nothing
    is there. A local folder is removed ignoring errors, as ``shutil.rmtree`` does with
    ``ignore_errors``; ``ignore_errors`` extends that to everything."""
    try:
        loc = location(loc)
        if not is_local(loc):
            with _reporting(loc, "remove"):
                fs, path = filesystem(loc)
                if fs.exists(path):
                    fs.rm(path, recursive=True)
            return
        if loc.is_dir() and not loc.is_symlink():
            shutil.rmtree(loc, ignore_errors=True)
        elif os.path.lexists(loc):
            loc.unlink()
    except Exception:
        if not ignore_errors:
            raise


def move(source: UPath | str, target: UPath | str) -> None:
    """Move ``source`` to ``target`` (which must not exist): a rename on a local disk; on
    a remote filesystem a copy of every file under ``source`` (server-side on object
    stores), then the deletion of ``source``: not atomic, but never half done.

    The root ``zarr.json`` (of a Zarr store: what says it is complete) is copied last,
    after every other file (filesystems copy a list concurrently, in any order). If
    anything fails or is interrupted (``BaseException``), what was copied to ``target``
    is removed again and ``source`` is left as it was; ``source`` is deleted only once
    everything is copied.

    Raises
    ------
    OSError
        Copying failed (``target`` is cleared again, ``source`` kept).
    OutputError
        The filesystem failed otherwise (the same), or the locations are on two
        filesystems.
    """
    source, target = location(source), location(target)
    if is_local(source) and is_local(target):
        os.rename(source, target)
        return
    if is_local(source) or is_local(target) or type(source.fs) is not type(target.fs):
        raise OutputError(f"cannot move '{source}' to '{target}': not on one filesystem")
    with _reporting(source, "move"):
        fs, src = filesystem(source)
        files = [src] if fs.isfile(src) else sorted(fs.find(src))
    if not files:
        raise FileNotFoundError(f"nothing to move at {source}")
    dst = target.path
    root = f"{src}/zarr.json"
    try:
        with _reporting(source, f"move to '{target}'"):
            for batch in ([f for f in files if f != root], [f for f in files if f == root]):
                if batch:
                    fs.copy(batch, [dst + f[len(src):] for f in batch])
    except BaseException:
        remove(target, ignore_errors=True)
        raise
    with _reporting(source, "remove"):
        fs.rm(src, recursive=True)


def move_file(source: Path, target: UPath | str) -> None:
    """Move the local file ``source`` to ``target``, replacing a file there: ``os.replace``
    on a local disk; to a remote location an upload, then the deletion of ``source``."""
    target = location(target)
    if is_local(target):
        os.replace(source, target)
        return
    with _reporting(target, "write"):
        fs, path = filesystem(target)
        fs.put_file(os.fspath(source), path)
    os.unlink(source)


def staging_name(loc: UPath) -> str:
    """A new hidden name ``.NAME.partial-UUID`` for a store written before it is moved
    to ``loc`` (in the same folder or prefix)."""
    return f".{loc.name}.partial-{uuid.uuid4().hex}"


def check_remote_run(out: UPath, *, resume: bool, shard: Any, in_process: bool,
                     waits_for_all: bool = True) -> None:
    """Refuse, in one line, what a run cannot do safely on a remote (non-``file://``)
    output: resuming, sharding and clusters need lock files created atomically and a
    work directory that other processes see; the staging store of a failed run is
    deleted, which needs every task stopped first.

    Raises
    ------
    InvalidArgumentError
        For ``resume``, a ``shard``, an executor whose tasks run outside this process,
        or one that does not wait for its running tasks when one fails (``"dask"``).
    """
    what = ("--resume" if resume else "--shard" if shard is not None
            else "a cluster" if not in_process
            else "an executor that does not wait for all its tasks (dask)" if not waits_for_all
            else None)
    if what is not None:
        raise InvalidArgumentError(
            f"{what} is not supported with a remote output ({out}): it needs the atomic "
            "lock files and renames of a local or shared filesystem; write to a local path "
            "(or a file:// URL) and copy the finished store"
        )
