"""Files and folders on a local path or in Ray's remote storage (s3://, gs://), through `pyarrow.fs`.

Ray Train reaches its storage through a pyarrow FileSystem (`storage.storage_filesystem`) and a path
on it (`storage.experiment_fs_path`, without the URI scheme); the checkpoint code does the same, so
one code path verifies, moves and prunes checkpoints wherever they are. Only the two operations a
local file system does better stay local-specific: a write is a temporary name, fsync and rename
(`atomic_write`), and a folder is moved with one rename (`move_dir`). In an object store an object
appears only once its upload completes, and a "folder" is moved by copying its files (the one named
`last` after the others) and deleting the old ones.
"""
from __future__ import annotations

import functools
import io
import os
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Callable

CHUNK = 1 << 20


@functools.lru_cache(maxsize=None)
def local_fs() -> Any:
    import pyarrow.fs

    return pyarrow.fs.LocalFileSystem()


def is_local(fs: Any) -> bool:
    """A local (or mounted network) file system, where files can be fsynced and folders renamed."""
    import pyarrow.fs

    return fs is None or isinstance(fs, pyarrow.fs.LocalFileSystem)


def is_uri(location: str | os.PathLike) -> bool:
    """s3://bucket/... and the like (anything else is a local path)."""
    return "://" in os.fspath(location)


def storage_fs(location: str | os.PathLike) -> tuple[Any, str]:
    """(pyarrow FileSystem, path on it) of a local path or a URI such as s3://bucket/run."""
    import pyarrow.fs

    text = os.fspath(location)
    if not is_uri(text):
        return local_fs(), text
    return pyarrow.fs.FileSystem.from_uri(text)


def absolute_location(location: str | os.PathLike) -> str:
    """A URI as given, a local path made absolute (a marker other processes find from any folder)."""
    text = os.fspath(location)
    return text if is_uri(text) else str(Path(text).expanduser().absolute())


def write_text(location: str | os.PathLike, text: str) -> None:
    """Write a small text file at a local path or URI, its folder created (a marker, an answer)."""
    fs, path = storage_fs(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def read_text(location: str | os.PathLike) -> str | None:
    """The text of the file at a local path or URI; None if it is not there (or cannot be read)."""
    fs, path = storage_fs(location)
    try:
        return read_bytes(fs, path).decode()
    except (FileNotFoundError, OSError):
        return None


def fs_path(path: str | os.PathLike, fs: Any) -> PurePosixPath:
    """`path` as a Path on a local file system, else as a pure path (so nothing checks it locally)."""
    return Path(path) if is_local(fs) else PurePosixPath(os.fspath(path))


def location(fs: Any, path: str | os.PathLike) -> str:
    """How a message names `path` on `fs`: the local path, or a URI (s3://bucket/...)."""
    return os.fspath(path) if is_local(fs) else f"{fs.type_name}://{os.fspath(path)}"


def _info(fs: Any, path: str | os.PathLike) -> Any:
    return (fs or local_fs()).get_file_info(os.fspath(path))


def exists(fs: Any, path: str | os.PathLike) -> bool:
    import pyarrow.fs

    return _info(fs, path).type != pyarrow.fs.FileType.NotFound


def is_file(fs: Any, path: str | os.PathLike) -> bool:
    import pyarrow.fs

    return _info(fs, path).type == pyarrow.fs.FileType.File


def is_dir(fs: Any, path: str | os.PathLike) -> bool:
    import pyarrow.fs

    return _info(fs, path).type == pyarrow.fs.FileType.Directory


def make_dir(fs: Any, path: str | os.PathLike) -> None:
    """Create the folder `path` and its parents (in an object store: an empty marker, harmless)."""
    (fs or local_fs()).create_dir(os.fspath(path), recursive=True)


def file_size(fs: Any, path: str | os.PathLike) -> int | None:
    """The size of the file `path`; None when it is not a file (one metadata request in an object store)."""
    import pyarrow.fs

    info = _info(fs, path)
    return int(info.size) if info.type == pyarrow.fs.FileType.File else None


def read_bytes(fs: Any, path: str | os.PathLike) -> bytes:
    with (fs or local_fs()).open_input_stream(os.fspath(path)) as f:
        return f.read()


def list_dir(fs: Any, path: str | os.PathLike) -> list[tuple[str, bool]]:
    """(name, is a folder) of each entry of the folder `path`, sorted by name ([] if it does not exist)."""
    import pyarrow.fs

    infos = (fs or local_fs()).get_file_info(pyarrow.fs.FileSelector(os.fspath(path), allow_not_found=True))
    return sorted((i.base_name, i.type == pyarrow.fs.FileType.Directory) for i in infos)


def delete_dir(fs: Any, path: str | os.PathLike) -> None:
    """Remove the folder `path` and everything in it (nothing if it is not there)."""
    if exists(fs, path):
        (fs or local_fs()).delete_dir(os.fspath(path))


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename / new entry in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some network file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], fs: Any = None) -> None:
    """`path` as a whole or not at all. Locally: written under a hidden temporary name, fsynced,
    renamed, the folder fsynced (a crash or a full disk leaves the old file or none, never half of
    one). Remote: written into memory first, then uploaded as one object (an object store shows an
    object only once its upload completed; a `write` that fails uploads nothing)."""
    if not is_local(fs):
        buf = io.BytesIO()
        write(buf)
        with fs.open_output_stream(os.fspath(path)) as f:
            f.write(buf.getbuffer())
        return
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def copy_file(src: str | os.PathLike, dest: str | os.PathLike, src_fs: Any = None, dest_fs: Any = None) -> None:
    """Copy one file, from any storage to any storage, written atomically (`atomic_write`)."""
    import shutil

    with (src_fs or local_fs()).open_input_stream(os.fspath(src)) as f:
        atomic_write(dest, lambda out: shutil.copyfileobj(f, out, CHUNK), dest_fs)


def move_dir(fs: Any, src: str | os.PathLike, dest: str | os.PathLike, last: str | None = None) -> None:
    """Move the folder `src` to `dest` (which must not exist). Locally one rename (fsynced). In an
    object store each file is copied, the file named `last` after the others (a move cut short
    leaves `dest` without it), then `src` is deleted."""
    if is_local(fs):
        os.rename(src, dest)
        fsync_dir(Path(dest).parent)
        return
    import pyarrow.fs

    selector = pyarrow.fs.FileSelector(os.fspath(src), recursive=True)
    files = [i.path for i in fs.get_file_info(selector) if i.type == pyarrow.fs.FileType.File]
    prefix = os.fspath(src).rstrip("/") + "/"
    for f in sorted(files, key=lambda p: (PurePosixPath(p).name == last, p)):
        fs.copy_file(f, os.fspath(dest).rstrip("/") + "/" + f[len(prefix):])
    fs.delete_dir(os.fspath(src))
