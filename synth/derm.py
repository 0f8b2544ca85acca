"""Dermoscopy (Modality DMS, Dermoscopic Photography Image Storage; or XC VL Photographic).

Identity: a monitored naevus (outline, size, colours, pigment network, dots and globules,
regression area), satellite moles and freckles around it, skin tone, furrow pattern and pores.
Visit: orientation, zoom and centring of the dermoscope, polarised versus immersion contact
(glare, air bubbles), colour calibration, vignetting of round dermoscopes, focus, noise, hairs,
ruler or ink marks, slow growth and darkening of the lesion, new dots.
Skin coordinates in mm, lesion centre at the origin.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from .common import (affine_window, bandpass_field, blob, fourier_coeffs, inverse_affine, pixel_grid, polar_radius,
                     raster_polylines, rng_for, sample_field, sigmoid, smooth_field, soft_inside)
from .dicom_writer import SOP_CLASSES, Instance, code_item, uid
from .plan import VENDORS, series_attrs

EXT = 16.0
BODY_SITES = ["BACK", "CHEST", "ABDOMEN", "ARM", "LEG", "SHOULDER"]


def person_features(d, person) -> dict:
    tone = d.uniform(0, 1)
    skin = np.array([0.95, 0.78, 0.68]) * (1 - tone) + np.array([0.55, 0.37, 0.26]) * tone
    f = {"skin": skin * (1 + 0.03 * d.std(size=3)), "tone": tone,
         "r0": d.uniform(2.2, 4.5), "ecc": d.uniform(0.75, 1.0), "angle": d.uniform(0, math.pi),
         "shape": fourier_coeffs(d, 8, d.uniform(0.03, 0.12), decay=0.8),
         "light": np.array([0.62, 0.42, 0.28]) * (1 + 0.08 * d.std()),
         "dark": np.array([0.30, 0.17, 0.10]) * (1 + 0.15 * d.std()),
         "center_dark": d.uniform(-0.4, 0.6), "net_scale": d.uniform(0.6, 1.2), "net_strength": d.uniform(0.2, 0.6),
         "site": d.choice(BODY_SITES), "hair": d.uniform(0, 1)}
    f["net"] = bandpass_field(d.sub("net"), (160, 160), 1.0, 2.2)
    f["color_field"] = smooth_field(d.sub("colour"), (40, 40), 3.0)
    f["furrow"] = bandpass_field(d.sub("furrow"), (128, 128), 0.8, 3.0)
    f["furrow_angle"] = d.uniform(0, math.pi)
    g = d.sub("dots")
    n_dots = int(g.integers(3, 30))
    f["dots"] = [(g.normal(0, 0.55), g.normal(0, 0.55), g.uniform(0.08, 0.25), g.uniform(0.3, 1.0),
                  int(g.integers(0, 5))) for _ in range(29)][:n_dots]
    regress, has_regress = (d.normal(0, 0.4), d.normal(0, 0.4), d.uniform(0.12, 0.3)), d.chance(0.3)
    f["regress"] = regress if has_regress else None
    g = d.sub("satellites")
    n_sat = int(g.integers(2, 14))
    f["satellites"] = [(g.uniform(-12, 12), g.uniform(-12, 12), g.uniform(0.2, 1.1), g.uniform(0.2, 0.8))
                       for _ in range(13)][:n_sat]
    f["growth"] = d.uniform(0.0, 0.06)
    return f


def visit_params(r, st, vendor, n) -> dict:
    pol = st["protocol"]["polarized"]
    return dict(rot=r.normal(0, 35) * n, fov=(18 + r.uniform(-3, 4) * n), tx=r.normal(0, 1.2) * n,
                ty=r.normal(0, 1.2) * n,
                tint=np.asarray(vendor["tint"]) * (1 + r.normal(0, 0.05, 3) * n), bright=1 + r.uniform(-0.2, 0.15) * n,
                gamma=1 + r.uniform(-0.15, 0.2) * n, blur=r.uniform(0, 1.2) * n, noise=0.008 + r.uniform(0, 0.015) * n,
                vignette=0.15 + r.uniform(0, 0.3) * n, polarized=pol, bubbles=(not pol) and r.random() < 0.6,
                hairs=int(r.integers(0, 25) * r.random()) if r.random() < 0.6 else 0, ink=r.random() < 0.15 * n,
                ruler=r.random() < 0.25, visit=st["visit"], redness=r.uniform(0, 0.1) * n)


def render(f, p, rows, cols, round_scope, r) -> np.ndarray:
    spacing = p["fov"] / min(rows, cols)
    y, x = pixel_grid(rows, cols, spacing)
    by, bx = inverse_affine(y, x, p["rot"], 1.0, p["ty"], p["tx"])
    v = p["visit"]
    fa = f["furrow_angle"]
    fu = sample_field(f["furrow"], math.cos(fa) * by - math.sin(fa) * bx,
                      (math.sin(fa) * by + math.cos(fa) * bx) * 0.35, EXT, EXT, cval=0.0)
    pores = np.abs(sample_field(f["net"], bx * 1.7, by * 1.7, EXT, EXT))
    skin = f["skin"] * (1 - 0.06 * sigmoid(-np.abs(fu) * 4 + 1.5)[..., None] - 0.04 * (pores < 0.05)[..., None])
    skin = skin * (1 - p["redness"]) + p["redness"] * np.array([0.9, 0.35, 0.35])
    img = skin
    img = np.array(img, np.float32)
    for sy, sx, sr, dark in f["satellites"]:
        w = affine_window(by, bx, sy, sx, sr * 1.6)
        if w is not None:
            m = blob(by[w], bx[w], sy, sx, sr, sr * 0.9, edge=0.25)[..., None]
            img[w] = img[w] * (1 - m * dark) + m * dark * f["light"]
    grow = 1 + f["growth"] * v
    r0 = f["r0"] * grow
    ca, sa = math.cos(f["angle"]), math.sin(f["angle"])
    u, w = ca * bx + sa * by, -sa * bx + ca * by
    theta = np.arctan2(w, u * f["ecc"])
    rho = np.hypot(u * f["ecc"], w) / (r0 * polar_radius(theta, f["shape"]))
    les = soft_inside(rho - 1, 0.06)
    cf = sample_field(f["color_field"], by / r0, bx / r0, 2.0, 2.0)
    mix = np.clip(0.5 + 0.35 * cf + f["center_dark"] * (1 - rho) + 0.03 * v, 0, 1)[..., None]
    col = f["light"] * (1 - mix) + f["dark"] * mix
    net = sample_field(f["net"], by * f["net_scale"] / r0 * 4, bx * f["net_scale"] / r0 * 4, EXT, EXT)
    lines = np.exp(-(net / 0.35) ** 2) * f["net_strength"] * sigmoid((1 - rho) * 6)
    col = col * (1 - 0.45 * lines[..., None])
    if f["regress"]:
        gy, gx, gr = f["regress"]
        m = blob(by / r0, bx / r0, gy, gx, gr, gr, edge=0.2)[..., None] * les[..., None]
        col = col * (1 - 0.45 * m) + 0.45 * m * np.array([0.55, 0.6, 0.72])
    col = np.array(col, np.float32)
    for dy, dx, dr, dk, onset in f["dots"]:
        w = affine_window(by, bx, dy * r0, dx * r0, dr * 1.6)
        if onset > v + 2 or w is None:
            continue
        m = blob(by[w], bx[w], dy * r0, dx * r0, dr, dr, edge=0.2)[..., None]
        col[w] = col[w] * (1 - m * dk) + m * dk * np.array([0.12, 0.07, 0.05])
    img = img * (1 - les[..., None]) + col * les[..., None]
    lines_ = []
    for _ in range(p["hairs"]):
        y0, x0, ang, ln = r.uniform(-14, 14), r.uniform(-14, 14), r.uniform(0, math.pi), r.uniform(5, 20)
        t = np.linspace(0, 1, 8)[:, None]
        bend = r.normal(0, 0.8)
        pts = np.hstack([y0 + t * ln * math.sin(ang) + bend * np.sin(t * math.pi), x0 + t * ln * math.cos(ang)])
        lines_.append((pts, r.uniform(0.05, 0.12), 1.0))
    if lines_:
        hair = np.clip(raster_polylines(lines_, (rows, cols), (rows - 1) / 2 * spacing, (cols - 1) / 2 * spacing,
                                        supersample=1, blur=0.4), 0, 1)[..., None]
        img = img * (1 - 0.85 * hair) + 0.85 * hair * np.array([0.12, 0.08, 0.06]) * (1 + f["hair"])
    if p["ink"]:
        iy, ix = r.uniform(-8, 8, 2)
        m = blob(y, x, iy, ix, 1.2, 0.8, edge=0.3)[..., None]
        img = img * (1 - 0.7 * m) + 0.7 * m * np.array([0.35, 0.25, 0.6])
    if p["bubbles"]:
        for _ in range(int(r.integers(1, 6))):
            cy, cx, cr = r.uniform(-9, 9), r.uniform(-9, 9), r.uniform(0.3, 1.5)
            ring = np.exp(-((np.hypot(y - cy, x - cx) - cr) / 0.08) ** 2)
            img = img + 0.35 * ring[..., None]
    if not p["polarized"]:
        glare = np.exp(-((y + 2) ** 2 + (x - 3) ** 2) / 18.0) * 0.12
        img = img + glare[..., None]
    img = img * p["tint"][None, None, :] * p["bright"]
    rn = np.hypot(y, x) / (p["fov"] / 2)
    img = img * (1 - p["vignette"] * rn[..., None] ** 2)
    if round_scope:
        img = img * soft_inside(rn - 1.02, 0.01)[..., None]
    if p["ruler"]:
        tick = (np.abs(((x + 20) / 1.0) % 1 - 0.5) > 0.42) & (y > y.max() - 1.2)
        img = np.where(tick[..., None], 0.05, img)
    if p["blur"] > 0.1:
        img = ndimage.gaussian_filter(img, (p["blur"], p["blur"], 0))
    img = np.clip(img, 0, 1) ** p["gamma"]
    img = img + p["noise"] * r.standard_normal(img.shape, dtype=np.float32)
    return np.clip(img, 0, 1)


def render_studies(cfg, persons, person, draw, studies):
    f = person_features(draw, person)
    for st in studies:
        r = rng_for(cfg.seed, "visit", st["key"])
        vendor = VENDORS["derm"][st["vendor"]]
        p = visit_params(r, st, vendor, cfg.nuisance)
        rows = cfg.derm_size
        cols = rows if vendor["round"] else int(round(rows * 4 / 3 / 2) * 2)
        img = render(f, p, rows, cols, vendor["round"], r)
        pix = np.rint(img * 255).astype(np.uint8)
        specific = [
            ("ImageType", ["ORIGINAL", "PRIMARY"]), ("InstanceNumber", 1), ("PatientOrientation", ""),
            ("AcquisitionDateTime", st["date"] + st["time"]), ("BurnedInAnnotation", "NO"),
            ("LossyImageCompression", "00"), ("ImageLaterality", "U"),
            ("AnatomicRegionSequence", [code_item("39937001", "SCT", "Skin")]),
            ("ImageComments", f"{f['site'].lower()} lesion, {'polarized' if p['polarized'] else 'non-polarized'}"),
        ]
        common = series_attrs(cfg, st, person, 0, "SKIN")
        sop_class = SOP_CLASSES["DMS" if cfg.derm_sop == "dms" else "XC"]
        yield st, 0, Instance(common, sop_class, uid(cfg.seed, "sop", st["key"], 0, 1), specific, pix, "RGB")
