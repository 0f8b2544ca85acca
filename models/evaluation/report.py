"""An evaluation's report: metrics.json, plots (ROC, CMC, score histograms), the one-screen summary,
and `evaluate --update-card` (held-out metrics and a refitted calibration written into the card)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from models.evaluation import metrics as M
from models.evaluation.evaluate import VERIFIED_SCORE


def update_card(report: dict, weights_dir: Path, dataset: str) -> Path:
    """Record the report's model metrics in the card (metrics.heldout[dataset]) and refit its calibration
    on these pairs. The card's sha256 is of model.pt, so it stays valid."""
    from models.inference.calibration import fit_calibration
    card_path = Path(weights_dir) / report["route"] / "card.json"
    card = json.loads(card_path.read_text(encoding="utf-8"))
    if (card.get("name"), card.get("version")) != (report["model"]["name"], report["model"]["version"]):
        raise ValueError(f"{card_path}: the report is of another model")
    r = report["results"]["model"]
    baselines = {name: M.summary(r) for name, r in report["results"].items()
                 if name in ("embedding only", "pixel-cosine") or name.startswith("frozen-")}
    card.setdefault("metrics", {}).setdefault("heldout", {})[dataset] = {
        **M.summary(r), "source": report["source"], "command": report.get("command", ""), **baselines}
    chosen = report.get("check_weights")
    if chosen:
        # the weights were chosen on these very pairs: the metrics recorded with them are optimistic, and say so
        card["verification"].update(chosen["chosen"], selected_on=f"{dataset}: best mAP of the evaluate "
                                    f"--choose-check-weights grid on these pairs (before: {chosen['card']})")
        card["metrics"]["heldout"][dataset]["check_weights_chosen_on_these_pairs"] = True
    fitted_on = f"held-out pairs: {dataset} ({r['patients']} patients, {r['images']} examples)"
    cal = fit_calibration(r["_curves"]["genuine"], r["_curves"]["impostor"], fitted_on=fitted_on)
    if report["source"].get("verification"):
        cal = replace(cal, score=VERIFIED_SCORE)
        # linkage scores a pair it could not check by its cosine, on this scale (linkage.engine)
        alone = report["results"]["embedding only"]["_curves"]
        card["calibration_cosine"] = fit_calibration(alone["genuine"], alone["impostor"], fitted_on=fitted_on).to_json()
    elif card.get("verification"):
        raise ValueError(f"{card_path}: the card's calibration is of cosine + verification bonus; "
                         "these scores are cosines alone")
    card["calibration"] = cal.to_json()
    report["calibration"] = card["calibration"]
    card_path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return card_path


def plot_results(results: dict, out: Path, gallery: str = "images") -> list[str]:
    """roc.png, cmc.png and scores.png in `out` for results with curves (metrics.identity_metrics(curves=True));
    `gallery` names what the CMC ranks."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, r in results.items():
        c = r["_curves"]
        ax.plot(np.maximum(c["far"], 1e-6), c["tar"], label=f"{name} (AUC {r['roc_auc']:.3f})")
    ax.set_xscale("log"), ax.set_xlim(1e-5, 1), ax.set_xlabel("FAR (different-patient pairs accepted)")
    ax.set_ylabel("TAR (same-patient pairs accepted)"), ax.set_title("ROC"), ax.legend(fontsize=8), ax.grid(alpha=.3)
    fig.tight_layout(), fig.savefig(out / "roc.png", dpi=100), plt.close(fig)
    files.append("roc.png")

    fig, ax = plt.subplots(figsize=(5, 4))
    for name, r in results.items():
        ax.plot(np.arange(1, len(r["cmc"]) + 1), r["cmc"], marker=".", label=f"{name} (Rank-1 {r['rank1']:.3f})")
    ax.set_xlabel("rank"), ax.set_ylabel("identification rate"), ax.set_ylim(0, 1.02)
    ax.set_title(f"CMC (gallery {next(iter(results.values()))['gallery_size']} {gallery})"), ax.legend(fontsize=8)
    ax.grid(alpha=.3), fig.tight_layout(), fig.savefig(out / "cmc.png", dpi=100), plt.close(fig)
    files.append("cmc.png")

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items()):
        c = r["_curves"]
        bins = np.linspace(min(c["impostor"].min(), c["genuine"].min()),
                           max(c["impostor"].max(), c["genuine"].max(), 1.0), 60)
        ax.hist(c["impostor"], bins=bins, density=True, alpha=.6, label="different patient")
        ax.hist(c["genuine"], bins=bins, density=True, alpha=.6, label="same patient")
        ax.set_title(name), ax.set_xlabel("similarity"), ax.legend(fontsize=8)
    fig.tight_layout(), fig.savefig(out / "scores.png", dpi=100), plt.close(fig)
    files.append("scores.png")
    return files


def write_report(report: dict, out: Path | None, json_path: Path | None = None) -> dict:
    """metrics.json (+ PNG plots when `out` is given); returns the JSON-able report."""
    results = report["results"]
    clean = {k: v for k, v in report.items() if k != "results"}
    clean["results"] = {name: {k: v for k, v in r.items() if k != "_curves"} for name, r in results.items()}
    cal = report.get("calibration")
    if cal:
        from models.inference.calibration import Calibration, reliability
        c = Calibration.from_json(cal)
        g, i = results["model"]["_curves"]["genuine"], results["model"]["_curves"]["impostor"]
        if len(g) and len(i):
            clean["calibration_check"] = reliability(c, g, i, bins=5)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        clean["plots"] = plot_results(results, out)
        (out / "metrics.json").write_text(json.dumps(clean, indent=2, default=float) + "\n", encoding="utf-8")
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(clean, indent=2, default=float) + "\n", encoding="utf-8")
    return clean


def format_summary(report: dict) -> str:
    lines = [f"route {report['route']}  model {report['model']['name']} {report['model']['version']}",
             f"source {report['source']}"]
    if report["source"].get("frozen_baseline"):
        lines.append(f"frozen-backbone baseline: {report['source']['frozen_baseline']}")
    for name, r in report["results"].items():
        lines.append(f"{name:>14}: Rank-1 {r['rank1']:.3f}  Rank-5 {r['rank5']:.3f}  mAP {r['mAP']:.3f}  "
                     f"AUC {r['roc_auc']:.3f}  EER {r['eer']:.3f}  TAR@FAR1e-3 {r['tar_at_far_1e-3']:.3f}  "
                     f"(images {r['images']}, patients {r['patients']}, queries {r['queries']}, "
                     f"gallery {r['gallery_size']})")
    return "\n".join(lines)
