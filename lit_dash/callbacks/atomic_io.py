"""Checkpoint files that are either complete or absent, and how a resume tells them apart.

:class:`AtomicCheckpointIO` is Lightning's ``TorchCheckpointIO`` with the write made atomic on a local
disk: ``torch.save`` streams into a hidden temporary file in the same folder
(``.<name>.partial-<pid>``), which is flushed and fsynced, then ``os.replace`` gives it its name and the
folder is fsynced. A kill at any moment leaves the previous file as it was, plus at worst a temporary file
that no resume takes for a checkpoint. (Lightning's own write builds the whole checkpoint in memory first,
then writes it in place: a second copy in RAM, and a truncated file when killed mid-write.) Remote
filesystems (``s3://``...) keep Lightning's write, whose object upload is all-or-nothing.

:func:`scan` sorts a checkpoint folder into complete checkpoints, and files that look like checkpoints
but are not (temporary files, truncated or unreadable ``.ckpt`` files, links whose target is gone).

``LIT_DASH_CKPT_FAULT`` (tests only) kills the process with SIGKILL in the real write path:
``mid_write@K`` once part of step K's temporary file is on disk, ``after_write@K`` right after step K's
file got its name (before ``last`` is updated).
"""

from __future__ import annotations

import os
import signal
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

PARTIAL_MARK = ".partial-"
FAULT_ENV = "LIT_DASH_CKPT_FAULT"
_FAULT_AFTER_BYTES = 4096  # mid_write: bytes of the temporary file on disk before the kill


def temporary_path(path: str | os.PathLike) -> str:
    """Where a write to ``path`` goes first: a hidden name in the same folder, not ending in ``.ckpt``."""
    folder, name = os.path.split(os.fspath(path))
    return os.path.join(folder, f".{name}{PARTIAL_MARK}{os.getpid()}")


def is_temporary(name: str) -> bool:
    return name.startswith(".") and PARTIAL_MARK in name


def _fsync_folder(folder: str) -> None:
    fd = os.open(folder or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fault(point: str, checkpoint: dict[str, Any]) -> bool:
    spec = os.environ.get(FAULT_ENV, "")
    return spec == f"{point}@{checkpoint.get('global_step')}"


class _KillMidWrite:
    """A file wrapper (fault injection): passes writes through, then SIGKILLs this process once enough
    bytes are on disk."""

    def __init__(self, file) -> None:
        self._file = file
        self._written = 0

    def write(self, data) -> int:
        n = self._file.write(data)
        self._written += n
        if self._written >= _FAULT_AFTER_BYTES:
            self._file.flush()
            os.fsync(self._file.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return n

    def __getattr__(self, name: str):
        return getattr(self._file, name)


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local writes are atomic (temporary file, fsync, ``os.replace``)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = os.fspath(path)
        folder = os.path.dirname(path)
        os.makedirs(folder or ".", exist_ok=True)
        temporary = temporary_path(path)
        try:
            with open(temporary, "wb") as f:
                torch.save(checkpoint, _KillMidWrite(f) if _fault("mid_write", checkpoint) else f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
        except BaseException:
            if os.path.exists(temporary):
                os.remove(temporary)
            raise
        _fsync_folder(folder)
        if _fault("after_write", checkpoint):
            os.kill(os.getpid(), signal.SIGKILL)


def replace_link(target: str, link: str) -> None:
    """Point ``link`` at ``target`` (a relative symlink), atomically: a new link under a temporary name,
    then ``os.replace``. Where symlinks are not allowed, a copy, atomically too."""
    temporary = temporary_path(link)
    try:
        os.symlink(os.path.relpath(target, os.path.dirname(link)), temporary)
    except OSError:
        import shutil

        shutil.copyfile(target, temporary)
    os.replace(temporary, link)
    _fsync_folder(os.path.dirname(link))


def is_complete(path: str | os.PathLike) -> bool:
    """A single-file checkpoint is a zip archive (``torch.save``) whose central directory, written last,
    is readable and lists the pickle; a sharded one (a folder) holds its final marker: ``meta.pt`` (FSDP,
    written after the shards) or ``latest`` (DeepSpeed). Reads the archive's index only, not its tensors."""
    path = Path(path)
    if path.is_dir():
        return (path / "meta.pt").is_file() or (path / "latest").is_file()
    if not path.is_file():  # absent, or a link whose target is gone
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/data.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


@dataclass
class FolderScan:
    complete: list[Path] = field(default_factory=list)
    incomplete: list[Path] = field(default_factory=list)  # look like checkpoints, are not complete ones

    def newest(self) -> Path | None:
        """The newest complete checkpoint (modification time of the file a link points to); on a tie, a
        ``last*`` name, so the trainer resumes from the link and retention may later delete the file."""
        if not self.complete:
            return None
        return max(self.complete, key=lambda p: (p.stat().st_mtime, p.name.startswith("last")))


def scan(folder: str | os.PathLike, extension: str = ".ckpt") -> FolderScan:
    """Sort the checkpoint-looking entries of ``folder`` (``*<extension>`` and temporary files)."""
    result = FolderScan()
    folder = Path(folder)
    if not folder.is_dir():
        return result
    for entry in sorted(folder.iterdir()):
        if is_temporary(entry.name):
            result.incomplete.append(entry)
        elif entry.name.endswith(extension):
            (result.complete if is_complete(entry) else result.incomplete).append(entry)
    return result
