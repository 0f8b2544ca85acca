"""Retinal fundus photographs (Modality OP, Ophthalmic Photography 8 Bit, RGB), both eyes.

Identity (per eye): the retinal vessel tree (arcades, branch points, calibres), optic disc
position, size, shape and cup, fundus pigmentation and choroidal texture, a choroidal nevus
or pigment clumps.  Visit: fixation (macula- or disc-centred field), rotation, zoom,
illumination, colour balance per camera, vignetting, focus, noise, haze, eyelash shadows,
progressing diabetic retinopathy (microaneurysms, haemorrhages, exudates).
Retina coordinates in disc diameters (DD), fovea at the origin, y down, x to the image right.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from .common import (affine_window, blob, inverse_affine, pixel_grid, raster_polylines, rng_for, sample_field,
                     smooth_field, soft_inside)
from .dicom_writer import SOP_CLASSES, Instance, code_item, uid
from .plan import VENDORS, series_attrs

EXT = 6.5


def eye_features(d, eye: int) -> dict:
    """``eye``: +1 right eye (disc to the image right), -1 left eye."""
    f = {"eye": eye, "disc": (-0.2 + 0.15 * d.std(), eye * (2.5 + 0.15 * d.std())),
         "disc_r": (0.5 * (1 + 0.08 * d.std()), 0.46 * (1 + 0.08 * d.std())), "cup": 0.35 + 0.1 * d.std(),
         "pigment": d.uniform(0.6, 1.15), "tessellation": d.uniform(0.0, 0.6),
         "red": 0.82 + 0.06 * d.std()}
    nevus, has_nevus = (d.uniform(-3, 3), d.uniform(-3, 3), d.uniform(0.3, 0.7)), d.chance(0.2)
    f["nevus"] = nevus if has_nevus else None
    dr, has_dr = dict(onset=int(d.integers(0, 4)), rate=d.uniform(0.2, 0.7)), d.chance(0.35)
    f["dr"] = dr if has_dr else None
    f["lines"] = _tree(d.sub("tree"), f)
    g = d.sub("lesions")
    f["lesions"] = [(g.uniform(-3.5, 3.5), g.uniform(-3.5, 3.5), g.uniform(0.04, 0.16), int(g.integers(0, 4)),
                     int(g.integers(0, 3))) for _ in range(40)]
    n_dr = int(g.integers(0, 12))
    f["drusen"] = [(g.normal(0, 0.8), g.normal(0, 0.8), g.uniform(0.03, 0.08)) for _ in range(11)][:n_dr]
    return f


def _tree(d, f) -> list:
    eye = f["eye"]
    dy0, dx0 = f["disc"]
    lines = []

    def grow(p, ang, width, length, kind, depth, arcade):
        seg, pts, travelled = 0.15, [p], 0.0
        next_branch = d.uniform(0.6, 1.4)
        for _ in range(int(length / seg)):
            ang += 0.09 * d.std()
            if arcade:        # temporal arcades bend around the fovea
                rad = math.atan2(p[0], p[1])
                for tangent in (rad + math.pi / 2, rad - math.pi / 2):
                    diff = (tangent - ang + math.pi) % (2 * math.pi) - math.pi
                    if abs(diff) < math.pi / 2:
                        dist = math.hypot(*p)
                        ang += 0.07 * diff * (1.0 if dist < 3.4 else 0.3)
                        break
            p = (p[0] + seg * math.sin(ang), p[1] + seg * math.cos(ang))
            pts.append(p)
            travelled += seg
            if travelled > next_branch and depth < 3 and width > 0.035:
                lines.append((np.array(pts), width, 1.0))
                pts = [p]
                side = 1 if d.uniform() < 0.5 else -1
                grow(p, ang + side * d.uniform(0.5, 1.0), width * 0.68, length * d.uniform(0.35, 0.55),
                     kind, depth + 1, False)
                width *= 0.86
                next_branch = travelled + d.uniform(0.6, 1.4)
        lines.append((np.array(pts), width, 1.0))

    out = {"artery": [], "vein": []}
    for kind, w0, off in (("vein", 0.16, 0.06), ("artery", 0.12, -0.06)):
        lines = []
        for vert in (-1, 1):
            temporal = math.atan2(vert * 1.0, -eye * 0.35)
            nasal = math.atan2(vert * 1.0, eye * 0.9)
            start = (dy0 + vert * 0.1, dx0 + off)
            grow(start, temporal + 0.15 * d.std(), w0, 7.5, kind, 0, True)
            grow(start, nasal + 0.2 * d.std(), w0 * 0.8, 4.0, kind, 1, False)
        out[kind] = lines
    return out


def templates(f, n):
    art = raster_polylines(f["lines"]["artery"], (n, n), EXT, EXT, supersample=2, blur=0.5)
    vein = raster_polylines(f["lines"]["vein"], (n, n), EXT, EXT, supersample=2, blur=0.5)
    return {"artery": np.clip(art, 0, 1), "vein": np.clip(vein, 0, 1)}


def person_features(d, person) -> dict:
    f = {"eyes": [eye_features(d.sub("eye", e), e) for e in (+1, -1)],
         "chor": smooth_field(d.sub("choroid"), (96, 96), 1.5)}
    return f


def render_eye(f, chor, tpl, p, rows, cols, r) -> np.ndarray:
    spacing = p["radius"] * 2 / min(rows, cols)
    y, x = pixel_grid(rows, cols, spacing)
    by, bx = inverse_affine(y, x, p["rot"], 1.0, 0.0, 0.0)
    by, bx = by + p["cy"], bx + p["cx"]
    eye = f["eye"]
    tex = sample_field(chor, by, bx * eye, EXT, EXT)
    tess = f["tessellation"] * np.abs(np.sin(3 * tex))
    base = np.stack([f["red"] * f["pigment"] * (1 + 0.08 * tex - 0.15 * tess),
                     0.36 * f["pigment"] * (1 + 0.05 * tex), 0.16 * f["pigment"] * (1 + 0.1 * tess)], -1)
    rf = np.hypot(by, bx)
    base *= (1 - 0.45 * np.exp(-(rf / 0.9) ** 2))[..., None]
    base += 0.25 * np.exp(-(rf / 0.06) ** 2)[..., None] * np.array([1.0, 1.0, 0.9])
    dy, dx = f["disc"]
    ry, rx = f["disc_r"]
    disc = blob(by, bx, dy, dx, ry * 1.1, rx, edge=0.06)
    cup = blob(by, bx, dy, dx + 0.05 * eye, ry * f["cup"] * 1.1, rx * f["cup"], edge=0.15)
    disc_col = np.array([0.95, 0.72, 0.45]) + 0.05 * cup[..., None]
    inside = disc_col * (1 - cup[..., None]) + cup[..., None] * np.array([1.0, 0.9, 0.72])
    img = base * (1 - disc[..., None]) + disc[..., None] * inside
    if f["nevus"]:
        ny, nx, nr = f["nevus"]
        img *= (1 - 0.35 * blob(by, bx, ny, nx * eye, nr, nr * 1.3, edge=0.2))[..., None]
    img = np.asarray(img, np.float32)
    for dyy, dxx, dr in f["drusen"]:
        w = affine_window(by, bx, dyy, dxx * eye, dr * 1.8)
        if w is not None:
            img[w] += 0.25 * blob(by[w], bx[w], dyy, dxx * eye, dr, dr, edge=0.3)[..., None] * np.array([1.0, 0.9, 0.4])
    if f["dr"] is not None:
        sev = max(0, p["visit"] - f["dr"]["onset"] + 1) * f["dr"]["rate"]
        for ly, lx, lr, kind, stage in f["lesions"]:
            if stage + 1 > sev * 3:
                continue
            w = affine_window(by, bx, ly, lx * eye, lr * 3.0)
            if w is None:
                continue
            m = blob(by[w], bx[w], ly, lx * eye, lr * (2.0 if kind == 1 else 1.0), lr, edge=0.2)[..., None]
            col = np.array([1.0, 0.9, 0.45]) if kind == 3 else np.array([0.35, 0.04, 0.03])
            img[w] = img[w] * (1 - m) + m * col
    vein = sample_field(tpl["vein"], by, bx, EXT, EXT)[..., None]
    art = sample_field(tpl["artery"], by, bx, EXT, EXT)[..., None]
    img = img * (1 - 0.85 * vein) + 0.85 * vein * np.array([0.42, 0.06, 0.05])
    img = img * (1 - 0.75 * art) + 0.75 * art * np.array([0.78, 0.16, 0.08])
    img *= np.asarray(p["tint"])[None, None, :]
    rr = np.hypot(y, x) / p["radius"]
    slope = (np.cos(p["grad_dir"]) * x + np.sin(p["grad_dir"]) * y) / p["radius"]
    ill = p["bright"] * (1 - p["vignette"] * rr ** 2) * (1 + p["grad"] * slope)
    img = img * ill[..., None] + p["haze"] * np.array([0.5, 0.45, 0.5])
    if p["lash"]:
        img *= (1 - 0.5 * soft_inside(y / p["radius"] + 0.75 + 0.1 * np.sin(x * 2), 0.05))[..., None]
    if p["blur"] > 0.1:
        img = ndimage.gaussian_filter(img, (p["blur"], p["blur"], 0))
    img = np.clip(img, 0, 1) ** p["gamma"]
    img = img + p["noise"] * r.standard_normal(img.shape, dtype=np.float32)
    mask = soft_inside(rr - 1, 0.01)
    return np.clip(img * mask[..., None], 0, 1)


def visit_params(r, st, vendor, n) -> dict:
    field = st["protocol"]["field"]
    return dict(rot=r.normal(0, 6) * n, radius=vendor["fov"] / 45 * 3.6 * (1 + r.uniform(-0.06, 0.06) * n),
                field=field, jit=(r.normal(0, 0.35) * n, r.normal(0, 0.35) * n),
                tint=tuple(np.asarray(vendor["tint"]) / vendor["tint"][0] * (1 + r.normal(0, 0.06, 3) * n)),
                bright=1.0 + r.uniform(-0.3, 0.2) * n, vignette=0.25 + r.uniform(0, 0.35) * n,
                grad=r.uniform(0, 0.35) * n, grad_dir=r.uniform(0, 2 * math.pi), haze=r.uniform(0, 0.12) * n,
                lash=r.random() < 0.2 * n, blur=r.uniform(0, 1.3) * n, gamma=1 + r.uniform(-0.2, 0.25) * n,
                noise=0.01 + r.uniform(0, 0.02) * n, visit=st["visit"])


def render_studies(cfg, persons, person, draw, studies):
    f = person_features(draw, person)
    n_t = int(min(900, max(300, cfg.fundus_size * 2)))
    tpls = [templates(e, n_t) for e in f["eyes"]]
    for st in studies:
        r = rng_for(cfg.seed, "visit", st["key"])
        vendor = VENDORS["fundus"][st["vendor"]]
        rows = cfg.fundus_size
        cols = int(round(rows * (1.0 if st["vendor"] != 1 else 1.3) / 2) * 2)
        common = series_attrs(cfg, st, person, 0, "EYE")
        for k, (lat, e, tpl) in enumerate(zip("RL", f["eyes"], tpls)):
            p = visit_params(r, st, vendor, cfg.nuisance)
            if p["field"] == "macula":
                p["cy"], p["cx"] = 0.0 + p["jit"][0], 0.6 * e["eye"] + p["jit"][1]
            else:
                p["cy"], p["cx"] = e["disc"][0] + p["jit"][0], e["disc"][1] - 0.4 * e["eye"] + p["jit"][1]
            img = render_eye(e, f["chor"], tpl, p, rows, cols, r)
            pix = np.rint(img * 255).astype(np.uint8)
            specific = [
                ("ImageType", ["ORIGINAL", "PRIMARY"]), ("InstanceNumber", k + 1),
                ("ImageLaterality", lat), ("PatientOrientation", ["L", "F"] if lat == "R" else ["R", "F"]),
                ("AcquisitionDateTime", st["date"] + st["time"]), ("BurnedInAnnotation", "NO"),
                ("LossyImageCompression", "00"), ("PatientEyeMovementCommanded", "NO"),
                ("HorizontalFieldOfView", float(vendor["fov"])), ("PupilDilated", "YES"),
                ("AnatomicRegionSequence", [code_item("5665001", "SCT", "Retina")]),
                ("AcquisitionDeviceTypeCodeSequence", [code_item("409898007", "SCT", "Fundus Camera")]),
                ("RefractiveStateSequence", []),
            ]
            yield st, 0, Instance(common, SOP_CLASSES["OP"], uid(cfg.seed, "sop", st["key"], 0, k + 1),
                                  specific, pix, "RGB")
