"""Durable files: write-to-temp, fsync, rename, fsync the directory.

After `write()` returns, the file is complete at its final path and survives a
crash or power loss; before it returns, nothing is visible at that path, so a
kill -9 mid-write leaves at most a stray file in the writer's own folder under `tmp/`:
`tmp/<instance>/` for a node (`node.instance`), `.../receiver-N/` for its receiver processes,
`.../import-<pid>/` for `dicom-node import`. A node's start-up clears its own folder (a receiver's
restart, the receiver's), never another node's sharing the storage folder.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import uuid
from pathlib import Path

_SAFE_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class OutOfSpace(OSError):
    """Not enough disk space to store an instance safely."""


def _component(uid: str) -> str:
    # UIDs are digits and dots by definition; anything else could climb out of
    # the store (../), so it is replaced by a digest.
    if _SAFE_UID.match(uid):
        return uid
    return "x" + hashlib.sha1(uid.encode("utf-8", "replace")).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileStore:
    def __init__(self, root: Path, fsync: bool = True, min_free_bytes: int = 0, partial_dir: str = "tmp") -> None:
        self.root = root
        self.fsync = fsync
        self.min_free_bytes = min_free_bytes
        self.tmp = root / partial_dir
        self.superseded = root / "superseded"
        self.tmp.mkdir(parents=True, exist_ok=True)

    def clear_partial_writes(self) -> int:
        """Remove temp files a crash left in this store's folder for writes in progress (and its
        subfolders: receivers, imports); none was acknowledged."""
        removed = 0
        # Files right under tmp/ were left by a version that wrote there; no writer does now. A
        # node's own folder (tmp/<instance>) clears them, not its receivers' or imports' subfolders.
        legacy = self.root / "tmp"
        strays = [*self.tmp.rglob("*"), *(legacy.iterdir() if self.tmp.parent == legacy else [])]
        for stray in strays:
            if not stray.is_dir():
                stray.unlink(missing_ok=True)
                removed += 1
        return removed

    def relative_path(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> str:
        return "/".join((_component(study_uid), _component(series_uid), _component(sop_instance_uid) + ".dcm"))

    def absolute(self, relative: str) -> Path:
        return self.root / relative

    def read(self, relative: str) -> bytes:
        return self.absolute(relative).read_bytes()

    def exists(self, relative: str) -> bool:
        return self.absolute(relative).is_file()

    def check_space(self, needed: int) -> None:
        free = shutil.disk_usage(self.root).free
        if free < needed + self.min_free_bytes:
            raise OutOfSpace(errno.ENOSPC, f"{free} bytes free, {needed + self.min_free_bytes} needed")

    def write(self, relative: str, chunks: list[bytes]) -> None:
        """Durably place `chunks` at `relative`, replacing any file there."""
        final = self.absolute(relative)
        temp = self.tmp / f"{uuid.uuid4().hex}.part"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            created = self._make_dirs(final.parent)
            os.replace(temp, final)
            if self.fsync:
                for directory in [final.parent, *created]:
                    _fsync_dir(directory)
        except OSError as error:
            temp.unlink(missing_ok=True)
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutOfSpace(error.errno, error.strerror or "no space left on device") from None
            raise

    def _make_dirs(self, directory: Path) -> list[Path]:
        """mkdir -p, returning the parents of each directory created (to fsync them)."""
        missing = []
        while not directory.exists():
            missing.append(directory)
            directory = directory.parent
        for new in reversed(missing):
            new.mkdir(exist_ok=True)
        return [new.parent for new in missing]

    def supersede(self, relative: str, sha256: str) -> None:
        """Keep a replaced object instead of deleting it: nothing acknowledged is lost."""
        source = self.absolute(relative)
        if not source.exists():
            return
        self.superseded.mkdir(exist_ok=True)
        target = self.superseded / f"{Path(relative).stem}.{sha256[:16]}.dcm"
        if not target.exists():
            os.link(source, target)
        if self.fsync:
            _fsync_dir(self.superseded)

    def remove(self, relative: str) -> None:
        self.absolute(relative).unlink(missing_ok=True)
