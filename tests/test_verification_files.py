"""Verification features kept on disk (models.inference.verification_files): read back exactly, used after a
restart instead of the images, made again when the series' files change or the file is damaged,
never written into the storage reserve."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pytest

from models.inference.verification import SeriesVerifier, complete, describe, match, prepare
from models.inference.verification_files import FeatureFolder, settings_tag
from tests.test_verification import S, anatomy, moved

KEY = ("chest_xr", "net", "1")


class CountingImages:
    """Series pk -> images, counting the reads (each read stands for loading DICOM files)."""

    def __init__(self) -> None:
        self.images = {1: [anatomy(30)], 2: [moved(anatomy(30))], 3: [anatomy(31), anatomy(32)]}
        self.reads: list[int] = []

    def __call__(self, series_pk: int) -> list:
        self.reads.append(series_pk)
        return self.images[series_pk]


def test_kept_features_read_back_exactly(tmp_path):
    folder = FeatureFolder(tmp_path)
    kept = [describe(anatomy(40), S), describe(np.full((64, 64), 0.5, np.float32), S)]   # the second: no keypoints
    assert kept[1].descriptors is None
    assert folder.save(7, S, "files-v1", kept)
    back = folder.load(7, S, "files-v1")
    assert len(back) == 2 and back[1].descriptors is None
    for a, b in zip(kept, back):
        assert np.array_equal(a.equalized, b.equalized) and np.array_equal(a.points, b.points)
        assert (a.descriptors is None and b.descriptors is None) or np.array_equal(a.descriptors, b.descriptors)
    other = prepare(moved(anatomy(40)), S)
    assert match(complete(back[0], S), other, S) == match(prepare(anatomy(40), S), other, S)


def test_a_restarted_verifier_reads_kept_features_instead_of_images(tmp_path):
    images = CountingImages()
    fingerprint = {1: "a", 2: "b", 3: "c"}.get
    first = SeriesVerifier({KEY: S}, images, folder=FeatureFolder(tmp_path), fingerprint=fingerprint)
    same, cross = first.bonus(KEY, 1, 2), first.bonus(KEY, 1, 3)
    assert same > cross + 0.3 and sorted(images.reads) == [1, 2, 3]
    images.reads.clear()
    restarted = SeriesVerifier({KEY: S}, images, folder=FeatureFolder(tmp_path), fingerprint=fingerprint)
    assert restarted.bonus(KEY, 2, 1) == same and restarted.bonus(KEY, 3, 1) == cross
    assert images.reads == []


def test_changed_files_make_the_features_again(tmp_path):
    images, version = CountingImages(), {"n": 1}
    folder = FeatureFolder(tmp_path)

    def fingerprint(series_pk):
        return f"{series_pk}-v{version['n']}"
    SeriesVerifier({KEY: S}, images, folder=folder, fingerprint=fingerprint).bonus(KEY, 1, 2)
    version["n"] = 2                                   # e.g. an instance was added to both series
    images.images[1] = [anatomy(33)]
    images.reads.clear()
    after = SeriesVerifier({KEY: S}, images, folder=folder, fingerprint=fingerprint).bonus(KEY, 1, 2)
    assert sorted(images.reads) == [1, 2]
    assert after == pytest.approx(SeriesVerifier({KEY: S}, images).bonus(KEY, 1, 2))
    assert folder.load(1, S, "1-v2") is not None and folder.load(1, S, "1-v1") is None


def test_a_damaged_file_is_made_again_with_a_warning(tmp_path, caplog):
    images, folder = CountingImages(), FeatureFolder(tmp_path)
    fingerprint = str
    expected = SeriesVerifier({KEY: S}, images, folder=folder, fingerprint=fingerprint).bonus(KEY, 1, 2)
    folder.path(1, S).write_bytes(b"PK\x03\x04 not a whole archive")
    images.reads.clear()
    with caplog.at_level(logging.WARNING, logger="models.inference.verification"):
        again = SeriesVerifier({KEY: S}, images, folder=folder, fingerprint=fingerprint).bonus(KEY, 1, 2)
    assert again == expected and images.reads == [1]
    assert "unreadable" in caplog.text and folder.load(1, S, "1") is not None     # rewritten whole


def test_nothing_is_kept_inside_the_storage_reserve(tmp_path):
    import shutil
    free = shutil.disk_usage(tmp_path).free
    folder = FeatureFolder(tmp_path / "kept", min_free_bytes=free)               # twice the free space reserved
    images = CountingImages()
    verifier = SeriesVerifier({KEY: S}, images, folder=folder, fingerprint=str)
    assert verifier.bonus(KEY, 1, 2) > 0.3                                        # the check itself goes on
    assert not list((tmp_path / "kept").rglob("*.npz"))


def test_a_series_without_fingerprint_or_images_is_not_kept(tmp_path):
    folder = FeatureFolder(tmp_path)
    images = CountingImages()
    images.images[4] = []

    def fingerprint(series_pk):
        if series_pk == 1:
            raise OSError("a file vanished")
        return None if series_pk == 2 else str(series_pk)
    verifier = SeriesVerifier({KEY: S}, images, folder=folder, fingerprint=fingerprint)
    assert verifier.bonus(KEY, 1, 2) > 0.3 and verifier.bonus(KEY, 3, 4) is None
    assert [p.name for p in tmp_path.rglob("*.npz")] == [folder.path(3, S).name]


def test_the_file_name_follows_the_settings_that_shape_the_kept_arrays():
    assert settings_tag(S) == settings_tag(replace(S, weight_ncc=0.9, highpass_sigma=12.0))
    assert settings_tag(S) != settings_tag(replace(S, size=512))
    assert settings_tag(S) != settings_tag(replace(S, features=1000))


def test_the_node_fingerprints_a_series_by_its_stored_files(store, tmp_path):
    """dicom_node.node.StoredSeriesFiles: the fingerprint changes when a stored file is replaced."""
    import os

    from sqlalchemy import text

    from dicom_node.node import StoredSeriesFiles
    from tests.test_linkage_engine import load_cohort

    load_cohort(store)
    with store.engine.connect() as connection:
        series_pk = connection.execute(text("SELECT min(id) FROM series")).scalar()
    _, paths = store.series_files(series_pk)
    for relative in paths:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"x" * 10)
    files = StoredSeriesFiles(store, tmp_path)
    before = files.fingerprint(series_pk)
    assert before and files.fingerprint(series_pk) == before
    target = tmp_path / paths[0]
    target.write_bytes(b"y" * 11)                                 # replaced in place
    os.utime(target, ns=(1, 1))
    assert files.fingerprint(series_pk) not in (None, before)
    assert files.fingerprint(10**9) is None
