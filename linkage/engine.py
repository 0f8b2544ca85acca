"""The linkage engine: after a series is embedded, compare it with the store and flag mistakes.

For each embedded, not yet linked series (a persisted work list: `series.linked_at`):

1. its patient's studies are re-checked for one that does not look like the rest
   (different_patient_same_id), since a new study can make an older one the odd one out;
2. candidates for the same person under another Patient ID are the nearest stored series
   of the same model (faiss, `linkage.search`) and the patients sharing a birth date
   (blocking, so a person whose images were never seen before is still found by name);
   each candidate patient pair is scored in full over all their studies;
3. open links touching the patient are re-scored, so new evidence updates them.

The decision itself is `linkage.decide`; the store is `db.links`. Nothing is merged.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from db.links import LinkStore
from db.records_linkage import StoredEmbedding
from linkage import decide as D
from linkage.evidence import MatchWeights
from linkage.search import MANIFEST, CandidateIndex
from models.inference.calibration import Calibration
from models.inference.verification import SeriesVerifier, VerificationSettings
from models.inference.verification_files import FeatureFolder

log = logging.getLogger("linkage.engine")


ModelKey = tuple[str, str, str]          # (route, model name, model version)


def registry_cards(weights_dir: Path | None) -> dict[ModelKey, dict]:
    """Model key -> card, for the registry's cards, read once as JSON (models.inference.networks would import
    torch); an unreadable card is logged and left out."""
    out = {}
    if not weights_dir or not Path(weights_dir).is_dir():
        return out
    for card_path in sorted(Path(weights_dir).glob("*/card.json")):
        try:
            card = json.loads(card_path.read_text(encoding="utf-8"))
            out[(card.get("route") or card_path.parent.name, str(card.get("name")), str(card.get("version")))] = card
        except (OSError, ValueError) as error:
            log.warning("%s: card not readable (%s)", card_path, error)
    return out


def _card_entries(cards: dict[ModelKey, dict], entry: str, parse) -> dict[ModelKey, object]:
    """Model key -> parse(card) for the cards that have `entry`; one that cannot be parsed is logged and left out."""
    out = {}
    for key, card in cards.items():
        if card.get(entry):
            try:
                out[key] = parse(card)
            except (ValueError, TypeError, KeyError) as error:
                log.warning("%s %s: %s not usable (%s)", key[1], key[2], entry, error)
    return out


def load_calibrations(cards: dict[ModelKey, dict]) -> dict[ModelKey, Calibration]:
    """Model key -> calibration. A card without one (or an untrained network, which has no
    card) gives no image evidence."""
    return _card_entries(cards, "calibration", lambda card: Calibration.from_json(card["calibration"]))


def load_verification_settings(cards: dict[ModelKey, dict]) -> dict[ModelKey, VerificationSettings]:
    """Model key -> geometric verification settings (models.inference.verification), for the cards that ask for it."""
    return _card_entries(cards, "verification", VerificationSettings.from_card)


def load_cosine_calibrations(cards: dict[ModelKey, dict]) -> dict[ModelKey, Calibration | None]:
    """For the cards with verification (whose `calibration` is of cosine + bonus): the calibration of the
    cosine alone (`calibration_cosine`), for pairs that were not checked; None where the card has none."""
    return _card_entries(cards, "verification", lambda card: Calibration.from_json(card["calibration_cosine"])
                         if card.get("calibration_cosine") else None)


def settings_thresholds(cfg) -> D.Thresholds:
    """The decision thresholds of node.toml's [linkage] section (dicom_node.config.LinkageSettings)."""
    return D.Thresholds(cfg.review_probability, cfg.confident_probability, cfg.prior_same_person,
                        cfg.prior_misfiled, cfg.max_image_llr, cfg.further_route_factor,
                        cfg.max_image_total, cfg.worth_a_look_probability, cfg.study_dependence)


def model_calibrations(cards: dict[ModelKey, dict]) -> dict[ModelKey, Calibration | None]:
    """Model key -> the calibration of the cosine alone: the card's `calibration`, or for a card with
    verification (whose `calibration` is of cosine + bonus) its `calibration_cosine` (None where it has none)."""
    return {**load_calibrations(cards), **load_cosine_calibrations(cards)}


def node_index_dir(index_root: Path, instance: str) -> Path:
    """This node's candidate index folder, `<index_root>/nodes/<instance>/`: the index is a cache of the
    database that each node keeps and saves on its own, so nodes sharing a storage folder never save
    over each other's. An index saved by an earlier version directly in `index_root` is moved in
    (index files first, the manifest last: a move cut short leaves no manifest, and the index is
    rebuilt from the database)."""
    folder = index_root / "nodes" / instance
    legacy = index_root / MANIFEST
    if legacy.exists() and not (folder / MANIFEST).exists():
        folder.mkdir(parents=True, exist_ok=True)
        for path in [*index_root.glob("*.faiss"), *index_root.glob("*.faiss.json"), legacy]:
            os.replace(path, folder / path.name)
        log.info("candidate index moved from %s to this node's folder %s", index_root, folder)
    return folder


@dataclass
class LinkStats:
    series: int = 0
    created: int = 0
    updated: int = 0
    errors: int = 0
    seconds: float = 0.0


class LinkageEngine:
    def __init__(self, store: LinkStore, thresholds: D.Thresholds, calibrations: dict,
                 candidates: int = 10, max_birth_date_block: int = 50, index_dir: Path | None = None,
                 verifier: SeriesVerifier | None = None, cosine_calibrations: dict | None = None) -> None:
        self.store = store
        self.t = thresholds
        self.calibrations = calibrations
        self.verifier = verifier
        # models whose `calibrations` entry is of cosine + bonus -> the calibration of the cosine alone
        self.cosine_calibrations = cosine_calibrations or {}
        self.k = candidates
        self.max_block = max_birth_date_block
        self.index_dir = index_dir
        self.index = self._open_index()
        self._unsaved = 0
        self.weights = MatchWeights()
        # One pass at a time: worker threads share this engine; a thread that finds a
        # pass running leaves its series to it (they are on the same work list).
        self._busy = threading.Lock()

    @classmethod
    def from_settings(cls, store: LinkStore, settings, load_images=None, fingerprint=None) -> LinkageEngine:
        """`load_images(series_pk)`: a stored series' 2D images, for the models with geometric verification
        (used when `linkage.check_image_pairs` is on); `fingerprint(series_pk)`: a string that changes with
        the series' files, so their verification features can be kept on disk (`linkage.keep_check_features`)."""
        cfg = settings.linkage
        thresholds = settings_thresholds(cfg)
        cards = registry_cards(settings.resolve(settings.pipeline.weights_dir))
        verification = load_verification_settings(cards)
        index_dir = settings.storage_dir / cfg.index_dir
        verifier = None
        if verification and load_images and cfg.check_image_pairs:
            # the checked series' features: per series, checked against its files' fingerprint, written
            # whole under a temporary name: shared by every node
            folder = (FeatureFolder(index_dir / "check-features", settings.storage.min_free_bytes)
                      if fingerprint and cfg.keep_check_features else None)
            verifier = SeriesVerifier(verification, load_images, folder=folder, fingerprint=fingerprint)
        return cls(store, thresholds, load_calibrations(cards), cfg.candidates, cfg.max_birth_date_block,
                   node_index_dir(index_dir, settings.instance_name), verifier, load_cosine_calibrations(cards))

    # ----- the work list ---------------------------------------------------------------

    def link_pending(self, limit: int = 256) -> LinkStats:
        """Link every embedded series not linked yet (in batches of `limit`)."""
        stats = LinkStats()
        if not self._busy.acquire(blocking=False):
            return stats
        try:
            self._link_all(stats, limit)
        finally:
            self._busy.release()
        return stats

    def _link_all(self, stats: LinkStats, limit: int) -> None:
        started = time.perf_counter()
        while True:
            pending = self.store.pending_series(limit)
            if not pending:
                break
            self.catch_up()
            self.weights = MatchWeights(self.store.match_weights())
            # A study's series arrive together: each patient is checked once per batch,
            # against the union of the candidates of its new series.
            by_patient: dict[int, list[StoredEmbedding]] = defaultdict(list)
            for emb in self.store.embeddings(series_pks=pending):
                by_patient[emb.patient_pk].append(emb)
            # Misfiled studies first: a pair of patients is compared without them.
            for patient in by_patient:
                self._guarded(stats, self.check_patient, patient, stats)
            checked: set[tuple[int, int]] = set()
            for patient, new in by_patient.items():
                self._guarded(stats, self.link_patient, patient, new, stats, checked)
            stats.series += len(pending)
            self.store.mark_linked(pending)
        stats.seconds = time.perf_counter() - started
        if stats.series:
            log.info("linked %d series: %d links created, %d updated, %.0f ms", stats.series, stats.created,
                     stats.updated, 1000 * stats.seconds)
        self.save_index()

    def catch_up(self) -> int:
        before = len(self.index)
        self.index.catch_up(self.store.embedding_rows_after(self.index.watermark))
        added = len(self.index) - before
        self._unsaved += max(added, 0)
        return added

    # ----- one patient's new series ------------------------------------------------------

    @staticmethod
    def _guarded(stats: LinkStats, step, patient: int, *args) -> None:
        try:
            step(patient, *args)
        except Exception:  # one bad patient must not stop linking; it is logged, not retried forever
            stats.errors += 1
            log.exception("linking patient pk %d failed in %s", patient, step.__name__)

    def link_patient(self, patient: int, new: list[StoredEmbedding], stats: LinkStats | None = None,
                     checked: set[tuple[int, int]] | None = None) -> None:
        """Compare one patient's new series with the store (after `check_patient` ran for it)."""
        stats = stats or LinkStats()
        checked = set() if checked is None else checked
        candidates = set(self.store.open_same_partners(patient))
        own: dict[tuple, set[int]] = defaultdict(set)            # this patient's series per model, read once
        for e in self.store.embeddings(patient_pks=[patient]):
            own[e.model_key].add(e.series_pk)
        for emb in new:
            candidates |= self._candidate_patients(emb, own[emb.model_key])
        candidates |= self._birth_date_block(patient)
        candidates.discard(patient)
        for other in sorted(candidates):
            pair = (min(patient, other), max(patient, other))
            if pair not in checked:
                checked.add(pair)
                self.check_pair(patient, other, stats)

    def _candidate_patients(self, emb: StoredEmbedding, own: set[int]) -> set[int]:
        """Patients of the nearest stored series of the same model, `own` (this patient's) excluded."""
        ids, _scores = self.index.search(emb.model_key, _vector(emb.vector), self.k, exclude=own)
        return {e.patient_pk for e in self.store.embeddings(series_pks=[int(i) for i in ids])}

    def _birth_date_block(self, patient: int) -> set[int]:
        """Patients with a study carrying one of this patient's birth dates (or it day/month-swapped)."""
        if not self.max_block:
            return set()
        dates = set()
        for f in self.store.study_facts(patient_pks=[patient]).values():
            if f.birth_date and len(f.birth_date) == 8:
                dates |= {f.birth_date, f.birth_date[:4] + f.birth_date[6:8] + f.birth_date[4:6]}
        return set(self.store.patients_born(dates, exclude_patient=patient, limit=self.max_block))

    # ----- the two checks ------------------------------------------------------------------

    def check_patient(self, patient_pk: int, stats: LinkStats) -> None:
        """different_patient_same_id: is any of this patient's studies not like the others?"""
        facts = self.store.study_facts(patient_pks=[patient_pk])
        embeddings = self.store.embeddings(patient_pks=[patient_pk])
        pairs = [p for p in self._pairs(embeddings, embeddings) if p.a_study_pk != p.b_study_pk]
        decisions = D.decide_studies_of_patient(facts, pairs, self.weights, self.t)
        for study_pk, decision in decisions.items():
            self._save(D.MISFILED, D.misfiled_key(study_pk), decision, patient_pk, patient_pk, stats)

    def check_pair(self, a_patient: int, b_patient: int, stats: LinkStats) -> None:
        """same_patient_different_id: are these two Patient IDs one person?"""
        # A study flagged as another person's says nothing about who its Patient ID is:
        # its images and the demographics it carried are left out of the comparison.
        suspects = self.store.suspect_studies([a_patient, b_patient])
        facts = self.store.study_facts(patient_pks=[a_patient, b_patient])
        a_studies = [f for f in facts.values() if f.patient_pk == a_patient and f.study_pk not in suspects]
        b_studies = [f for f in facts.values() if f.patient_pk == b_patient and f.study_pk not in suspects]
        if not a_studies or not b_studies:
            self._withdraw_same(a_patient, b_patient, stats)
            return
        embeddings = [e for e in self.store.embeddings(patient_pks=[a_patient, b_patient]) if e.study_pk not in suspects]
        pairs = self._pairs([e for e in embeddings if e.patient_pk == a_patient],
                            [e for e in embeddings if e.patient_pk == b_patient])
        decision = D.decide_same(a_studies, b_studies, pairs, self.weights, self.t)
        self._save(D.SAME, D.same_key(a_patient, b_patient), decision, a_patient, b_patient, stats)

    def _withdraw_same(self, a_patient: int, b_patient: int, stats: LinkStats) -> None:
        """Nothing left to compare: an open link between the two is withdrawn (kept, audited)."""
        if self.store.withdraw(D.same_key(a_patient, b_patient), "no study of one side is left to compare"):
            stats.updated += 1

    def _pairs(self, mine: list[StoredEmbedding], theirs: list[StoredEmbedding]) -> list[D.ImagePair]:
        pairs = []
        for a in mine:
            va = _vector(a.vector)
            for b in theirs:
                if b.model_key != a.model_key:
                    continue                        # vectors of different models are never compared
                cosine = float(np.dot(va, _vector(b.vector)))
                bonus = self.verifier.bonus(a.model_key, a.series_pk, b.series_pk) if self.verifier else None
                cal = self._calibration(a.model_key, bonus)
                pairs.append(D.ImagePair(a.route, a.study_pk, b.study_pk, cosine,
                                         cal.llr(cosine + (bonus or 0.0)) if cal else None,
                                         f"{a.model_key[1]} {a.model_key[2]}", bonus))
        return pairs

    def _calibration(self, model_key: ModelKey, bonus: float | None) -> Calibration | None:
        """The calibration of the score at hand. A card with verification is calibrated on cosine + bonus;
        a pair left unchecked (checks off, images unreadable) takes the card's cosine calibration, or gives
        no image evidence where the card has none, rather than a cosine read on the wrong scale."""
        if bonus is None and model_key in self.cosine_calibrations:
            return self.cosine_calibrations[model_key]
        return self.calibrations.get(model_key)

    def _save(self, kind: str, key: str, decision: D.Decision, a_patient: int, b_patient: int, stats: LinkStats) -> None:
        decision = replace(decision, band=D.stored_band(decision, self.t))
        if kind == D.SAME and a_patient > b_patient:
            # one orientation per pair: a is the lower patient key, its study first
            decision = replace(decision, a_study_pk=decision.b_study_pk, b_study_pk=decision.a_study_pk)
            a_patient, b_patient = b_patient, a_patient
        _, action = self.store.upsert(D.to_draft(kind, key, decision, a_patient, b_patient))
        if action == "created":
            stats.created += 1
        elif action == "updated":
            stats.updated += 1

    # ----- the candidate index ----------------------------------------------------------

    def _open_index(self) -> CandidateIndex:
        if self.index_dir and self.index_dir.exists():
            try:
                index = CandidateIndex.load(self.index_dir)
                if index is not None:
                    return index
            except Exception as error:  # noqa: BLE001 - a damaged index is rebuilt, never fatal
                log.warning("candidate index in %s not usable (%s); rebuilding from the database", self.index_dir, error)
        return CandidateIndex()

    def save_index(self, force: bool = False) -> None:
        if self.index_dir and (force or self._unsaved >= 1000):
            self.index.save(self.index_dir)
            self._unsaved = 0


def _vector(raw: bytes) -> np.ndarray:
    v = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v
