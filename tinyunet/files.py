"""Files written whole or not at all, never over something the user did not ask to replace.

* ``atomic_write``: a temporary file in the same folder, synced, then renamed into
  place. A reader sees the old file or the new one, never half of one; an interrupt
  leaves at most a temporary file, named ``.NAME.PID.XXXXXXXX.tmp``. The rename replaces
  the directory entry, so a symbolic link planted at the path is replaced, never
  followed. With ``overwrite=False`` an existing path, a dangling link included, is an
  error and nothing changes.
* ``remove_stale_temporaries``: deletes the temporary files of processes that have
  ended (a kill -9 during a write), leaving those of running processes alone.
* ``prepare_output_folder`` / ``check_writable_file``: fail before the work, in one line,
  when an output can't be written (a file where a folder should be, a missing or
  read-only folder).
* ``regular_files``: the files of a folder with given extensions, regular files only (no
  FIFOs, which would block a reader, nor folders named like images).
* ``plan_outputs``: the output files of a batch of inputs, refused as a whole when two
  inputs would write one output, an output is also an input, or an output exists.

Errors are ``OutputError``, one line naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

TEMPORARY_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
# Errors of os.link on filesystems without hard links (then files are copied instead).
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK}


class OutputError(Exception):
    """An output can't be written, or would replace something not to be replaced."""


def temporary_path(path: Path) -> Path:
    """A fresh temporary name beside ``path``, of the pattern remove_stale_temporaries knows."""
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def _create(path: Path) -> int:
    """A new file opened for writing: never an existing one, never through a link. Mode
    0o666 less the umask: the user's usual permissions."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    return os.open(path, flags, 0o666)


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the platform can open folders)."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _place(temporary: Path, path: Path, overwrite: bool, keep_temporary: bool) -> None:
    """Put ``temporary``'s file at ``path``: renamed (or linked, to keep the temporary
    for more names); with ``overwrite=False`` only where nothing is."""
    if overwrite and not keep_temporary:
        os.replace(temporary, path)
        return
    if overwrite:  # a second name for the same file, swapped in by a rename
        spare = temporary_path(path)
        _link_or_copy(temporary, spare)
        try:
            os.replace(spare, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(spare)
            raise
        return
    try:
        _link_or_copy(temporary, path)  # fails if anything, even a dangling link, is there
    except FileExistsError:
        raise OutputError(f"{path}: Expect: a new file. Actual: it exists; not "
                          "replaced.") from None
    if not keep_temporary:
        os.unlink(temporary)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError as error:
        if error.errno not in _NO_HARD_LINKS:
            raise
        descriptor = _create(target)
        with os.fdopen(descriptor, "wb") as file, open(source, "rb") as original:
            shutil.copyfileobj(original, file)
            file.flush()
            os.fsync(file.fileno())


def atomic_write(path, write: Callable[[BinaryIO], object], overwrite: bool = True,
                 copies: Iterable = ()) -> None:
    """Write ``path`` whole or not at all: ``write(file)`` fills a temporary file beside
    it, which is synced and renamed to ``path``.

    ``copies``: more paths that get the same file, each in place before ``path`` (in the
    order given), so a reader that finds the new ``path`` finds them new too.
    ``overwrite=False``: an existing ``path`` is an OutputError. Any OSError becomes an
    OutputError naming ``path``; the previous files are then as they were, and no
    temporary file is left.
    """
    path = Path(path)
    targets = [Path(copy) for copy in copies] + [path]
    temporary = temporary_path(path)
    try:
        with os.fdopen(_create(temporary), "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        for index, target in enumerate(targets):
            _place(temporary, target, overwrite, keep_temporary=index < len(targets) - 1)
        _sync_folder(path.parent)
    except OSError as error:
        raise OutputError(f"{path}: could not write it ({error.strerror or error}); the "
                          "previous file, if any, is unchanged") from error
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: running
        return True
    return True


def remove_stale_temporaries(folder) -> list[Path]:
    """Delete the temporary files that atomic_write left in ``folder`` in processes that
    are no longer running (killed during a write); the paths deleted."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in os.scandir(folder):
        match = TEMPORARY_PATTERN.match(entry.name)
        if match and entry.is_file(follow_symlinks=False) and not _running(
                int(match["pid"])):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def _probe(folder: Path, what: str) -> None:
    """OutputError unless a file can be created in ``folder``."""
    probe = temporary_path(folder / "write-test")
    try:
        os.close(_create(probe))
        os.unlink(probe)
    except OSError as error:
        raise OutputError(f"{what}: cannot write there ({error.strerror or error})") from error


def prepare_output_folder(folder, option: str = "--out") -> Path:
    """``folder``, created if missing, once it is known to be a folder one can write in;
    an OutputError naming ``option`` and the folder otherwise."""
    path = Path(folder)
    what = f"{option} {path}"
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what}: Expect: a folder. Actual: a file.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError as error:  # a file on the way, or a dangling link
        raise OutputError(f"{what}: Expect: a folder. Actual: a file or link is in the way "
                          f"({error.filename}).") from error
    except NotADirectoryError as error:
        raise OutputError(f"{what}: Expect: a folder. Actual: a part of the path is a "
                          "file.") from error
    except OSError as error:
        raise OutputError(f"{what}: cannot create it ({error.strerror or error})") from error
    _probe(path, what)
    return path


def check_writable_file(path, option: str) -> Path:
    """``path`` once a file can be written there (its folder exists and is writable, and
    it is not a folder); an OutputError naming ``option`` otherwise."""
    path = Path(path)
    what = f"{option} {path}"
    if path.is_dir():
        raise OutputError(f"{what}: Expect: a file name. Actual: a folder.")
    folder = path.parent
    if not folder.is_dir():
        raise OutputError(f"{what}: Expect: an existing folder. Actual: {folder} "
                          f"{'is a file' if folder.exists() else 'does not exist'}.")
    _probe(folder, what)
    return path


def regular_files(folder, extensions: Iterable[str]) -> list[Path]:
    """The regular files of ``folder`` (links to regular files too) whose extension is one
    of ``extensions`` (lower case, with the dot), sorted by name."""
    wanted = tuple(extensions)
    return sorted(Path(entry.path) for entry in os.scandir(folder)
                  if Path(entry.name).suffix.lower() in wanted and entry.is_file())


def plan_outputs(inputs: list[Path], out: Path, suffixes: list[str],
                 overwrite: bool) -> list[list[Path]]:
    """For each input, its outputs ``out/<stem><suffix>``; an OutputError, before anything
    is written, when two inputs would write one file (naming both), an output is also an
    input, or (without ``overwrite``) an output exists, a link included."""
    plan: list[list[Path]] = []
    writers: dict[Path, Path] = {}
    sources = {os.path.realpath(path) for path in inputs}
    for source in inputs:
        outputs = [out / f"{source.stem}{suffix}" for suffix in suffixes]
        for output in outputs:
            if output in writers:
                raise OutputError(f"{writers[output]} and {source} would both write {output}; "
                                  "rename one, or predict them with separate --out folders")
            writers[output] = source
            if os.path.realpath(output) in sources:
                raise OutputError(f"{output}: Expect: outputs apart from the inputs. Actual: "
                                  f"it is an input, and the output for {source}; use another "
                                  "--out")
        plan.append(outputs)
    if not overwrite:
        existing = [str(output) for output in writers if os.path.lexists(output)]
        if existing:
            more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
            raise OutputError(f"{', '.join(existing[:3])}{more}: Expect: new files. Actual: "
                              "they exist; pass --overwrite to replace them, or use another "
                              "--out")
    return plan
