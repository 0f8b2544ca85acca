"""Geometric verification (models.inference.verification): the same anatomy moved is recognised, other anatomy is not,
and the node's linkage reads it off the stored series."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from models.inference.verification import (ImageFeatures, SeriesVerifier, VerificationSettings, match, pairwise_bonus,
                                           prepare, series_bonus)

S = VerificationSettings(size=256, features=500)


def anatomy(seed: int, size: int = 256) -> np.ndarray:
    """A (H, W) image in [0, 1]: blobs and ridges at several scales, different for every seed."""
    rng = np.random.default_rng(seed)
    field = sum(cv2.GaussianBlur(rng.normal(size=(size, size)).astype(np.float32), (0, 0), sigma) * sigma
                for sigma in (2, 5, 12))
    return (field - field.min()) / (field.max() - field.min())


def moved(image: np.ndarray, angle: float = 6.0, scale: float = 1.05, shift=(9, -6), noise: float = 0.02,
          seed: int = 0) -> np.ndarray:
    """The same anatomy at another position (a second visit): turned, scaled, shifted, a little noise."""
    h, w = image.shape
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    m[:, 2] += shift
    out = cv2.warpAffine(image, m, (w, h), borderMode=cv2.BORDER_REFLECT)
    return np.clip(out + np.random.default_rng(seed).normal(scale=noise, size=out.shape), 0, 1)


def test_settings_come_from_the_card_and_reject_unknown_keys():
    assert VerificationSettings.from_card({}) is None
    assert VerificationSettings.from_card({"verification": {"weight_ncc": 0.5, "selected_on": "seeds 302, 303"}}) \
        == VerificationSettings(weight_ncc=0.5)
    with pytest.raises(ValueError, match="weight_nc"):
        VerificationSettings.from_card({"verification": {"weight_nc": 0.5}})
    s = VerificationSettings(weight_inliers=0.1, weight_ncc=0.3)
    assert s.bonus(0, 0.0) == 0.0
    assert s.bonus(99, 0.5) == pytest.approx(0.1 * np.log(100) + 0.15)


def test_the_same_anatomy_moved_matches_and_another_does_not():
    a = anatomy(1)
    same_inliers, same_ncc = match(prepare(a, S), prepare(moved(a), S), S)
    other_inliers, other_ncc = match(prepare(a, S), prepare(anatomy(2), S), S)
    assert same_inliers >= 40 and same_ncc > 0.5
    assert other_inliers < 15 and abs(other_ncc) < 0.3
    assert S.bonus(same_inliers, same_ncc) > S.bonus(other_inliers, other_ncc) + 0.3


def test_rootsift_matching_is_a_card_setting_and_still_tells_the_same_anatomy_apart():
    from dataclasses import replace
    root = VerificationSettings.from_card({"verification": {"size": 256, "features": 500, "root_sift": True}})
    assert root == replace(S, root_sift=True)
    a = anatomy(7)
    same, other = match(prepare(a, root), prepare(moved(a), root), root), match(prepare(a, root), prepare(anatomy(8), root), root)
    assert same[0] > 3 * max(other[0], 1) and same[1] > other[1] + 0.3
    assert same != match(prepare(a, S), prepare(moved(a), S), S)          # the descriptors are compared otherwise


def test_an_affine_fit_aligns_an_image_stretched_unevenly_where_a_similarity_cannot():
    """Radiographs resized without keeping their aspect ratio (the pediatric set, published figures) differ
    by an uneven stretch, which a turn-scale-shift cannot undo."""
    from dataclasses import replace
    a = anatomy(5)
    h, w = a.shape
    stretched = cv2.warpAffine(a, np.float32([[1.18, 0, -20], [0, 0.92, 10]]), (w, h), borderMode=cv2.BORDER_REFLECT)
    affine = VerificationSettings.from_card({"verification": {"size": 256, "features": 500, "transform": "affine"}})
    assert affine == replace(S, transform="affine")
    similar_inliers, similar_ncc = match(prepare(a, S), prepare(stretched, S), S)
    affine_inliers, affine_ncc = match(prepare(a, affine), prepare(stretched, affine), affine)
    assert affine_ncc > 0.8 > 0.4 > similar_ncc and affine_inliers > 2 * similar_inliers
    other_inliers, other_ncc = match(prepare(a, affine), prepare(anatomy(6), affine), affine)
    assert other_inliers < 15 and abs(other_ncc) < 0.3            # the extra freedom does not align strangers
    with pytest.raises(ValueError, match="transform 'elastic'"):
        VerificationSettings.from_card({"verification": {"transform": "elastic"}})


def test_colour_images_and_dim_images_are_compared_as_stretched_gray():
    a = anatomy(3)
    rgb = np.stack([a, 0.5 * a, 0.25 * a])                  # (C, H, W), as the loader gives colour routes
    dim = 0.1 * moved(a) + 0.2                               # a low-contrast acquisition of the same anatomy
    inliers, ncc = match(prepare(rgb, S), prepare(dim, S), S)
    assert inliers >= 40 and ncc > 0.5
    with pytest.raises(ValueError, match="2D images"):
        prepare(np.zeros((2, 3, 4, 5)), S)


def test_featureless_images_give_no_bonus_instead_of_failing():
    flat = np.full((64, 64), 0.5)
    f = prepare(flat, S)
    assert f.descriptors is None or len(f.points) < 3
    assert match(f, prepare(anatomy(4), S), S) == (0, 0.0)
    assert series_bonus([], [f], S) == 0.0


def test_pairwise_bonus_is_symmetric_and_the_same_in_worker_processes():
    images = [anatomy(10), moved(anatomy(10)), anatomy(11), moved(anatomy(11), angle=-4, seed=1)]
    features = [[prepare(x, S)] for x in images]
    serial = pairwise_bonus(features, S, workers=1)
    parallel = pairwise_bonus(features, S, workers=2)
    assert np.allclose(serial, parallel) and np.allclose(serial, serial.T) and not serial.diagonal().any()
    assert serial[0, 1] == pytest.approx(series_bonus(features[0], features[1], S))
    for i, j in ((0, 1), (2, 3)):                            # each person's pair beats every cross pair
        cross = [serial[i, k] for k in (2, 3)] if i == 0 else [serial[i, k] for k in (0, 1)]
        assert serial[i, j] > max(cross)


def test_bonus_from_matches_equals_series_bonus_for_any_weights():
    """The matches kept per image pair give each series pair's best bonus under other weights exactly,
    series of one or two images and a series without images included."""
    from dataclasses import replace

    from models.inference.verification import bonus_from_matches, pairwise_matches
    series = [[prepare(anatomy(60), S), prepare(anatomy(61), S)], [prepare(moved(anatomy(60)), S)],
              [prepare(anatomy(62), S)], []]
    matches = pairwise_matches(series, S, workers=1)
    assert matches.shape == (4, 4, 4, 2) and np.isnan(matches[0, 0]).all()
    for wi, wn in ((0.1, 0.3), (0.0, 1.0), (0.2, 0.0)):
        s = replace(S, weight_inliers=wi, weight_ncc=wn)
        bonus = bonus_from_matches(matches, wi, wn)
        for i in range(4):
            for j in range(i + 1, 4):
                assert bonus[i, j] == pytest.approx(series_bonus(series[i], series[j], s), abs=1e-12)
        assert bonus[3, 0] == 0.0 and np.all(np.diag(bonus) == 0.0)


def test_series_verifier_caches_reads_and_survives_unreadable_series():
    reads = []
    images = {1: [anatomy(20)], 2: [moved(anatomy(20))], 3: [anatomy(21)]}

    def load(series_pk):
        reads.append(series_pk)
        if series_pk == 4:
            raise OSError("file gone")
        return images[series_pk]

    key, other = ("dermoscopy", "net", "1"), ("fundus", "net", "1")
    v = SeriesVerifier({key: S}, load)
    same, cross = v.bonus(key, 1, 2), v.bonus(key, 1, 3)
    assert same > cross + 0.3
    assert v.bonus(key, 2, 1) == same and sorted(reads) == [1, 2, 3]     # pair and series cached
    assert v.bonus(key, 1, 4) is None                                     # unreadable: no bonus, no exception
    assert v.bonus(other, 1, 2) is None and 4 in reads                    # a model without verification


def test_features_are_plain_arrays():
    f = prepare(anatomy(5), S)
    assert isinstance(f, ImageFeatures) and f.highpass.shape == (256, 256) and f.points.shape[1] == 2


def test_linkage_adds_the_bonus_of_the_stored_series_to_the_calibrated_score(store, tmp_path):
    """The engine reads each compared series' images (through the loader the node wires in) and scores
    cosine + bonus with the card's calibration; the evidence shows the bonus."""
    from db.links import LinkStore
    from linkage import decide as D
    from linkage.engine import Calibration, LinkageEngine, LinkStats
    from tests.test_linkage_engine import COHORT, MODEL, load_cohort

    load_cohort(store)
    person = {study: p for study, *_, p in COHORT}

    def series_images(series_pk):                 # stored path "<study uid>/<sop>.dcm" -> that person's anatomy
        _, paths = store.series_files(series_pk)
        study = paths[0].split("/")[0]
        return [moved(anatomy(100 + person[study]), angle=len(study) + float(study[-1]), seed=int(study[-1]))]

    cal = {MODEL: Calibration(a=10.0, b=-9.0)}    # cosine 0.99 alone: llr 0.9; with a bonus of 0.8: 8.9
    verifier = SeriesVerifier({MODEL: S}, series_images)
    plain = LinkageEngine(LinkStore(store.engine), D.Thresholds(), cal, candidates=5, index_dir=tmp_path / "a")
    plain.link_pending()
    before = {frozenset((l.a.patient_id, l.b.patient_id)): l.evidence["image"]["chest_xr"]
              for l in LinkStore(store.engine).list() if l.kind == D.SAME}
    assert "median_verification" not in before[frozenset(("A100", "B200"))]

    verified = LinkageEngine(LinkStore(store.engine), D.Thresholds(), cal, candidates=5, index_dir=tmp_path / "b",
                             verifier=verifier)
    a, b = (store.find_patient_pks(pid)[0] for pid in ("A100", "B200"))
    verified.check_pair(a, b, LinkStats())                  # the same pair again, now with the images checked
    after = {frozenset((l.a.patient_id, l.b.patient_id)): l.evidence["image"]["chest_xr"]
             for l in LinkStore(store.engine).list() if l.kind == D.SAME}[frozenset(("A100", "B200"))]
    assert after["median_verification"] > 0.5 and after["verified_pairs"] == 2
    assert after["weight"] > before[frozenset(("A100", "B200"))]["weight"] + 4


def test_an_unchecked_pair_is_scored_on_the_cosine_calibration_not_the_checked_one(store, tmp_path):
    """A card with verification is calibrated on cosine + bonus. Where a pair is not checked (checks
    switched off, images unreadable) the engine takes the card's cosine calibration, or leaves the route
    out of the evidence when the card has none, instead of reading a bare cosine on the other scale."""
    from db.links import LinkStore
    from linkage import decide as D
    from linkage.engine import Calibration, LinkageEngine, LinkStats
    from tests.test_linkage_engine import MODEL, load_cohort

    load_cohort(store)
    a, b = (store.find_patient_pks(pid)[0] for pid in ("A100", "B200"))
    checked = {MODEL: Calibration(a=10.0, b=-9.0)}                   # of cosine + bonus

    def evidence(cosine_calibrations, verifier=None, folder="x"):
        engine = LinkageEngine(LinkStore(store.engine), D.Thresholds(), checked, candidates=5,
                               index_dir=tmp_path / folder, verifier=verifier, cosine_calibrations=cosine_calibrations)
        engine.check_pair(a, b, LinkStats())
        return {frozenset((l.a.patient_id, l.b.patient_id)): l.evidence["image"]
                for l in LinkStore(store.engine).list() if l.kind == D.SAME}[frozenset(("A100", "B200"))]

    plain = evidence({})["chest_xr"]                                   # a model without verification
    alone = evidence({MODEL: Calibration(a=20.0, b=-10.0)}, folder="y")["chest_xr"]
    assert alone["weight"] == pytest.approx(20.0 * plain["median_cosine"] - 10.0, abs=1e-3)
    assert plain["weight"] == pytest.approx(10.0 * plain["median_cosine"] - 9.0, abs=1e-3)
    unreadable = SeriesVerifier({MODEL: S}, lambda pk: (_ for _ in ()).throw(OSError("gone")))
    read_failed = evidence({MODEL: Calibration(a=20.0, b=-10.0)}, unreadable, folder="z")["chest_xr"]
    assert read_failed["weight"] == pytest.approx(alone["weight"], abs=1e-3) and "verified_pairs" not in read_failed
    none = evidence({MODEL: None}, folder="w")["chest_xr"]              # no cosine calibration: no evidence
    assert none["weight"] == 0.0 and "no calibration" in none["note"]


def test_check_image_pairs_off_builds_no_verifier(tmp_path):
    """`linkage.check_image_pairs = false` (e.g. for a bulk import): no images are read, and the card's
    cosine calibration is at hand for the unchecked pairs."""
    from dicom_node.config import settings_from_dict
    from linkage.engine import LinkageEngine
    from models.inference.calibration import Calibration
    weights = tmp_path / "weights" / "chest_xr"
    weights.mkdir(parents=True)
    (weights / "card.json").write_text(json.dumps({
        "name": "n", "version": "v", "route": "chest_xr", "verification": {"weight_ncc": 0.3},
        "calibration": Calibration(a=10.0, b=-9.0).to_json(), "calibration_cosine": Calibration(a=20.0, b=-10.0).to_json()}))
    for on in (True, False):
        settings = settings_from_dict({"storage": {"dir": str(tmp_path / "s")},
                                       "pipeline": {"weights_dir": str(tmp_path / "weights")},
                                       "linkage": {"check_image_pairs": on, "keep_check_features": on}}, tmp_path)
        engine = LinkageEngine.from_settings(None, settings, load_images=lambda pk: [], fingerprint=str)
        assert (engine.verifier is not None) is on
        assert engine.cosine_calibrations[("chest_xr", "n", "v")].a == 20.0
    kept = settings_from_dict({"storage": {"dir": str(tmp_path / "s")}, "pipeline": {"weights_dir": str(tmp_path / "weights")},
                               "linkage": {"keep_check_features": False}}, tmp_path)
    assert LinkageEngine.from_settings(None, kept, lambda pk: [], str).verifier.folder is None
    assert engine_folder(LinkageEngine.from_settings(None, settings_from_dict(
        {"storage": {"dir": str(tmp_path / "s")}, "pipeline": {"weights_dir": str(tmp_path / "weights")}}, tmp_path),
        lambda pk: [], str)) == tmp_path / "s" / "linkage-index" / "check-features"


def engine_folder(engine):
    return engine.verifier.folder.root


def test_ecc_refinement_moves_a_slightly_wrong_fit_onto_the_true_one():
    from models.inference.verification import _cv2, _refined, complete, describe
    a = anatomy(9)
    h, w = a.shape
    true = np.float32([[1, 0, 6], [0, 1, -4]])
    b = cv2.warpAffine(a, true, (w, h), borderMode=cv2.BORDER_REFLECT)
    fa, fb = complete(describe(a, S), S), complete(describe(b, S), S)
    off = true + np.float32([[0, 0, -3], [0, 0, 2]])             # what a RANSAC fit on few matches might give
    refined = _refined(_cv2(), fa.highpass, fb.highpass, off, 50)
    assert np.abs(refined[:, 2] - true[:, 2]).max() < 0.5 < np.abs(off[:, 2] - true[:, 2]).max()
    flat = np.zeros_like(fa.highpass)                            # nothing to correlate: the fit is kept as it was
    assert np.array_equal(_refined(_cv2(), flat, flat, off, 50), off)
