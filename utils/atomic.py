"""All-or-nothing file writes: a crash or an error never leaves a half-written file under the final name.

Temporary files are created with mode 0666 minus the umask, like any file the user writes (tempfile.mkstemp would
make every model, index and export 0600), and a failed write names the file it was writing: the OS error of a
full disk (`No space left on device`) carries no file name of its own.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def with_path(error: OSError, path: str | Path) -> OSError:
    """`error` as the same OSError type, naming `path` (the destination the user asked for)."""
    if error.errno is None:
        return type(error)(f"{path}: {error}")
    return type(error)(error.errno, error.strerror or os.strerror(error.errno), str(path))


@contextmanager
def errors_name(path: str | Path, *aliases: str | Path) -> Iterator[None]:
    """Re-raise an OSError inside the block that names no file (or one of `aliases`, e.g. a temp file) as one
    naming `path`; errors about other files pass unchanged."""
    try:
        yield
    except OSError as e:
        if e.filename is None or str(e.filename) in {str(a) for a in aliases}:
            raise with_path(e, path) from e
        raise


def _new_temp_file(path: Path) -> Path:
    """An empty file beside `path`, created exclusively, with the mode the umask gives."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
        except OSError as e:  # no such directory, no permission: say which file could not be written
            raise with_path(e, path) from e


def temp_dir_beside(path: str | Path) -> Path:
    """A new empty directory beside `path` (`.NAME.XXXX.tmp`) to build it in, then rename; its mode is 0777 minus
    the umask (tempfile.mkdtemp makes 0700, and the rename would keep that)."""
    path = Path(path)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            tmp.mkdir(0o777)
            return tmp
        except FileExistsError:
            continue
        except OSError as e:
            raise with_path(e, path) from e


def fsync_path(path: str | Path) -> None:
    """Flush a file, or a directory's entries (a rename inside it), to disk. Windows cannot open a directory and
    makes a rename durable by itself, so a directory is skipped there."""
    is_dir = Path(path).is_dir()
    if is_dir and not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(path, os.O_RDONLY if is_dir else os.O_RDWR)  # Windows flushes only a writable handle
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; write the file there.

    When the block succeeds the file is fsynced, renamed over `path` (rename is atomic within a directory) and the
    directory fsynced, so the new content survives a power cut; when it fails, or is killed, `path` keeps its old
    content and the temporary file is removed. An OSError (full disk, no permission) names `path`.
    """
    path = Path(path)
    tmp = _new_temp_file(path)
    with errors_name(path, tmp):
        try:
            yield tmp
            fsync_path(tmp)
            os.replace(tmp, path)
            fsync_path(path.parent)
        finally:
            tmp.unlink(missing_ok=True)


@contextmanager
def atomic_output_dir(path: str | Path) -> Iterator[Path]:
    """Yield a new empty directory beside `path`; build a whole output folder there.

    When the block succeeds its files are fsynced and it takes the place of `path` (an existing `path` is moved
    aside first and deleted only after the swap); when it fails, or raises, it is removed and `path` is untouched.
    """
    path = Path(path)
    tmp = temp_dir_beside(path)
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                fsync_path(file)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.{secrets.token_hex(6)}.old")
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_path(path.parent)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Replace `path` by `data` all at once."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def write_output(path: str | Path, data: bytes, force: bool = False) -> None:
    """A program's output file: refused if it exists unless `force` (FileExistsError saying so), its folders made,
    written all at once."""
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path}: exists (use --force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, data)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace `path` by UTF-8 `text` (with \\n line ends on every OS) all at once."""
    write_bytes_atomic(path, text.encode("utf-8"))
