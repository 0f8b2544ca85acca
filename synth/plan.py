"""Cohort configuration and study planning: visits, dates, sites, vendors, protocols, UIDs."""
from __future__ import annotations

import datetime as dt

from .common import rng_for
from .dicom_writer import uid
from .persons import SITE_ISSUERS, IdAllocator, Person, dicom_age, make_persons, parse_ymd, registered_demographics, ymd
from .settings import MODALITIES, PRESETS, SynthConfig  # noqa: F401 (re-exported)

# Vendors: header strings plus rendering style knobs the renderers read.
VENDORS = {
    "cxr": [
        dict(manufacturer="FUJIFILM Corporation", model="FCR PROFECT CS", modality="CR",
             photometric="MONOCHROME1", bits=10, portable=False, edge=0.8, gamma=1.0),
        dict(manufacturer="Agfa", model="CR 85-X", modality="CR", photometric="MONOCHROME1",
             bits=12, portable=False, edge=0.5, gamma=0.85),
        dict(manufacturer="Carestream Health", model="DRX-Revolution", modality="DX",
             photometric="MONOCHROME1", bits=12, portable=True, edge=0.6, gamma=1.1),
        dict(manufacturer="Philips Medical Systems", model="DigitalDiagnost", modality="DX",
             photometric="MONOCHROME2", bits=12, portable=False, edge=1.0, gamma=0.9),
        dict(manufacturer="SIEMENS", model="Ysio Max", modality="DX", photometric="MONOCHROME2",
             bits=12, portable=False, edge=0.7, gamma=1.15),
        dict(manufacturer="GE Healthcare", model="Optima XR240amx", modality="DX",
             photometric="MONOCHROME2", bits=14, portable=True, edge=0.4, gamma=1.0),
    ],
    "ct": [
        dict(manufacturer="SIEMENS", model="SOMATOM Definition AS+", signed=False, intercept=-1024,
             bits=12, padding=None, table=0, kernels=("I30f", "I70f")),
        dict(manufacturer="GE MEDICAL SYSTEMS", model="Revolution CT", signed=True, intercept=-1024,
             bits=16, padding=-2000, table=1, kernels=("STANDARD", "LUNG")),
        dict(manufacturer="Philips", model="Ingenuity CT", signed=False, intercept=-1024, bits=12,
             padding=None, table=2, kernels=("B", "YC")),
        dict(manufacturer="TOSHIBA", model="Aquilion ONE", signed=True, intercept=0, bits=16,
             padding=None, table=1, kernels=("FC08", "FC52")),
    ],
    "mr": [
        dict(manufacturer="SIEMENS", model="MAGNETOM Skyra", field=3.0, bias=0.25),
        dict(manufacturer="GE MEDICAL SYSTEMS", model="SIGNA Premier", field=3.0, bias=0.35),
        dict(manufacturer="Philips Medical Systems", model="Ingenia", field=1.5, bias=0.2),
        dict(manufacturer="SIEMENS", model="Avanto", field=1.5, bias=0.3),
    ],
    "fundus": [
        dict(manufacturer="TOPCON", model="TRC-NW8", fov=45.0, tint=(1.0, 0.55, 0.28)),
        dict(manufacturer="Canon", model="CR-2 AF", fov=45.0, tint=(1.0, 0.62, 0.35)),
        dict(manufacturer="Carl Zeiss Meditec", model="VISUCAM 500", fov=40.0, tint=(0.95, 0.5, 0.3)),
    ],
    "derm": [
        dict(manufacturer="FotoFinder Systems", model="medicam 1000", round=True, tint=(1.0, 0.95, 0.92)),
        dict(manufacturer="Canfield Scientific", model="VEOS DS3", round=False, tint=(1.0, 0.9, 0.85)),
        dict(manufacturer="HEINE", model="DELTAone", round=True, tint=(0.96, 0.94, 1.0)),
    ],
}

INSTITUTIONS = ["St. Anne General Hospital", "Riverside Medical Center", "Northgate Clinic",
                "Lakeside University Hospital", "Hillcrest Imaging Center", "Eastbay Health"]

DESCRIPTIONS = {
    "cxr": [("XR CHEST PA", "XR CHEST AP PORTABLE"), ("Thorax pa", "Thorax ap liegend"),
            ("CHEST 1 VIEW", "CHEST PORTABLE")],
    "ct": [("CT CHEST", "CT CHEST W CONTRAST"), ("CT Thorax nativ", "CT Thorax KM"),
           ("CT THORAX", "CT THORAX W")],
    "mr": [("MR BRAIN WO CONTRAST",), ("MRT Schaedel",), ("MRI HEAD",)],
    "fundus": [("FUNDUS PHOTOGRAPHY OU",), ("Fundusfoto beidseits",), ("RETINAL PHOTO",)],
    "derm": [("DERMOSCOPY",), ("Auflichtmikroskopie",), ("SKIN LESION DERMOSCOPY",)],
}


def site_vendor(modality: str, site: int, r, portable: bool = False, fixed: bool = False) -> int:
    """Index of the vendor a site uses for a modality (sites own different equipment)."""
    if modality == "cxr":
        return [2, 5][site % 2] if portable else [0, 3, 4, 1][site % 4]
    n = len(VENDORS[modality])
    choices = [site % n, (site + 1) % n]
    pick = int(r.integers(0, 2))
    return choices[0 if fixed else pick] if modality in ("ct", "mr") else site % n


def episode_dates(seed: int, person: Person, visits: int) -> list[dt.date]:
    r = rng_for(seed, "episodes", person.person_id)
    d = parse_ymd(person.first_visit)
    out = []
    for _ in range(visits):
        out.append(d)
        d = d + dt.timedelta(days=int(r.integers(45, 700)))
    return out


def plan_protocol(modality: str, r, vendor: dict, visit: int, fixed: bool = False) -> dict:
    """Per-study protocol; ``fixed`` (nuisance 0) gives every study the same protocol."""
    if fixed:
        return {"cxr": {"view": "PA", "portable": False},
                "ct": {"contrast": "none", "kernel": 0, "arms_up": True},
                "mr": {"sequences": ["T1", "T2"]}, "fundus": {"field": "macula"},
                "derm": {"polarized": True}}[modality]
    if modality == "cxr":
        return {"view": "AP" if vendor["portable"] else ("PA" if r.random() < 0.9 else "AP"),
                "portable": bool(vendor["portable"])}
    if modality == "ct":
        return {"contrast": str(r.choice(["none", "venous", "arterial"], p=[0.4, 0.4, 0.2])),
                "kernel": int(r.random() < 0.35), "arms_up": bool(r.random() < 0.85)}
    if modality == "mr":
        return {"sequences": ["T1", str(r.choice(["T2", "FLAIR"]))]}
    if modality == "fundus":
        return {"field": str(r.choice(["macula", "disc"], p=[0.7, 0.3]))}
    return {"polarized": bool(r.random() < 0.5)}


SERIES_NAMES = {
    "cxr": lambda p: [f"CHEST {p['view']}"],
    "ct": lambda p: ["Thorax 1.0 " + ("Lung" if p["kernel"] else "Soft") +
                     ("" if p["contrast"] == "none" else " CE")],
    "mr": lambda p: [{"T1": "t1_se_tra", "T2": "t2_tse_tra", "FLAIR": "t2_tirm_tra_dark-fluid"}[s]
                     for s in p["sequences"]],
    "fundus": lambda p: ["Color Fundus OU"],
    "derm": lambda p: ["Dermoscopy " + ("polarized" if p["polarized"] else "non-polarized")],
}


def build_plan(cfg: SynthConfig):
    """Persons and one study per (person, modality, visit), in a fixed order."""
    persons = make_persons(cfg.seed, cfg.patients, cfg.sites, cfg.twin_rate)
    ids = IdAllocator(cfg.seed)
    for p in persons:
        p.patient_ids[SITE_ISSUERS[p.home_site]] = ids.new(p.home_site)
    studies = []
    accessions = set()
    for p in persons:
        episodes = episode_dates(cfg.seed, p, cfg.visits)
        for visit in range(cfg.visits):
            for modality in MODALITIES:
                if modality not in cfg.modalities:
                    continue
                key = f"{p.person_id}/{modality}/{visit}"
                r = rng_for(cfg.seed, "plan", key)
                site = p.home_site
                portable = modality == "cxr" and r.random() < 0.3 and cfg.nuisance > 0
                vendor = site_vendor(modality, site, r, portable, cfg.nuisance == 0)
                date = episodes[visit] + dt.timedelta(days=int(r.integers(0, 21)))
                secs = int(r.integers(7 * 3600, 20 * 3600))
                acc = int(r.integers(10_000_000, 99_999_999))
                while acc in accessions:
                    acc += 1
                accessions.add(acc)
                protocol = plan_protocol(modality, r, VENDORS[modality][vendor], visit, cfg.nuisance == 0)
                reg = registered_demographics(p, site, r)
                study = {
                    "key": key, "person_id": p.person_id, "person_index": p.index,
                    "modality": modality, "visit": visit, "site": site,
                    "issuer": SITE_ISSUERS[site], "patient_id": p.patient_ids[SITE_ISSUERS[site]],
                    "registered": reg, "date": ymd(date),
                    "time": f"{secs // 3600:02d}{secs // 60 % 60:02d}{secs % 60:02d}",
                    "study_uid": uid(cfg.seed, "study", key),
                    "accession": f"{'ABCDEF'[site % 6]}{acc}", "vendor": vendor,
                    "protocol": protocol, "error_ids": [],
                }
                study["series"] = [
                    {"series_uid": uid(cfg.seed, "series", key, n), "number": n + 1,
                     "description": name}
                    for n, name in enumerate(SERIES_NAMES[modality](protocol))]
                studies.append(study)
    return persons, studies


def set_site(study: dict, persons: list[Person], site: int, seed: int, boost: float = 1.0):
    """Move a study to ``site`` (new vendor, re-registered demographics) — used by errors."""
    key = study["key"]
    r = rng_for(seed, "replan", key, site)
    p = persons[study["person_index"]]
    study["site"] = site
    study["issuer"] = SITE_ISSUERS[site]
    study["vendor"] = site_vendor(study["modality"], site, r,
                                  bool(study["protocol"].get("portable", False)))
    study["registered"] = registered_demographics(p, site, r, boost)
    study["accession"] = "ABCDEF"[site % 6] + study["accession"][1:]


def header_for(study: dict, person: Person) -> dict:
    """Study-level DICOM header values (as sent) for a planned study."""
    mod = study["modality"]
    vendor = VENDORS[mod][study["vendor"]]
    reg = study["registered"]
    descs = DESCRIPTIONS[mod][study["site"] % 3]
    if mod == "cxr":
        desc = descs[1] if study["protocol"]["view"] == "AP" else descs[0]
    elif mod == "ct":
        desc = descs[0] if study["protocol"]["contrast"] == "none" else descs[1]
    else:
        desc = descs[0]
    age = dicom_age(reg["birth_date"] or person.birth_date, study["date"]) if reg["birth_date"] else ""
    serial = str(10000 + (study["site"] * 7919 + study["vendor"] * 104729) % 90000)
    return {
        "patient_id": study["patient_id"], "issuer": study["issuer"], "name": reg["name"],
        "birth_date": reg["birth_date"], "sex": reg["sex"], "age": age, "charset": reg["charset"],
        "study_uid": study["study_uid"], "study_date": study["date"], "study_time": study["time"],
        "accession": study["accession"], "study_id": study["accession"][-6:],
        "study_description": desc, "referring": "",
        "institution": INSTITUTIONS[study["site"] % len(INSTITUTIONS)],
        "station": f"{SITE_ISSUERS[study['site']]}_{mod.upper()}{study['vendor'] + 1}",
        "manufacturer": vendor["manufacturer"], "model": vendor["model"], "serial": serial,
        "software": f"VX{(study['vendor'] + 3) % 10}.{study['site']}",
    }


def dicom_modality_of(cfg: SynthConfig, study: dict) -> str:
    mod = study["modality"]
    if mod == "cxr":
        return VENDORS["cxr"][study["vendor"]]["modality"]
    return {"ct": "CT", "mr": "MR", "fundus": "OP",
            "derm": "DMS" if cfg.derm_sop == "dms" else "XC"}[mod]


def add_seconds(hhmmss: str, seconds: int) -> str:
    t = int(hhmmss[:2]) * 3600 + int(hhmmss[2:4]) * 60 + int(hhmmss[4:6]) + int(seconds)
    t = min(t, 23 * 3600 + 59 * 60 + 59)
    return f"{t // 3600:02d}{t // 60 % 60:02d}{t % 60:02d}"


def series_attrs(cfg: SynthConfig, study: dict, person: Person, index: int, body_part: str,
                 minutes: int = 0) -> list[tuple[str, object]]:
    """Patient/study/equipment plus General Series attributes for series ``index``."""
    from .dicom_writer import patient_study_attrs
    se = study["series"][index]
    time = add_seconds(study["time"], 60 * minutes + 90 * index)
    return patient_study_attrs(header_for(study, person)) + [
        ("Modality", dicom_modality_of(cfg, study)),
        ("SeriesInstanceUID", se["series_uid"]),
        ("SeriesNumber", se["number"]),
        ("SeriesDescription", se["description"]),
        ("ProtocolName", se["description"]),
        ("SeriesDate", study["date"]),
        ("SeriesTime", time),
        ("BodyPartExamined", body_part),
        ("ContentDate", study["date"]),
        ("ContentTime", time),
        ("AcquisitionDate", study["date"]),
        ("AcquisitionTime", time),
        ("InstanceCreationDate", study["date"]),
        ("InstanceCreationTime", time),
    ]
