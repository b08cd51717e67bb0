"""Atomic output writes: a reader sees the old file or the new one, never half of one.

Every result file the pipeline writes (rankings, metrics, latencies, query caches, whitening,
galleries) goes through :func:`atomic_write` (or :func:`atomic_dir` for a folder of files): the
content is written to a temp file beside the target, flushed to disk, and renamed over the target
with ``os.replace``, which is atomic on POSIX and Windows. A crash, a SIGKILL or a full disk
therefore leaves the previous version intact, plus at worst a hidden ``.NAME.tmp-*`` file that
the next successful write of the same target does not depend on.
"""

import errno
import json
import os
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Union

__all__ = [
    "OutputWriteError",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "atomic_dir",
    "fsync_dir",
]

PathLike = Union[str, os.PathLike]


class OutputWriteError(OSError):
    """An output could not be written (disk full, read-only folder, path under a file, ...).

    The previous content of the target, if any, is unchanged. ``errno`` is the cause's errno.

    Attributes:
        path (str): the target.
    """

    def __init__(self, path: PathLike, cause: BaseException):
        self.path = str(path)
        code = getattr(cause, "errno", None)
        reason = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
        hint = ""
        if code == errno.ENOSPC:
            hint = "; free disk space and rerun"
        elif code in (errno.EACCES, errno.EROFS, errno.EPERM):
            hint = "; the folder is not writable: choose another OUTPUT_DIR"
        elif code in (errno.ENOTDIR, errno.EEXIST):
            hint = "; a parent of this path is a regular file: choose another OUTPUT_DIR"
        message = f"could not write {self.path}: {reason}{hint} (the previous file is unchanged)"
        if code is None:
            super().__init__(message)
        else:
            super().__init__(code, message)


def _temp_path(path: Path) -> Path:
    # Same folder (rename must not cross file systems), same suffix (np.savez appends ".npz" to
    # names without it), hidden, unique per process and thread.
    stem, suffix = (path.stem, path.suffix) if path.suffix else (path.name, "")
    return path.with_name(f".{stem}.tmp-{os.getpid()}-{threading.get_ident()}{suffix}")


def _fsync_file(path: Path):
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: PathLike):
    """Make a rename or creation inside ``path`` durable; a no-op where the OS refuses."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders; the file itself is synced
        pass
    finally:
        os.close(fd)


def _remove(path: Path):
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except OSError:
        pass


def atomic_write(path: PathLike, writer_fn: Callable[[str], object]) -> str:
    """Write ``path`` atomically through ``writer_fn``.

    Args:
        path: the target file; its parent folders are created.
        writer_fn: called once with the temp file's path (a str with the target's suffix); it
            writes the complete content there, e.g. ``lambda p: np.savez(p, **arrays)``.

    Returns:
        str: ``path``.

    Raises:
        OutputWriteError: ``writer_fn``, the sync or the rename failed with an OSError; the temp
            file is removed and the target keeps its previous content.
    """
    path = Path(path)
    tmp = _temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        writer_fn(str(tmp))
        if not tmp.is_file():
            raise OSError(errno.EIO, f"the writer did not create {tmp}")
        _fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        _remove(tmp)
        raise OutputWriteError(path, e) from e
    except BaseException:
        _remove(tmp)
        raise
    return str(path)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> str:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""

    def write(tmp):
        with open(tmp, "w", encoding=encoding) as f:
            f.write(text)

    return atomic_write(path, write)


def atomic_write_json(path: PathLike, obj, indent: int = 2) -> str:
    """Write ``obj`` as JSON to ``path`` atomically (see :func:`atomic_write`).

    The object is serialised before anything touches the disk, so an unserialisable value raises
    TypeError, and NaN or infinity (not JSON: strict parsers refuse the bare tokens) ValueError,
    with the target untouched. Write None where a number is undefined.
    """
    text = json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False)
    return atomic_write_text(path, text + "\n")


@contextmanager
def atomic_dir(path: PathLike) -> Iterator[str]:
    """Build a folder in a temp folder and swap it in as ``path`` when the block succeeds.

    Example::

        with atomic_dir("out/visualization") as tmp:
            write_gallery(tmp, title, entries)

    Readers see the old folder or the complete new one. On any exception the temp folder is
    removed and the old folder is left as it was. The swap is two renames (old folder aside, new
    one in); a crash between them leaves the old folder as ``.NAME.old-PID`` beside ``path``.

    Args:
        path: the target folder; its parent folders are created.

    Yields:
        str: the temp folder to write into (created, empty).

    Raises:
        OutputWriteError: the temp folder could not be created or swapped in (OSError).
    """
    path = Path(path)
    tmp = _temp_path(path)
    old = path.with_name(f".{path.name}.old-{os.getpid()}-{threading.get_ident()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove(tmp)
        tmp.mkdir()
    except OSError as e:
        raise OutputWriteError(path, e) from e
    try:
        yield str(tmp)
        for p in tmp.iterdir():
            if p.is_file():
                _fsync_file(p)
        had_old = path.exists()
        if had_old:
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            if had_old:
                os.replace(old, path)
            raise
        fsync_dir(path.parent)
        if had_old:
            _remove(old)
    except OSError as e:
        _remove(tmp)
        raise OutputWriteError(path, e) from e
    except BaseException:
        _remove(tmp)
        raise
