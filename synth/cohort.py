"""Generating a cohort: plan, inject errors, render and write in parallel, write truth.json.

Every (person, modality) pair is one task; a task's output depends only on the seed and
the plan, so the files are byte-identical whatever the number of worker processes.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

from . import ct, cxr, derm, fundus, mr
from .dicom_writer import SeriesEncoder, safe_component
from .errors import build_truth, inject_errors
from .persons import person_draw
from .plan import SynthConfig, build_plan, dicom_modality_of

RENDERERS = {"cxr": cxr.render_studies, "ct": ct.render_studies, "mr": mr.render_studies,
             "fundus": fundus.render_studies, "derm": derm.render_studies}
COST = {"ct": 4, "mr": 4, "fundus": 2, "cxr": 1, "derm": 1}


def series_dir(study: dict, series: dict) -> Path:
    return Path(safe_component(study["patient_id"])) / study["study_uid"] / series["series_uid"]


def _instance_number(inst) -> int:
    for kw, value in inst.specific:
        if kw == "InstanceNumber":
            return int(value)
    return 1


def run_task(args) -> dict:
    """Render and write all studies of one person for one modality."""
    cfg, out, persons, person_index, modality, studies = args
    person = persons[person_index]
    draw = person_draw(cfg.seed, persons, person, modality)
    result: dict = {}
    encoders: dict = {}
    for st, si, inst in RENDERERS[modality](cfg, persons, person, draw, studies):
        se = st["series"][si]
        uid = se["series_uid"]
        if uid not in encoders:
            encoders[uid] = SeriesEncoder(inst.common)
        rel = series_dir(st, se)
        nbytes = encoders[uid].write(Path(out) / rel / f"{_instance_number(inst):04d}.dcm", inst)
        info = result.setdefault(uid, {"path": rel.as_posix(), "n_instances": 0, "bytes": 0})
        info["n_instances"] += 1
        info["bytes"] += nbytes
    return result


def generate(cfg: SynthConfig, out: str | os.PathLike, jobs: int | None = None, progress=None) -> dict:
    """Generate the cohort into ``out``; returns a summary (persons, studies, files, bytes)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    persons, studies = build_plan(cfg)
    errors = inject_errors(cfg, persons, studies)
    for st in studies:
        st["dicom_modality"] = dicom_modality_of(cfg, st)
    groups: dict = {}
    for st in studies:
        groups.setdefault((st["person_index"], st["modality"]), []).append(st)
    tasks = [(cfg, str(out), persons, pi, mod, sts) for (pi, mod), sts in groups.items()]
    tasks.sort(key=lambda t: -COST[t[4]])
    jobs = max(1, int(jobs or os.cpu_count() or 1))
    series_files: dict = {}
    if jobs == 1 or len(tasks) < 2:
        for i, t in enumerate(tasks):
            series_files.update(run_task(t))
            if progress:
                progress(i + 1, len(tasks))
    else:
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        with ctx.Pool(min(jobs, len(tasks))) as pool:
            for i, res in enumerate(pool.imap_unordered(run_task, tasks, chunksize=1)):
                series_files.update(res)
                if progress:
                    progress(i + 1, len(tasks))
    truth = build_truth(cfg, persons, studies, errors, series_files)
    (out / "truth.json").write_text(json.dumps(truth, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return {"persons": len(persons), "studies": len(studies), "series": len(series_files),
            "files": sum(v["n_instances"] for v in series_files.values()),
            "bytes": sum(v["bytes"] for v in series_files.values()), "errors": len(errors)}
