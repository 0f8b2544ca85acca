"""`dicom-node privacy-audit`: a synthetic cohort exported with a pseudonym per study is linked back as
the truth says, the header check finds the attributes deliberately left in, the report carries no
PHI; real radiographs converted to DICOM and de-identified are re-identified against the archive
at the Rank-1 that `dicom-node evaluate` reports for the same images and model; bad input exits 2."""

from __future__ import annotations

import csv
import shutil
import json
from itertools import combinations
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_node.cli import main
from tests.helpers import load_benchmark, node_config, write_toml

REPO = Path(__file__).resolve().parents[1]
ADULTS = REPO.parent / "shared" / "data" / "cxr-adult-figures" / "manifest.csv"
ROUTE_OF = {"cxr": "chest_xr", "ct": "chest_ct", "mr": "brain_mr", "fundus": "fundus", "derm": "dermoscopy"}

PATIENTS = 8                    # of cxr-adult-figures in test_b: every pair of images is checked by `evaluate`
bench = load_benchmark("privacy_audit")         # its test de-identifier: deidentify, write_key, per_study
deidentify, write_key, LEFT_IN = bench.deidentify, bench.write_key, set(bench.LEFT_IN)


def config(tmp_path: Path) -> Path:
    cfg = node_config(tmp_path, pipeline={"enabled": False, "device": "cpu",
                                          "weights_dir": str(REPO / "models" / "weights")},
                      linkage={"enabled": False})
    return write_toml(tmp_path / "node.toml", cfg)


def test_a_cohort_exported_per_study_is_linked_as_the_truth_says_and_headers_left_in_are_found(
        small_cohort, tmp_path):
    truth = json.loads((small_cohort / "truth.json").read_text())
    study = {s["study_uid"]: s for s in truth["studies"]}
    pseudonyms: dict[str, str] = {}

    def per_study(ds) -> str:
        return pseudonyms.setdefault(ds.StudyInstanceUID, f"PS{len(pseudonyms) + 1:04d}")

    export = tmp_path / "export"
    deidentify(small_cohort, export, per_study, leave_in=True)
    person = {p: study[uid]["person_id"] for uid, p in pseudonyms.items()}           # the key: pseudonym -> person
    route_of = {p: ROUTE_OF[study[uid]["modality"]] for uid, p in pseudonyms.items()}
    key = write_key(tmp_path / "key.csv", person)
    out = tmp_path / "report"
    assert main(["--config", str(config(tmp_path)), "privacy-audit", str(export), "--key", str(key),
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())

    for route, r in report["routes"].items():
        ex = r["export"]
        mine = [p for p in pseudonyms.values() if route_of[p] == route]
        true_pairs = {frozenset(pair) for pair in combinations(mine, 2) if person[pair[0]] == person[pair[1]]}
        assert ex["pseudonyms"] == len(mine) and ex["key"]["true_pairs"] == len(true_pairs), route
        linked = ex["linked"]
        assert all(e["right"] == (frozenset((e["a"], e["b"])) in true_pairs) for e in linked), route
        assert all(route_of[e["a"]] == route_of[e["b"]] == route for e in linked)
        review, confident = ex["bands"]["review"], ex["bands"]["confident"]
        assert review["pairs"] == len(linked) and confident["pairs"] == sum(e["band"] == "confident" for e in linked)
        assert review["right"] == sum(e["right"] for e in linked) and review["wrong"] == len(linked) - review["right"]
        assert all(e["probability"] >= 0.5 for e in linked)
    # scored against the truth: the models link half the persons' pseudonym pairs back together, and a
    # linked pair is one person far more often than a pair drawn at random (near-twins make the rest)
    found = sum(r["export"]["bands"]["review"]["right"] for r in report["routes"].values())
    linked = sum(r["export"]["bands"]["review"]["pairs"] for r in report["routes"].values())
    total = sum(r["export"]["key"]["true_pairs"] for r in report["routes"].values())
    pairs = sum(r["export"]["pseudonym_pairs"] for r in report["routes"].values())
    assert total == sum(1 for a, b in combinations(pseudonyms.values(), 2)
                        if person[a] == person[b] and route_of[a] == route_of[b])
    assert found >= total / 2 and found / linked > 5 * total / pairs, (found, linked, total, pairs)

    headers = report["headers"]
    assert {f["attribute"] for f in headers["findings"]} == LEFT_IN
    assert [p["creator"] for p in headers["private_attributes"]] == ["(0011,xx) ACME AUDIT 1.0"]
    assert all(f["files"] == headers["files"] for f in headers["findings"])
    assert "burned-in text not checked" in headers["burned_in_text"]
    # the report shows pseudonyms only: no original Patient ID, name or header value
    page = (out / "index.html").read_text() + (out / "report.json").read_text()
    originals = {s["patient_id"] for s in truth["studies"]} | {s["registered"]["name"] for s in truth["studies"]}
    assert not [o for o in originals if o and o in page]
    assert not [v for v in ("kept by mistake", *bench.LEFT_IN.values()) if v in page]
    assert report["at_risk"] and all(a["pseudonym"] in person for a in report["at_risk"])
    assert any((out / a["thumbnail"]).is_file() for a in report["at_risk"] if a.get("thumbnail"))
    assert {"plots/nearest.png", "plots/export/cmc.png", "plots/export/scores.png"} <= set(report["plots"])
    assert all((out / p).is_file() for p in report["plots"])


@pytest.mark.skipif(not ADULTS.is_file(), reason=f"real data not present at {ADULTS} (../shared/data)")
def test_b_real_radiographs_are_reidentified_at_the_rank1_evaluate_reports(tmp_path):
    """PATIENTS patients of cxr-adult-figures (a test set: reported on, nothing chosen on it) converted to DICOM and
    stored as the archive; the same images de-identified (a pseudonym per study) are the export."""
    with open(ADULTS, newline="") as fh:
        rows = list(csv.DictReader(fh))
    keep = set(sorted({r["patient_id"] for r in rows})[:PATIENTS])
    small = tmp_path / "manifest.csv"
    with open(small, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**r, "image": str(ADULTS.parent / r["image"])} for r in rows if r["patient_id"] in keep)
    cfg = str(config(tmp_path))
    converted = tmp_path / "converted"
    assert main(["convert", "--manifest", str(small), "--out", str(converted), "--quiet"]) == 0
    assert main(["--config", cfg, "db", "upgrade"]) == 0
    assert main(["--config", cfg, "import", *map(str, sorted(converted.rglob("*.dcm")))]) == 0
    assert main(["--config", cfg, "process", "--until-idle", "--stable-now"]) == 0

    key = deidentify(converted, tmp_path / "export", bench.per_study())
    out = tmp_path / "report"
    assert main(["--config", cfg, "privacy-audit", str(tmp_path / "export"), "--against-store",
                 "--key", str(write_key(tmp_path / "key.csv", key)), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    archive = report["routes"]["chest_xr"]["archive"]
    assert "plots/archive/cmc.png" in report["plots"] and (out / "plots" / "archive" / "cmc.png").is_file()

    assert main(["--config", cfg, "evaluate", "--route", "chest_xr", "--from-db", "--baseline-backbone", "none",
                 "--json", str(tmp_path / "evaluate.json")]) == 0
    evaluated = json.loads((tmp_path / "evaluate.json").read_text())["results"]
    cosine = evaluated.get("embedding only", evaluated["model"])        # the audit scores the embeddings' cosine
    attack = archive["attack"]
    assert archive["copies_in_archive"] == archive["series"] == cosine["images"] == len(key)
    assert attack["queries"] == cosine["queries"] and attack["patients"] == cosine["patients"] == PATIENTS
    assert attack["rank1"] == pytest.approx(cosine["rank1"])
    # the attack ranks archive patients (an impostor's several images take one rank), evaluate ranks images
    assert attack["rank5"] >= cosine["rank5"]
    assert 0 < attack["rank1"] < 1
    assert all(e["candidates"] and all(c["archive_patient"] >= 1 for c in e["candidates"])
               for e in archive["per_series"])
    # the de-identifier replaced every UID: none of the export's is the archive's own
    assert report["headers"]["uids_in_archive"] == 0 and report["headers"]["uids_checked"] == 3 * len(key)
    kept = pydicom.dcmread(next(converted.rglob("*.dcm")), stop_before_pixels=True)
    from db.engine import make_engine
    from db.links import LinkStore
    originals = {kept.StudyInstanceUID, kept.SeriesInstanceUID, kept.SOPInstanceUID}
    store = LinkStore(make_engine(f"sqlite:///{tmp_path / 'node.db'}"))
    assert store.known_uids(originals | {generate_uid()}) == originals


def test_bad_input_is_refused_with_a_message_and_exit_2(tmp_path, capsys, monkeypatch):
    cfg = str(config(tmp_path))
    export = tmp_path / "export"
    export.mkdir()
    (export / "notes.txt").write_text("not DICOM")
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,patient_id\nmissing.png,A\n")
    bad_key = tmp_path / "key.csv"
    bad_key.write_text("id,original\nA,B\n")
    cases = {
        (str(tmp_path / "absent"),): "no such file or folder",
        (str(manifest),): "needs --route",
        (str(export), "--route", "chest_xr"): "--route is for a manifest export",
        (str(export),): "no DICOM image files found",
        (str(export), "--key", str(bad_key)): "needs columns pseudonym and patient_id",
        (str(manifest), "--route", "chest_xr"): "image(s) not found",
        (str(export), "--against-store"): "dicom-node db upgrade",
        (str(export), "--weights-dir", str(tmp_path / "no-models")): "no model registry folder",
    }
    for args, message in cases.items():
        assert main(["--config", cfg, "privacy-audit", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)
    monkeypatch.setenv("PATH", str(tmp_path))                # no tesseract program on the PATH
    assert main(["--config", cfg, "privacy-audit", str(export), "--ocr"]) == 2
    assert "--ocr needs the tesseract program" in capsys.readouterr().err


def test_a_manifest_export_is_audited_with_the_route_given_and_says_its_header_is_not_checked(tmp_path, capsys):
    from tests.helpers import write_image_manifest
    original = write_image_manifest(tmp_path / "images", patients=5, per=2)
    with open(original, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if not r["duplicate_of"]]
    manifest = tmp_path / "images" / "export.csv"                  # a pseudonym per image
    with open(manifest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "patient_id"])
        writer.writerows((r["image"], f"PX{k}") for k, r in enumerate(rows))
    key = write_key(tmp_path / "key.csv", {f"PX{k}": f"MRN-{r['patient_id']}" for k, r in enumerate(rows)})
    assert main(["--config", str(config(tmp_path)), "privacy-audit", str(manifest), "--route", "chest_xr",
                 "--key", str(key)]) == 0
    printed = capsys.readouterr().out
    assert "chest_xr: 10 images under 10 pseudonyms" in printed
    assert "out of 5 pairs that really are one person" in printed
    assert "Header: not checked" in printed and "MRN" not in printed


def test_the_header_check_names_uids_of_the_archive_and_pseudonyms_that_are_the_patient_id():
    from pydicom.dataset import Dataset

    from linkage.privacy_headers import HeaderTally
    tally = HeaderTally()
    for pid, name in (("P1", "P1"), ("MRN7", "DOE^JANE")):
        ds = Dataset()
        ds.PatientID, ds.PatientName, ds.StudyDate = pid, name, "20200101"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (f"1.2.{pid[-1]}.{k}" for k in (1, 2, 3))
        ds.LongitudinalTemporalInformationModified = "MODIFIED" if pid == "P1" else "UNMODIFIED"
        tally.add(ds, pid)
    result = tally.result(uids_in_archive={"1.2.7.1", "9.9"}, key={"P1": "MRN1", "MRN7": "MRN7"},
                          pseudonyms={"P1", "MRN7"})
    # a name that is the pseudonym is the dummy value; a date is kept only where marked shifted
    assert [(f["attribute"], f["files"], f["pseudonyms"]) for f in result["findings"]] == [
        ("StudyDate", 1, ["MRN7"]), ("PatientName", 1, ["MRN7"])]
    assert result["uids_in_archive"] == 1 and result["uids_checked"] == 6 and result["dates_marked_modified"] == 1
    assert result["pseudonyms_equal_to_patient_id"] == ["MRN7"]


@pytest.mark.skipif(shutil.which("tesseract") is None,
                    reason="privacy-audit --ocr needs Debian's tesseract-ocr (.ci/run installs it)")
def test_ocr_finds_burned_in_text_and_the_report_counts_it_without_showing_it(tmp_path):
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:512, 0:512]
    body = 120 + 60 * np.exp(-((x - 256) ** 2 + (y - 256) ** 2) / (2 * 120 ** 2)) + rng.normal(0, 6, (512, 512))
    (tmp_path / "images").mkdir()
    rows = []
    for k, text in enumerate(("DOE JOHN 1970-03-12", None, "SMITH ANNA WARD 7", None)):
        picture = Image.fromarray(np.roll(body, 9 * k, axis=1).clip(0, 255).astype(np.uint8))
        if text:
            ImageDraw.Draw(picture).text((20, 20), text, fill=255, font=ImageFont.load_default(size=32))
        picture.save(tmp_path / "images" / f"{k}.png")
        rows.append(f"images/{k}.png,P{k}\n")
    (tmp_path / "manifest.csv").write_text("image,patient_id\n" + "".join(rows))
    assert main(["convert", "--manifest", str(tmp_path / "manifest.csv"), "--out", str(tmp_path / "dicom"),
                 "--quiet"]) == 0
    out = tmp_path / "report"
    assert main(["--config", str(config(tmp_path)), "privacy-audit", str(tmp_path / "dicom"), "--ocr",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["ocr"]["checked"] == 4 and report["ocr"]["unreadable"] == 0
    assert sorted(o["pseudonym"] for o in report["ocr"]["with_text"]) == ["P0", "P2"]
    page = (out / "index.html").read_text() + (out / "report.json").read_text()
    assert "Tesseract" in page and not [w for w in ("DOE", "JOHN", "SMITH", "ANNA") if w in page]


def test_an_audit_without_a_calibrated_model_does_not_read_as_safe():
    from linkage.privacy_report import summary
    export = {"series": 4, "pseudonyms": 4, "calibrated": False,
              "bands": {"review": {"pairs": 0}, "confident": {"pairs": 0}}}
    lines = summary({"routes": {"chest_xr": {"export": export}}, "headers": None})
    assert "the model has no calibration" in lines[0]
    assert lines[-1].startswith("What to do: the images were not judged")
    assert not any("link no pseudonyms" in line for line in lines)
