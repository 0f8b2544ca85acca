"""The privacy audit's report: report.json, index.html, plots and thumbnails in one folder.

Pseudonyms and export-local labels (E0001...) only: archive patients are numbers, header findings
name attributes and count files, never values. Thumbnails are of the exported images themselves
(128 px), so they show what the export shows, burned-in text included.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

THUMBNAILS = 12


def at_risk(routes: dict, limit: int = THUMBNAILS) -> list[dict]:
    """The exported series most at risk: by the higher of their best link inside the export and their
    best archive candidate (probabilities as the node decides them). An image that is in the archive
    as it is (copy_in_archive) is marked, not ranked first: every export from this archive is."""
    risk: dict[str, dict] = {}
    for name, r in routes.items():
        for e in r.get("export", {}).get("at_risk", []):
            risk[e["label"]] = {**e, "route": name}
        for e in r.get("archive", {}).get("per_series", []):
            top = e["candidates"][0] if e["candidates"] else {}
            p = top.get("probability", 0.0)
            item = risk.setdefault(e["label"], {"label": e["label"], "pseudonym": e["pseudonym"], "route": name,
                                                "probability": 0.0})
            item.update(archive_probability=p, copy_in_archive=e["copy_in_archive"])
            item["probability"] = max(item["probability"], p)
    return sorted(risk.values(), key=lambda e: -e["probability"])[:limit]


def summary(report: dict) -> list[str]:
    """Plain-language lines for an information-governance officer."""
    lines = []
    for name, r in report["routes"].items():
        ex = r.get("export")
        if ex and not ex["calibrated"]:
            lines.append(f"{name}: {ex['series']} images; the model has no calibration, so the node links nothing "
                         "on these images (cosines only in the report).")
        elif ex:
            review, confident = ex["bands"]["review"], ex["bands"]["confident"]
            line = (f"{name}: {ex['series']} images under {ex['pseudonyms']} pseudonyms. The node's own model links "
                    f"{review['pairs']} pairs of pseudonyms as one person ({confident['pairs']} with high confidence)")
            if "right" in review:
                line += (f"; by the key {review['right']} of them are right, out of {ex['key']['true_pairs']} pairs "
                         "that really are one person")
            lines.append(line + ".")
        ar = r.get("archive")
        if ar:
            line = (f"{name}: against the archive ({ar['archive_patients']} patients), {ar['bands']['review']} "
                    f"exported images have a patient at review level or above")
            if ar["copies_in_archive"]:
                line += (f"; {ar['copies_in_archive']} are the archive's own images (whoever holds the archive finds "
                         "them by lookup; the figures here are about the person's other images)")
            attack = ar.get("attack") or {}
            if attack.get("queries"):
                line += (f"; by the key the nearest archive patient is the right person for {attack['rank1']:.0%} "
                         f"of {attack['queries']} images (Rank-1)")
            lines.append(line + ".")
    for why, count in report.get("not_audited", {}).items():
        lines.append(f"{count} series not audited: {why}.")
    h = report.get("headers")
    if h:
        left = ", ".join(f"{f['attribute']} ({f['files']} files)" for f in h["findings"][:8])
        lines.append(f"Header: {len(h['findings'])} attributes that the DICOM confidentiality profile removes or "
                     f"empties are still there" + (f": {left}" if left else "") + ".")
        if h["private_attributes"]:
            lines.append(f"Header: private attributes in {max(p['files'] for p in h['private_attributes'])} files "
                         "(the profile removes them).")
        if h.get("uids_in_archive"):
            lines.append(f"Header: {h['uids_in_archive']} UIDs are the archive's own (not replaced).")
        if h.get("pseudonyms_equal_to_patient_id"):
            lines.append(f"Header: {len(h['pseudonyms_equal_to_patient_id'])} pseudonyms are the original Patient ID.")
        if h["burned_in_annotation_yes"]:
            lines.append(f"Header: {h['burned_in_annotation_yes']} files say they carry burned-in annotation.")
    else:
        lines.append("Header: not checked (the export is images with a manifest, no DICOM header).")
    ocr = report.get("ocr")
    if ocr:
        lines.append(f"Burned-in text: the OCR read words on {len(ocr['with_text'])} of {ocr['checked']} images"
                     + (f" ({', '.join(o['label'] for o in ocr['with_text'][:10])}): look at them before release"
                        if ocr["with_text"] else "") + f" ({ocr['method']}).")
    else:
        lines.append("Burned-in text not checked: the pixels were not read for text (--ocr reads them).")
    risky = any(r.get("export", {}).get("bands", {}).get("review", {}).get("pairs") or
                r.get("archive", {}).get("bands", {}).get("review") for r in report["routes"].values())
    judged = any(r.get("export", {}).get("calibrated") for r in report["routes"].values())
    if not judged:
        lines.append("What to do: the images were not judged (no calibrated identity model for them), so this audit "
                     "says nothing on whether they link people; fix the header findings above and audit again "
                     "with the node's trained models.")
        return lines
    lines.append("What to do: " + ("the images themselves link people; removing header fields does not prevent "
                                   "this. Share only under a data-use agreement that forbids re-identification, "
                                   "give a person one pseudonym or leave out repeat images, or share fewer images."
                                   if risky else "the node's models link no pseudonyms at its bands; header "
                                   "findings above still need fixing before release."))
    return lines


def _thumbnail(paths: list[str], out: Path) -> bool:
    from PIL import Image

    from linkage.privacy_pixels import first_image
    try:
        pic = Image.fromarray(first_image(paths))
        pic.thumbnail((128, 128))
        pic.save(out)
        return True
    except Exception:  # noqa: BLE001 - a thumbnail that cannot be drawn is left out, the figures stand
        return False


def _histograms(routes: dict, out: Path) -> str:
    """Per route: each exported image's nearest cosine to another pseudonym, with the bands' cosines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shown = {name: r["export"] for name, r in routes.items() if r.get("export", {}).get("nearest_cosine")}
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.4), squeeze=False)
    for ax, (name, ex) in zip(axes[0], shown.items()):
        ax.hist(ex["nearest_cosine"], bins=30, alpha=.7, label="nearest other pseudonym")
        for band, value in (ex.get("thresholds") or {}).items():
            if value is not None:
                ax.axvline(value, color="red" if "confident" in band else "orange", label=band.replace("_", " "))
        ax.set_xlabel("cosine similarity"), ax.set_ylabel("images"), ax.legend(fontsize=7), ax.set_title(name)
    fig.tight_layout(), fig.savefig(out, dpi=100), plt.close(fig)
    return out.name


def write(report: dict, out: Path, export_series: dict[str, list[str]]) -> dict:
    """report.json, index.html, plots/ and thumbs/ in `out`; returns the JSON written."""
    from models.evaluation.report import plot_results
    out = Path(out)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    routes, plots = report["routes"], []
    if any(r.get("export", {}).get("nearest_cosine") for r in routes.values()):
        plots.append(f"plots/{_histograms(routes, out / 'plots' / 'nearest.png')}")
    # with a key: ROC, CMC and score histograms of the export (leave-one-out) and of the attack on the archive
    for part, results in (("export", {n: r["export"]["metrics"] for n, r in routes.items()
                                      if r.get("export", {}).get("metrics", {}).get("queries")}),
                          ("archive", {n: r["archive"]["attack"] for n, r in routes.items()
                                       if r.get("archive", {}).get("attack", {}).get("queries")})):
        if results:
            (out / "plots" / part).mkdir(exist_ok=True)
            gallery = "archive patients" if part == "archive" else "images"
            plots += [f"plots/{part}/{p}" for p in plot_results(results, out / "plots" / part, gallery)]
    report["plots"] = plots
    report["at_risk"] = at_risk(routes)
    (out / "thumbs").mkdir(exist_ok=True)
    for e in report["at_risk"]:
        if _thumbnail(export_series.get(e["label"], []), out / "thumbs" / f"{e['label']}.png"):
            e["thumbnail"] = f"thumbs/{e['label']}.png"
    report["summary"] = summary(report)
    clean = _plain(report)
    (out / "report.json").write_text(json.dumps(clean, indent=2) + "\n", encoding="utf-8")
    (out / "index.html").write_text(page(clean), encoding="utf-8")
    return clean


def _plain(value):
    """JSON-able: private entries (key starting with _) and the metrics' curves left out, arrays as lists."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def page(report: dict) -> str:
    e = html.escape
    rows = []
    for name, r in report["routes"].items():
        ex, ar = r.get("export") or {}, r.get("archive") or {}
        b = ex.get("bands", {})
        attack = ar.get("attack") or {}
        rows.append("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in (
            name, ex.get("series", ""), ex.get("pseudonyms", ""), b.get("review", {}).get("pairs", ""),
            b.get("confident", {}).get("pairs", ""), b.get("review", {}).get("right", "-"),
            (ex.get("key") or {}).get("true_pairs", "-"), ar.get("copies_in_archive", "-"),
            ar.get("bands", {}).get("review", "-"), f"{attack['rank1']:.3f}" if attack.get("queries") else "-",
            f"{attack['tar_at_far_1e-3']:.3f}" if attack.get("queries") else "-")) + "</tr>")
    risky = "".join(
        f"<figure>{'<img src=%s>' % e(a['thumbnail']) if a.get('thumbnail') else ''}<figcaption>{e(a['label'])} "
        f"{e(a['pseudonym'])} ({e(a['route'])}) P={a['probability']:.3f}"
        f"{' (in the archive as it is)' if a.get('copy_in_archive') else ''}</figcaption></figure>"
        for a in report["at_risk"])
    linked = "".join(
        f"<tr><td>{e(name)}</td><td>{e(x['a'])}</td><td>{e(x['b'])}</td><td>{x['probability']:.3f}</td>"
        f"<td>{e(x['band'])}</td><td>{x['best_cosine']:.3f}</td><td>{e(str(x.get('right', '-')))}</td></tr>"
        for name, r in report["routes"].items() for x in (r.get("export") or {}).get("linked", [])[:20])
    groups = (("Within the export: each image's nearest other pseudonym, and with a key the export's own "
               "ROC, CMC and scores", lambda p: not p.startswith("plots/archive/")),
              ("Against the archive (with a key): ROC, CMC over archive patients, scores",
               lambda p: p.startswith("plots/archive/")))
    plots = "".join(f"<h3>{e(title)}</h3>" + "".join(f"<img src='{e(p)}' alt='{e(p)}'>" for p in shown)
                    for title, keep in groups
                    for shown in [[p for p in report.get("plots", []) if keep(p)]] if shown)
    h = report.get("headers") or {}
    findings = "".join(f"<tr><td>{e(f['attribute'])} {e(f['tag'])}</td><td>{e(f['action'])}</td><td>{e(f['category'])}"
                       f"</td><td>{f['files']}</td><td>{e(f['left'])}</td></tr>" for f in h.get("findings", []))
    o = report.get("ocr")
    ocr = (f"{o['method']}: words read on {len(o['with_text'])} of {o['checked']} images"
           + "".join(f"; {x['label']} {x['pseudonym']} ({x['words']} words)" for x in o["with_text"])
           if o else "burned-in text not checked (privacy-audit --ocr reads the pixels)")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Privacy audit</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 6px;font-size:90%}} figure{{display:inline-block;margin:4px}}
img{{max-width:360px}}</style></head><body>
<h1>Privacy audit of a de-identified export</h1>
<p>{e(report['export'])} ({e(report['input'])}); pseudonyms only: archive patients are shown as numbers.</p>
<h2>Summary</h2><ul>{''.join(f'<li>{e(line)}</li>' for line in report['summary'])}</ul>
<h2>Risk per route</h2>
<table><tr><th>route</th><th>images</th><th>pseudonyms</th><th>pairs linked (review+)</th><th>confident</th>
<th>right (key)</th><th>true pairs (key)</th><th>copies in archive</th><th>archive match (review+)</th>
<th>Rank-1 (key)</th><th>TAR@FAR 1e-3 (key)</th></tr>{''.join(rows)}</table>
<h2>Pairs of pseudonyms the node links as one person</h2>
<table><tr><th>route</th><th>pseudonym</th><th>pseudonym</th><th>probability</th><th>band</th><th>best cosine</th>
<th>right (key)</th></tr>{linked}</table>
<h2>Images most at risk</h2><p>P: the node's probability that the image's person is found again, inside the export or
in the archive (the archive's own copy of the image left out).</p>{risky or '<p>none</p>'}
<h2>Plots</h2>{plots or '<p>none</p>'}
<h2>Header check</h2><p>{e(h.get('profile', 'not checked: no DICOM header'))}</p>
{f"<table><tr><th>attribute</th><th>action</th><th>category</th><th>files</th><th>finding</th></tr>{findings}</table>"
   if findings else ("<p>none found</p>" if h else "")}
<h2>Burned-in text</h2><p>{e(ocr)}</p>
<h2>Settings</h2><table>{''.join(f"<tr><td>{e(k)}</td><td>{e(str(v))}</td></tr>" for k, v in report['settings'].items())}</table>
</body></html>
"""
