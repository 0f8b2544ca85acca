"""Verification features of stored series, kept on disk between passes and restarts.

Linkage checks a new series against its candidate priors (models/inference/verification.py). Making a
prior's features means reading its DICOM files and running SIFT, about 0.12 s per image; the
memory cache holds a few hundred series, so in a large archive, and after every restart, most
priors would be made again. A kept file is read in a few milliseconds instead.

One file per series and settings: `<root>/<series_pk // 1000>/<series_pk>-<tag>.npz`, where the
tag names the settings that shape the kept arrays (`FORMAT` is bumped when the code that makes
them changes). Each file holds the fingerprint of the series' files it was made from; another
fingerprint (an instance added or replaced) makes it stale, and it is made again. Files are
written whole under a temporary name and renamed, so a crash leaves the old file or the new
one; an unreadable file is made again. Nothing here is primary data: the folder can be deleted
at any time. Writing stops while the disk's free space is under twice the storage reserve, so
kept features never take the room that incoming images need.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import zipfile
from pathlib import Path

import numpy as np

from models.inference.verification import KeptFeatures, VerificationSettings

log = logging.getLogger("models.inference.verification")

FORMAT = 1          # bump when describe() changes what it keeps (CLAHE, resizing, SIFT options)


def settings_tag(s: VerificationSettings) -> str:
    """Short name of the settings that shape the kept arrays (not the weights or the high-pass sigma,
    which apply after reading)."""
    key = f"{FORMAT}|{s.size}|{s.features}|{s.max_images}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


class FeatureFolder:
    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = Path(root)
        self.reserve = 2 * max(0, int(min_free_bytes))

    def path(self, series_pk: int, s: VerificationSettings) -> Path:
        return self.root / str(series_pk // 1000) / f"{series_pk}-{settings_tag(s)}.npz"

    def load(self, series_pk: int, s: VerificationSettings, fingerprint: str) -> list[KeptFeatures] | None:
        """The kept features of the series, or None when there are none for these files (absent, stale
        or unreadable)."""
        path = self.path(series_pk, s)
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["fingerprint"]) != fingerprint:
                    return None
                return [KeptFeatures(data[f"equalized_{i}"], data[f"points_{i}"],
                                     data[f"descriptors_{i}"] if len(data[f"descriptors_{i}"]) else None)
                        for i in range(int(data["images"]))]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
            log.warning("kept verification features %s unreadable (%s: %s); they are made again",
                        path, type(error).__name__, error)
            return None

    def save(self, series_pk: int, s: VerificationSettings, fingerprint: str, kept: list[KeptFeatures]) -> bool:
        """Write the series' features; False (and nothing written) when the disk is short of room or
        the write fails. A failure only costs making them again later."""
        arrays: dict[str, np.ndarray] = {"fingerprint": np.array(fingerprint), "images": np.array(len(kept))}
        for i, k in enumerate(kept):
            arrays[f"equalized_{i}"] = k.equalized
            arrays[f"points_{i}"] = k.points
            arrays[f"descriptors_{i}"] = k.descriptors if k.descriptors is not None else np.zeros((0, 128), np.uint8)
        path = self.path(series_pk, s)
        temp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if shutil.disk_usage(path.parent).free - sum(a.nbytes for a in arrays.values()) < self.reserve:
                return False
            with open(temp, "wb") as out:
                np.savez_compressed(out, **arrays)   # a third smaller for ~10 ms, once per series
            os.replace(temp, path)
            return True
        except OSError as error:
            log.warning("verification features of series pk %d not kept (%s: %s)", series_pk,
                        type(error).__name__, error)
            temp.unlink(missing_ok=True)
            return False
