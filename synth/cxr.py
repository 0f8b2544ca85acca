"""Chest radiographs (CR / DX, MONOCHROME1 and MONOCHROME2, PA standing and AP portable).

Identity: body habitus, lung and diaphragm outlines, heart shape, clavicles, every rib's
course and thickness, vertebrae, the pulmonary vessel tree and calcified granulomas.
Visit: projection (PA/AP with heart magnification and scapulae over the lungs), pose,
magnification, inspiration, axial rotation, collimation, exposure and processing, noise,
slowly progressing disease, devices (pacemaker, sternotomy wires, tubes, lines, ECG leads).
Coordinates are in cm; y down, x toward the image right (the patient's left on a PA film).
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from .common import (blob, fourier_coeffs, inverse_affine, pixel_grid, polar_radius, raster_polylines, rng_for,
                     sample_field, sigmoid, soft_inside)
from .dicom_writer import SOP_CLASSES, Instance, code_item, dicom_window, uid
from .plan import VENDORS, series_attrs

EXT = 25.0   # person templates cover [-EXT, EXT] cm in y and x


def person_features(d, person) -> dict:
    s = float(np.clip(d.normal(1.0, 0.05), 0.88, 1.12)) * (1.03 if person.sex == "M" else 0.96)
    f = {"s": s, "torso_w": 16.5 * s * (1 + 0.06 * d.std()), "depth": 20 * s * (1 + 0.1 * d.std()),
         "neck_w": 5.5 * s * (1 + 0.08 * d.std()), "shoulder_y": -15.5 * s + 0.6 * d.std(),
         "apex_y": -13.5 * s + 0.5 * d.std(), "lung_h": 24 * s * (1 + 0.05 * d.std())}
    f["lungs"] = []
    for side in (-1, 1):               # -1: right lung (image left), +1: left lung
        rx = 6.8 * s * (1 + 0.06 * d.std())
        ry = f["lung_h"] * 0.56 * (1 + 0.03 * d.std())
        f["lungs"].append(dict(
            side=side, cx=side * 7.4 * s * (1 + 0.05 * d.std()), cy=f["apex_y"] + ry, rx=rx, ry=ry,
            coeffs=fourier_coeffs(d, 6, 0.05), taper=0.35 + 0.06 * d.std(),
            dome=f["apex_y"] + f["lung_h"] + (1.3 if side > 0 else 0.0) + 0.6 * d.std(),
            dome_dx=side * (1.0 + 0.8 * d.std()), dome_k=0.035 * (1 + 0.25 * d.std())))
    f["heart"] = dict(cx=2.0 * s + 0.6 * d.std(), cy=f["lungs"][1]["dome"] - 2.8 * s + 0.5 * d.std(),
                      rx=6.6 * s * (1 + 0.08 * d.std()), ry=5.0 * s * (1 + 0.08 * d.std()),
                      angle=math.radians(-20 + 6 * d.std()), coeffs=fourier_coeffs(d, 5, 0.06))
    f["med_w"] = 3.0 * s * (1 + 0.1 * d.std())
    f["knob"] = (f["apex_y"] + 8.0 + 0.6 * d.std(), f["med_w"] - 0.2 + 0.3 * d.std(), 1.3 * (1 + 0.15 * d.std()))
    f["trachea"] = (0.3 * d.std(), 1.7 * (1 + 0.1 * d.std()), f["apex_y"] + 10.0 + 0.5 * d.std())
    f["breast"] = 5.5 * (1 + 0.15 * d.std()) if person.sex == "F" else 0.0
    f["clav"] = [dict(side=sd, y_med=f["apex_y"] + 1.2 + 0.4 * d.std(), rise=2.4 + 0.7 * d.std(),
                      length=14.5 * s * (1 + 0.05 * d.std()), bow=0.8 + 0.3 * d.std(),
                      h=1.3 * (1 + 0.1 * d.std())) for sd in (-1, 1)]
    spacing = 2.25 * s * (1 + 0.05 * d.std())
    f["ribs"] = []
    for side in (-1, 1):
        for k in range(10):
            y0 = f["apex_y"] + 0.3 + k * spacing + 0.25 * d.std()
            width = 13.5 * s * (0.5 + 0.5 * math.sqrt(min(1.0, (k + 0.6) / 5.0))) * (1 + 0.04 * d.std())
            f["ribs"].append(dict(side=side, y0=y0, a=2.4 + 0.4 * d.std(), b=4.5 + 0.8 * d.std(),
                                  h=1.3 * (1 + 0.12 * d.std()), W=width,
                                  drop=4.5 + 0.9 * d.std(), xmed=3.2 + 0.6 * d.std(),
                                  dens=1.0 + 0.12 * d.std()))
    f["spine"] = dict(hv=2.5 * s * (1 + 0.05 * d.std()), a1=0.5 * d.std(), a2=0.3 * d.std(),
                      y_off=d.uniform(0, 1), widths=1 + 0.06 * d.std(size=24))
    has_callus, callus = d.chance(0.25), int(d.integers(0, 20))
    f["callus"] = callus if has_callus else None
    g = d.sub("granulomas")
    n_gran = int(g.integers(0, 4))
    f["granulomas"] = [(f["apex_y"] + g.uniform(3, 20), g.choice([-1, 1]) * g.uniform(3, 11),
                        g.uniform(0.15, 0.4)) for _ in range(3)][:n_gran]
    f["hila"] = [(f["apex_y"] + 11.0 * s + 0.6 * d.std(), side * (4.3 * s + 0.4 * d.std()))
                 for side in (-1, 1)]
    f["tree_seed"] = d.sub("vessels")
    f["disease"] = dict(kind=d.choice(["none", "none", "none", "effusion", "consolidation",
                                       "cardiomegaly", "nodule", "fibrosis"]),
                        onset=int(d.integers(0, 3)), side=d.choice([-1, 1]),
                        loc=(d.uniform(-0.3, 0.5), d.uniform(0.3, 0.8)), rate=d.uniform(0.3, 0.8))
    pm, pm_at, st, st_at = d.chance(0.12), int(d.integers(0, 4)), d.chance(0.08), int(d.integers(0, 3))
    f["pacemaker_from"] = pm_at if pm else None
    f["sternotomy_from"] = st_at if st else None
    return f


def _vessel_tree(d, hila, s) -> list:
    lines = []

    def grow(p, ang, length, width, depth):
        pts = [p]
        for _ in range(4):
            ang += 0.12 * d.std()
            p = (p[0] + length / 4 * math.sin(ang), p[1] + length / 4 * math.cos(ang))
            pts.append(p)
        lines.append((np.array(pts), width, 1.0))
        if depth > 0:
            for sgn in (-1, 1):
                grow(p, ang + sgn * d.uniform(0.25, 0.6), length * d.uniform(0.6, 0.8),
                     width * 0.66, depth - 1)

    for (hy, hx), side in zip(hila, (-1, 1)):
        for base in (-1.9, -1.0, -0.2, 0.6, 1.4):     # radians from "lateral", y down
            ang = (math.pi - base if side < 0 else base) if abs(base) < 1.7 else (-math.pi / 2 - 0.3 * side)
            grow((hy, hx), ang + 0.15 * d.std(), 3.5 * s * d.uniform(0.8, 1.2), 0.8, 4)
    return lines


def templates(f, n: int) -> dict:
    """Static person layers in body coordinates: bones (ribs, callus, granulomas), spine, vessels."""
    sp = 2 * EXT / (n - 1)
    y, x = pixel_grid(n, n, sp)
    ycol, xrow = y[:, 0], x[0, :]
    bones = np.zeros((n, n), np.float32)
    for i, r in enumerate(f["ribs"]):
        side = r["side"]
        u = side * xrow
        for part in ("post", "ant"):
            if part == "post":
                t = (u - 1.6) / r["W"]
                yc = r["y0"] - r["a"] * np.sin(1.9 * np.clip(t, 0, 1)) + r["b"] * t ** 4
                slope = (-1.9 * r["a"] * np.cos(1.9 * np.clip(t, 0, 1)) + 4 * r["b"] * t ** 3) / r["W"]
                lo, hi, dens = r["y0"] - r["a"] - 2, r["y0"] + r["b"] + 2, r["dens"]
                valid = sigmoid(t / 0.02) * sigmoid((1.02 - t) / 0.02)
            else:
                uL, yL = 1.6 + r["W"], r["y0"] - r["a"] * math.sin(1.9) + r["b"]
                sdist = np.clip((uL - u) / (uL - r["xmed"]), 0, None)
                yc = yL + r["drop"] * (1 - np.clip(1 - sdist, 0, 1) ** 1.6)
                slope = r["drop"] * 1.6 * np.clip(1 - sdist, 0, 1) ** 0.6 / (uL - r["xmed"])
                lo, hi, dens = yL - 2, yL + r["drop"] + 2, 0.55 * r["dens"]
                valid = sigmoid(sdist / 0.02) * sigmoid((1.0 - sdist) / 0.03)
            r0, r1 = np.searchsorted(ycol, [lo, hi])
            if r1 <= r0:
                continue
            dist = np.abs(ycol[r0:r1, None] - yc[None, :]) / np.sqrt(1 + slope ** 2)[None, :]
            band = soft_inside(dist - r["h"] / 2, 0.1) * 0.6 + 0.5 * np.exp(-((dist - r["h"] / 2) / 0.13) ** 2)
            bones[r0:r1] = np.maximum(bones[r0:r1], dens * band * valid[None, :])
            if part == "post" and f["callus"] == i:
                cy, cx = float(np.interp(0.6, t[::side], yc[::side])), side * (1.6 + 0.6 * r["W"])
                bones = np.maximum(bones, 1.3 * blob(y, x, cy, cx, r["h"] * 0.9, 1.0, edge=0.08))
    for gy, gx, gr in f["granulomas"]:
        bones = np.maximum(bones, 2.5 * blob(y, x, gy, gx, gr, gr, edge=0.08))
    sp_ = f["spine"]
    scol = sp_["a1"] * np.sin(np.pi * (y + EXT) / (2 * EXT)) + sp_["a2"] * np.sin(2 * np.pi * (y + EXT) / (2 * EXT))
    q = (y + EXT) / sp_["hv"] + sp_["y_off"]
    k = np.clip(np.floor(q).astype(int), 0, len(sp_["widths"]) - 1)
    frac = q - np.floor(q)
    w = 2.0 * sp_["widths"][k] * (1 + 0.012 * k)
    dx = x - scol
    body = soft_inside(np.abs(frac - 0.5) - 0.38, 0.04) * soft_inside(np.abs(dx) - w, 0.15)
    ped = np.exp(-(((np.abs(dx) - 0.75 * w) / 0.35) ** 2 + ((frac - 0.35) / 0.15) ** 2))
    spin = np.exp(-((dx / 0.35) ** 2 + ((frac - 0.65) / 0.22) ** 2))
    spine = body * 0.8 + 0.6 * ped + 0.4 * spin
    vessels = raster_polylines(_vessel_tree(f["tree_seed"], f["hila"], f["s"]), (n, n), EXT, EXT,
                               supersample=1, blur=1.3)
    return {"bones": bones, "spine": spine.astype(np.float32), "vessels": vessels}


def visit_params(r, f, study, n: float) -> dict:
    ap = study["protocol"]["view"] == "AP"
    v = study["visit"]
    dis = f["disease"]
    sev = float(np.clip((v - dis["onset"] + 1) * dis["rate"], 0, 1)) if dis["kind"] != "none" else 0.0
    return dict(
        rot=r.normal(0, 6 if ap else 3) * n, mag=(1.07 if ap else 1.0) + r.uniform(-0.07, 0.07) * n,
        ty=(r.normal(0, 2.0) + (1.0 if ap else 0.0)) * n, tx=r.normal(0, 1.5) * n,
        insp=1 + (r.uniform(-0.12, -0.03) if ap else r.uniform(-0.05, 0.04)) * n,
        axial=r.normal(0, 1.2 if ap else 0.6) * n, heart_mag=1.12 if ap else 1.0,
        clav_lift=(-r.uniform(0.5, 2.5) if ap else 0.0) * n, scap_in=ap,
        center=0.5 + r.normal(0, 0.05) * n, width=0.2 * (1 + r.uniform(-0.3, 0.3) * n),
        gamma=1 + r.normal(0, 0.1) * n, noise=0.008 + r.uniform(0, 0.02 if ap else 0.012) * n,
        blur=r.uniform(0, 1.0) * n, edge=1 + r.normal(0, 0.25) * n,
        coll=[r.uniform(0, 3.5) * n for _ in range(4)], arms=r.uniform(2.0, 6.0),
        sev=sev, ett=ap and r.random() < 0.4, cvc=ap and r.random() < 0.5,
        ng=ap and r.random() < 0.3, ecg=r.random() < (0.6 if ap else 0.1) * min(1.0, n),
        marker=r.random() < 0.8, marker_corner=int(r.integers(0, 4)) if n > 0 else 0,
        landscape=ap and r.random() < 0.3)


def render(f, tpl, p, rows, cols, spacing, r) -> np.ndarray:
    """Float image in [0, 1], bright = dense (MONOCHROME2 sense)."""
    y, x = pixel_grid(rows, cols, spacing)
    by, bx = inverse_affine(y, x, p["rot"], p["mag"], p["ty"], p["tx"], p["insp"])
    s = f["s"]
    bw = f["neck_w"] + (f["torso_w"] - f["neck_w"]) * sigmoid((by - f["shoulder_y"]) / 1.5)
    T = f["depth"] * np.sqrt(np.clip(1 - (bx / bw) ** 2, 0, 1))
    arm = soft_inside(np.abs(np.abs(bx) - (f["torso_w"] + p["arms"] + 2.5)) - 2.5, 0.6)
    T = T + 9 * arm * sigmoid((by - f["shoulder_y"] - 1) / 1.0)
    ax = p["axial"]
    lung = np.zeros_like(by)
    sev, dis = p["sev"], f["disease"]
    for L in f["lungs"]:
        rx = L["rx"] * (1 + L["side"] * ax / 25)
        dy, dx = by - L["cy"], bx - (L["cx"] + 0.3 * ax)
        rxe = rx * (1 - L["taper"] * np.clip(-dy / L["ry"], 0, 1) ** 2)
        rho = (np.abs(dx / rxe) ** 2.4 + np.abs(dy / L["ry"]) ** 2.4) ** (1 / 2.4)
        m = soft_inside(rho - polar_radius(np.arctan2(dy / L["ry"], dx / rxe), L["coeffs"]), 0.02)
        dome = L["dome"] + L["dome_k"] * (bx - L["cx"] - L["dome_dx"]) ** 2
        if dis["kind"] == "effusion" and dis["side"] == L["side"]:
            dome = np.minimum(dome, L["dome"] + 3.5 - 7 * sev + 0.25 * np.abs(bx - L["cx"]))
        m = m * soft_inside(by - dome, 0.15) * (0.65 + 0.35 * np.sqrt(np.clip(1 - rho ** 2, 0, 1)))
        lung = np.maximum(lung, m)
    h = f["heart"]
    hm = p["heart_mag"] * (1 + (0.25 * sev if dis["kind"] == "cardiomegaly" else 0.0))
    heart = blob(by, bx, h["cy"], h["cx"] + 0.6 * ax, h["ry"] * hm, h["rx"] * hm, h["coeffs"], 0.03, h["angle"])
    ky, kx, kr = f["knob"]
    dome_lo = max(L["dome"] for L in f["lungs"])
    med = np.maximum(soft_inside(np.abs(bx - ax) - f["med_w"] * (0.8 + 0.3 * sigmoid((by - ky) / 2)), 0.3)
                     * soft_inside(by - dome_lo, 0.5), blob(by, bx, ky, kx + ax, kr, kr, edge=0.05))
    med = np.maximum(med, heart)
    t0, tw, carina = f["trachea"]
    trach = soft_inside(np.abs(bx - t0 - ax) - tw / 2, 0.12) * soft_inside(by - carina, 0.3)
    A = T - 12.5 * lung * (1 - 0.85 * med) - 2.0 * trach
    A += 3.4 * sample_field(tpl["bones"], by, bx, EXT, EXT)
    A += 2.2 * (1 - 0.6 * med) * sample_field(tpl["spine"], by, bx + 0.5 * ax, EXT, EXT)
    A += 2.4 * lung * sample_field(tpl["vessels"], by, bx, EXT, EXT)
    for c in f["clav"]:
        u = c["side"] * bx
        t = (u - 1.5) / c["length"]
        yc = c["y_med"] + p["clav_lift"] - c["rise"] * t + c["bow"] * np.sin(2 * np.pi * t) * 0.5
        dist = np.abs(by - yc)
        A += 3.2 * soft_inside(dist - c["h"] / 2, 0.12) * sigmoid(t / 0.02) * sigmoid((1 - t) / 0.03)
    scap_x = (f["torso_w"] - (4.0 if p["scap_in"] else 1.0)) * s
    for side in (-1, 1):
        A += 1.6 * blob(by, bx, f["apex_y"] + 6, side * scap_x, 6.5, 3.2, edge=0.08, angle=0.35 * side)
        A += 4.0 * blob(by, bx, f["shoulder_y"] - 1, side * (f["torso_w"] + 1.5), 2.6, 2.6, edge=0.05)
    if f["breast"]:
        for side in (-1, 1):
            A += 3.0 * blob(by, bx, f["lungs"][0]["dome"] - 2, side * 9.5 * s, f["breast"], f["breast"] * 1.2,
                            edge=0.25)
    if dis["kind"] in ("consolidation", "fibrosis", "nodule") and sev > 0:
        L = f["lungs"][0 if dis["side"] < 0 else 1]
        cy, cx = L["cy"] + dis["loc"][0] * L["ry"], L["cx"] + dis["loc"][1] * L["rx"] * 0.6 * L["side"]
        if dis["kind"] == "nodule":
            A += 4 * blob(by, bx, cy, cx, 0.4 + 1.2 * sev, 0.4 + 1.2 * sev, edge=0.1)
        elif dis["kind"] == "consolidation":
            A += 7 * sev * lung * blob(by, bx, cy, cx, 3 + 3 * sev, 3 + 2 * sev, edge=0.35)
        else:
            ret = np.abs(np.sin(2.2 * bx) * np.sin(2.0 * by))
            A += 3 * sev * lung * ret * sigmoid((by - f["apex_y"] - 14) / 2)
    V = A / 28.0
    lines = _devices(f, p, r, by.shape)
    img = sigmoid((V - p["center"]) / p["width"])
    if lines:
        dev = raster_polylines([(_forward(pts, p), w, val) for pts, w, val in lines], (rows, cols),
                               (rows - 1) / 2 * spacing, (cols - 1) / 2 * spacing, supersample=2, blur=0.5)
        img = np.maximum(img, np.clip(dev, 0, 1))
    low = ndimage.gaussian_filter(img, 0.05 * rows)
    img = img + 0.6 * p["edge"] * (img - low)
    if p["blur"] > 0.05:
        img = ndimage.gaussian_filter(img, p["blur"])
    img = img + p["noise"] * r.standard_normal(img.shape, dtype=np.float32)
    img = np.clip(img, 0, 1) ** max(0.4, p["gamma"])
    c = p["coll"]
    inside = ((y > y.min() + c[0]) & (y < y.max() - c[1]) & (x > x.min() + c[2]) & (x < x.max() - c[3]))
    img = np.where(inside, img, 0.96)
    if p["marker"]:
        _marker(img, "L" if p["marker_corner"] % 2 else "R", p["marker_corner"])
    return img.astype(np.float32)


def _forward(pts, p):
    a = math.radians(p["rot"])
    c, s = math.cos(a), math.sin(a)
    by, bx = pts[:, 0] * p["insp"], pts[:, 1]
    return np.stack([p["mag"] * (c * by + s * bx) + p["ty"], p["mag"] * (-s * by + c * bx) + p["tx"]], 1)


def _devices(f, p, r, shape) -> list:
    lines, v = [], p.get("visit", 0)
    h = f["heart"]
    if f["pacemaker_from"] is not None and v >= f["pacemaker_from"]:
        gy, gx = f["apex_y"] + 3.5, 7.5 * f["s"]
        lines.append((np.array([[gy, gx - 1.8], [gy, gx + 1.8]]), 3.8, 1.0))
        lead = np.array([[gy, gx - 1.5], [gy - 1.0, 3.0], [f["apex_y"] + 5, 0.5], [h["cy"] - 2, -0.5],
                         [h["cy"] + 2, h["cx"] + 1.5]])
        lines.append((lead, 0.25, 1.0))
    if f["sternotomy_from"] is not None and v >= f["sternotomy_from"]:
        for k in range(6):
            yy = f["apex_y"] + 7 + 1.8 * k
            ring = [[yy + 0.45 * math.sin(t), 0.5 * math.cos(t)] for t in np.linspace(0, 2 * math.pi, 9)]
            lines.append((np.array(ring), 0.22, 1.0))
    if p["ett"]:
        lines.append((np.array([[-30, f["trachea"][0]], [f["trachea"][2] - 3, f["trachea"][0]]]), 0.35, 0.85))
    if p["ng"]:
        lines.append((np.array([[-30, 0.8], [0, 1.2], [f["lungs"][1]["dome"] + 4, 4.0]]), 0.3, 0.8))
    if p["cvc"]:
        lines.append((np.array([[f["apex_y"] - 3, -6.5], [f["apex_y"] + 1, -3.5], [f["apex_y"] + 7, -1.2]]), 0.25, 0.9))
    if p["ecg"]:
        for k in range(3):
            cy, cx = f["apex_y"] + 2 + 7 * k + r.normal(0, 1), (-1) ** k * r.uniform(6, 12)
            ring = [[cy + 0.7 * math.sin(t), cx + 0.7 * math.cos(t)] for t in np.linspace(0, 2 * math.pi, 13)]
            lines.append((np.array(ring), 0.25, 0.9))
            lines.append((np.array([[cy, cx], [cy - 4, cx + 3 * np.sign(cx)], [-30, cx * 1.5]]), 0.12, 0.6))
    return lines


def _marker(img, letter, corner):
    rows, cols = img.shape
    size = max(12, rows // 14)
    tile = Image.new("L", (12, 12), 0)
    ImageDraw.Draw(tile).text((3, 0), letter, fill=255)
    t = np.asarray(tile.resize((size, size), Image.NEAREST), np.float32) / 255
    r0 = rows // 20 if corner < 2 else rows - rows // 20 - size
    c0 = cols // 20 if corner % 2 == 0 else cols - cols // 20 - size
    img[r0:r0 + size, c0:c0 + size] = np.maximum(img[r0:r0 + size, c0:c0 + size], t)


def render_studies(cfg, persons, person, draw, studies):
    """Yield (study, series_index, Instance) for each chest radiograph."""
    f = person_features(draw, person)
    tpl = templates(f, int(min(640, max(200, cfg.cxr_size * 1.4))))
    for st in studies:
        r = rng_for(cfg.seed, "visit", st["key"])
        vendor = VENDORS["cxr"][st["vendor"]]
        p = visit_params(r, f, st, cfg.nuisance)
        p["visit"] = st["visit"]
        rows = cfg.cxr_size
        aspect = 1.0 if vendor["modality"] == "DX" and not vendor["portable"] else 35 / 43
        if p["landscape"]:
            aspect = 43 / 35
        cols = int(round(rows * aspect / 2) * 2)
        spacing = (35.0 if p["landscape"] else 43.0) / rows
        img = render(f, tpl, p, rows, cols, spacing, r)
        maxv = 2 ** vendor["bits"] - 1
        pix = np.clip(np.rint(img * maxv), 0, maxv).astype(np.uint16)
        mono1 = vendor["photometric"] == "MONOCHROME1"
        if mono1:
            pix = (maxv - pix).astype(np.uint16)
        wc, ww = dicom_window(0.1 * maxv, 0.95 * maxv)
        view = st["protocol"]["view"]
        ps = f"{spacing * 10:.4f}"
        specific = [
            ("ImageType", ["ORIGINAL", "PRIMARY"]), ("InstanceNumber", 1),
            ("PatientOrientation", ["L", "F"]),
            ("ViewPosition", view), ("ImagerPixelSpacing", [ps, ps]),
            ("PixelSpacing", [ps, ps]), ("KVP", f"{int(r.integers(85, 125))}"),
            ("DistanceSourceToDetector", "1000" if view == "AP" else "1800"),
            ("ExposureTime", str(int(r.integers(4, 20)))),
            ("WindowCenter", wc), ("WindowWidth", ww), ("RescaleIntercept", "0"),
            ("RescaleSlope", "1"), ("RescaleType", "US"),
            ("PresentationLUTShape", "INVERSE" if mono1 else "IDENTITY"),
            ("BurnedInAnnotation", "NO"), ("LossyImageCompression", "00"),
        ]
        if vendor["modality"] == "DX":
            specific += [("PresentationIntentType", "FOR PRESENTATION"), ("DetectorType", "SCINTILLATOR"),
                         ("PixelIntensityRelationship", "LOG"), ("PixelIntensityRelationshipSign", 1 if mono1 else -1),
                         ("ImageLaterality", "U"), ("AnatomicRegionSequence", [code_item("816094009", "SCT", "Chest")])]
        common = series_attrs(cfg, st, person, 0, "CHEST")
        yield st, 0, Instance(common, SOP_CLASSES[vendor["modality"]], uid(cfg.seed, "sop", st["key"], 0, 1),
                              specific, pix, vendor["photometric"], vendor["bits"])
