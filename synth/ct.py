"""Chest CT: a 3D series of axial slices in Hounsfield units.

Identity: body outline and fat distribution, rib cage and the oblique course of the ribs,
vertebrae, sternum, heart and great vessels, airway, diaphragm domes, the pulmonary vessel
network and calcified granulomas.  Visit: table height and patient position, in-plane
rotation, field of view and pixel spacing, scan range and slice thickness, inspiration,
arms up or down, contrast phase, reconstruction kernel and dose (noise), progressing
disease (ground glass, effusion, nodule), devices (port catheter, pacemaker, ECG pads).
Patient coordinates in cm (DICOM LPS): x to the patient's left, y posterior, z superior.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from .common import fourier_coeffs, polar_radius, rng_for, sample_field3, smooth_field
from .dicom_writer import SOP_CLASSES, Instance, uid
from .plan import VENDORS, series_attrs

FEXT = (22.0, 18.0, 24.0)       # person field half extents (z, y, x) in cm, z centred at -8
ZC = -8.0


def person_features(d, person) -> dict:
    s = float(np.clip(d.normal(1.0, 0.05), 0.88, 1.12)) * (1.03 if person.sex == "M" else 0.96)
    f = {"s": s, "a": 16.0 * s * (1 + 0.07 * d.std()), "b": 11.0 * s * (1 + 0.09 * d.std()),
         "fat": max(0.4, 2.0 + 0.9 * d.std()), "outline": fourier_coeffs(d, 6, 0.03),
         "cage": 0.86 + 0.02 * d.std(), "rib_sp": 2.3 * s * (1 + 0.05 * d.std()),
         "rib_slope": 0.55 + 0.08 * d.std(), "rib_phase": d.uniform(0, 1),
         "rib_w": 0.9 * (1 + 0.1 * d.std()), "apex": 6.5 * s + 0.6 * d.std(),
         "dome_r": -13.0 * s + 0.8 * d.std(), "dome_l": -15.0 * s + 0.8 * d.std(),
         "heart": (-8.5 + 0.8 * d.std(), -3.0 + 0.5 * d.std(), 2.0 + 0.6 * d.std(),
                   5.3 * s * (1 + 0.08 * d.std()), 5.0 * s * (1 + 0.08 * d.std()),
                   6.2 * s * (1 + 0.08 * d.std()), 0.5 + 0.15 * d.std()),
         "aorta_r": 1.5 * (1 + 0.12 * d.std()), "arch_z": 3.0 + 0.7 * d.std(),
         "desc_x": 2.2 + 0.4 * d.std(), "vert_r": 1.8 * s * (1 + 0.06 * d.std()),
         "vert_h": 2.5 * s * (1 + 0.04 * d.std()), "vert_phase": d.uniform(0, 1),
         "spine_y": 5.5 * s + 0.5 * d.std(), "carina": 0.4 * d.std(), "trachea_r": 0.9 * (1 + 0.1 * d.std()),
         "breast": 4.5 * (1 + 0.2 * d.std()) if person.sex == "F" else 0.0,
         "lung_coeffs": [fourier_coeffs(d, 5, 0.04) for _ in range(2)]}
    f["vessel_fields"] = [smooth_field(d.sub("vessels", k), (40, 34, 44), 1.6) for k in range(2)]
    g = d.sub("granulomas")
    n_gran = int(g.integers(0, 4))
    f["granulomas"] = [(g.uniform(-20, 4), g.uniform(-4, 7), g.choice([-1, 1]) * g.uniform(4, 11),
                        g.uniform(0.2, 0.45)) for _ in range(3)][:n_gran]
    f["disease"] = dict(kind=d.choice(["none", "none", "ggo", "effusion", "nodule", "emphysema"]),
                        onset=int(d.integers(0, 3)), side=d.choice([-1, 1]), rate=d.uniform(0.3, 0.8),
                        loc=(d.uniform(-16, 2), d.uniform(-3, 4), d.uniform(5, 10)))
    port, port_at, pacer, pacer_at = d.chance(0.1), int(d.integers(0, 3)), d.chance(0.08), int(d.integers(0, 4))
    f["port_from"] = port_at if port else None
    f["pacer_from"] = pacer_at if pacer else None
    return f


def visit_params(r, f, st, n) -> dict:
    v = st["visit"]
    dis = f["disease"]
    sev = float(np.clip((v - dis["onset"] + 1) * dis["rate"], 0, 1)) if dis["kind"] != "none" else 0.0
    return dict(rot=r.normal(0, 3) * n, tx=r.normal(0, 1.5) * n, ty=r.normal(0, 1.5) * n,
                fov=2 * f["a"] * (1.12 + r.uniform(0, 0.25) * n), z_top=f["apex"] + 2 + r.normal(0, 1.8) * n,
                cover=30.0 + r.uniform(-2, 4) * n, insp=r.normal(0, 1.2) * n,
                noise=8 + r.uniform(0, 25) * n, sev=sev, ecg=r.random() < 0.3)


def _put(hu, mask, value):
    np.copyto(hu, np.asarray(value, np.float32), where=mask)


def render_volume(f, p, proto, vendor, nz, ny, nx, r):
    """HU volume (float32) and geometry for one visit."""
    ps = p["fov"] / nx
    th = p["cover"] / nz
    zs = (p["z_top"] - th * np.arange(nz)).astype(np.float32)
    ys = (np.arange(ny, dtype=np.float32) - (ny - 1) / 2) * ps
    xs = (np.arange(nx, dtype=np.float32) - (nx - 1) / 2) * ps
    Yd, Xd = np.meshgrid(ys, xs, indexing="ij")
    Z = zs[:, None, None]
    a = math.radians(p["rot"])
    Y = math.cos(a) * (Yd - p["ty"]) - math.sin(a) * (Xd - p["tx"])      # 2D: the patient
    X = math.sin(a) * (Yd - p["ty"]) + math.cos(a) * (Xd - p["tx"])      # is rigid in-plane
    X2, Y2 = X * X, Y * Y
    s, cage, lift = f["s"], f["cage"], p["insp"]
    zn = np.clip((Z + 4) / 22, -1.5, 1.0)
    wid = f["a"] * (1 + 0.10 * zn - 0.12 * np.clip(-zn - 0.6, 0, 1)) * (1 + 0.015 * lift)
    dep = f["b"] * (1 - 0.05 * zn)
    th_ = np.arctan2(Y / f["b"], X / f["a"])
    rho = np.sqrt(X2 * (1 / wid ** 2) + Y2 * (1 / dep ** 2)) * (1 / polar_radius(th_, f["outline"]))
    hu = np.full((nz, ny, nx), -1000, np.float32)
    _put(hu, rho < 1, -100)
    _put(hu, rho < 1 - f["fat"] / f["a"], 40)
    zi = np.nonzero(np.abs(zs + 10) < 6)[0]
    if f["breast"] and zi.size:
        sl = slice(zi[0], zi[-1] + 1)
        for side in (-1, 1):
            bd = (((X - side * 8 * s) / f["breast"]) ** 2 + ((Y + dep[sl] - 1.5) / (0.8 * f["breast"])) ** 2
                  + ((Z[sl] + 10) / 6) ** 2)
            _put(hu[sl], bd < 1, -40)
    rib_r = rho / cage
    inner = rib_r < 0.94
    chest = Z < (f["apex"] + 1 - 4 * np.clip(rib_r - 0.3, 0, 1) ** 2)
    ang = np.abs(th_ - math.pi / 2)                  # 0 at the posterior midline
    phase = (Z + (f["rib_slope"] * f["a"] * 0.35) * ang) / f["rib_sp"] + f["rib_phase"]
    rib_on = np.abs(phase - np.round(phase)) < (f["rib_w"] / f["rib_sp"] / 2)
    ribs = rib_on & (np.abs(rib_r - 0.97) < 0.04) & (Z > (f["dome_r"] - 3 + 6 * np.clip(-Y / dep, 0, 1))) & chest
    _put(hu, ribs, 420)
    _put(hu, ribs & (np.abs(rib_r - 0.97) > 0.025), 770)
    dome_r = f["dome_r"] - lift + 0.03 * ((X + 5) ** 2 + (Y + 1) ** 2)
    dome_l = f["dome_l"] - lift + 0.03 * ((X - 5) ** 2 + (Y + 1) ** 2)
    above = Z > np.where(X < 0, dome_r, dome_l)
    lungs = np.zeros((nz, ny, nx), bool)
    for k, side in enumerate((-1, 1)):
        cx = side * 0.5 * f["a"] * cage
        pr = polar_radius(np.arctan2(Y, X - cx), f["lung_coeffs"][k]) ** 2
        lr2 = (((X - cx) ** 2 / pr) * (1 / (0.52 * wid * cage) ** 2)
               + ((Y - 0.05 * f["b"]) ** 2 / pr) * (1 / (0.88 * dep * cage) ** 2))
        lungs |= (lr2 < 1) & (side * X > 0.3)
    lungs &= inner & chest & above
    hz, hy, hx, hry, hrx, hrz, hang = f["heart"]
    hz = hz - 0.6 * lift
    ca, sa = math.cos(hang), math.sin(hang)
    u, w = ca * (X - hx) + sa * (Y - hy), -sa * (X - hx) + ca * (Y - hy)
    heart = ((u / hrx) ** 2 + (w / hry) ** 2) + ((Z - hz) / hrz) ** 2 < 1
    cont = {"none": 40, "venous": 150, "arterial": 300}[proto["contrast"]]
    spine_y = f["spine_y"]
    med = ((np.abs(X) < 3.2 * s) & (Y < spine_y - 1)) & (Z < f["apex"] + 2) & inner
    med |= heart
    lungs &= ~med
    lung_hu = -860 + (-50 * p["sev"] if f["disease"]["kind"] == "emphysema" else 0)
    _put(hu, lungs, lung_hu)
    _put(hu, med, -60)
    _put(hu, heart, cont * 0.8 + 10)
    za = Z < f["arch_z"]
    vessels = (((X - f["desc_x"]) ** 2 + (Y - (spine_y - 2.3)) ** 2 < f["aorta_r"] ** 2) & za)
    vessels |= ((X + 1.0) ** 2 + (Y + 2.5) ** 2 < (1.1 * f["aorta_r"]) ** 2) & za & (Z > hz + 3)
    arch = np.abs(np.sqrt(((X - 0.5) / 1.8) ** 2 + (Y / 3.0) ** 2) - 1) * 1.8 < f["aorta_r"]
    vessels |= arch & (np.abs(Z - f["arch_z"]) < f["aorta_r"])
    vessels |= ((X + 3.0) ** 2 + (Y + 1.0) ** 2 < 1.0) & (Z > hz + 2) & (Z < f["apex"] + 1)
    _put(hu, vessels & (rho < 1), cont)
    ty_ = Y - (spine_y - 4.5)
    tr = ((X - 0.2) ** 2 + ty_ ** 2 < f["trachea_r"] ** 2) & (Z > f["carina"]) & (Z < f["apex"] + 6)
    bz = f["carina"] - Z
    for side in (-1, 1):
        tr |= ((X - side * (1.0 + 0.8 * bz)) ** 2 + ty_ ** 2 < (0.7 * f["trachea_r"]) ** 2) & (bz > 0) & (bz < 4)
    _put(hu, tr, -990)
    idx = np.nonzero(lungs)
    if idx[0].size:
        zz, yy, xx = zs[idx[0]], Y[idx[1], idx[2]], X[idx[1], idx[2]]
        vf = [sample_field3(fl, zz - ZC, yy, xx, FEXT) for fl in f["vessel_fields"]]
        hil = np.exp(-((np.abs(xx) - 4) ** 2 + (yy - 1) ** 2 + (zz + 3) ** 2) / 60.0)
        hu[idx] += np.exp(-(vf[0] ** 2 + vf[1] ** 2) / 0.04) * (250 + 700 * hil)
    vq = (zs / f["vert_h"]) + f["vert_phase"]
    disc = (np.abs(vq - np.round(vq)) < 0.12)[:, None, None]
    vd = np.sqrt(X2 + (Y - spine_y) ** 2)
    vert = vd < f["vert_r"]
    _put(hu, vert, 240)
    _put(hu, vert & (vd > f["vert_r"] - 0.35), 700)
    _put(hu, vert & disc, 90)
    cy_ = Y - spine_y - f["vert_r"]
    canal = (X2 + (cy_ - 0.9) ** 2) < 0.8
    post = (((np.abs(X) - 1.3) ** 2 + (cy_ - 1.6) ** 2 / 0.5 < 1)
            | ((X / 0.5) ** 2 + ((cy_ - 3.2) / 1.2) ** 2 < 1)) & ~canal
    _put(hu, post, 500)
    _put(hu, post & disc, 60)
    _put(hu, canal & (rho < 1), 20)
    stern = ((X / 1.6) ** 2 + ((Y + dep * cage * 0.98) / 0.7) ** 2 < 1) & (Z > -16) & (Z < f["apex"] - 1)
    _put(hu, stern, 350)
    liver = (~above) & (rib_r < 0.95) & ~vert & ~post
    _put(hu, liver, 35)
    _put(hu, liver & (X < 2), 60 + 0.3 * cont)
    stomach = (((X - 6 * s) / 3.5) ** 2 + ((Y + 2) / 3.0) ** 2 + ((Z - f["dome_l"] + 3) / 3.0) ** 2 < 1)
    stomach &= liver & (X >= 2)
    _put(hu, stomach, 20)
    _put(hu, stomach & (Y < -2.5), -950)
    for gz, gy, gx, gr in f["granulomas"]:
        _put(hu, (X - gx) ** 2 + (Y - gy) ** 2 + (Z - gz) ** 2 < gr ** 2, 600)
    dis, sev = f["disease"], p["sev"]
    if sev > 0 and dis["kind"] in ("ggo", "nodule"):
        lz, ly, lx = dis["loc"]
        dd = (X - dis["side"] * lx) ** 2 + (Y - ly) ** 2 + (Z - lz) ** 2
        if dis["kind"] == "ggo":
            hu += (lungs & (dd < (3 + 4 * sev) ** 2)) * np.float32(300 * sev)
        else:
            _put(hu, dd < (0.3 + 1.0 * sev) ** 2, 30)
    if sev > 0 and dis["kind"] == "effusion":
        _put(hu, lungs & (Y > dep * cage * (0.85 - 0.7 * sev)) & (dis["side"] * X > 0), 10)
    if not proto["arms_up"]:
        for side in (-1, 1):
            arm = ((X - side * (wid + 5)) / 4.0) ** 2 + (Y / 4.5) ** 2
            _put(hu, arm < 1, 30)
            _put(hu, arm < 0.08, 600)
    v = p.get("visit", 0)
    if f["port_from"] is not None and v >= f["port_from"]:
        _put(hu, ((X + 7 * s) ** 2 / 4 + (Y + dep * 0.92) ** 2 + (Z - 1.5) ** 2 / 4) < 1, 1500)
    if f["pacer_from"] is not None and v >= f["pacer_from"]:
        _put(hu, ((X - 8 * s) ** 2 / 6 + (Y + dep * 0.95) ** 2 / 0.5 + (Z - 2) ** 2 / 4) < 1, 2500)
    if p["ecg"]:
        for k in range(3):
            _put(hu, ((X - (-5 + 5 * k)) ** 2 + (Y + dep - 0.2) ** 2 + (Z + 5 * k - 6) ** 2) < 0.3, 1800)
    curve = p["ty"] + f["b"] * 1.04 + 0.3 - 0.006 * Xd ** 2 * (1 + 0.5 * vendor["table"])
    _put(hu, (Yd > curve) & (Yd < curve + 0.5 + 0.3 * vendor["table"]), 150 - 400 * (vendor["table"] == 2))
    sharp = proto["kernel"]
    sig = 0.25 if sharp else 0.6
    hu = ndimage.gaussian_filter(hu, (0.0, sig, sig))
    noise = r.standard_normal(hu.shape, dtype=np.float32) * np.float32(p["noise"] * (3.6 if sharp else 2.0))
    hu += ndimage.gaussian_filter(noise, (0, 0.7, 0.7))
    return hu, zs, ps, th


def render_studies(cfg, persons, person, draw, studies):
    f = person_features(draw, person)
    for st in studies:
        r = rng_for(cfg.seed, "visit", st["key"])
        vendor = VENDORS["ct"][st["vendor"]]
        proto = st["protocol"]
        p = visit_params(r, f, st, cfg.nuisance)
        p["visit"] = st["visit"]
        nz, n = cfg.ct_slices, cfg.ct_size
        hu, zs, ps, th = render_volume(f, p, proto, vendor, nz, n, n, r)
        inter = vendor["intercept"]
        stored = np.clip(np.rint(hu), -1024, 3071) - inter
        dtype = np.int16 if vendor["signed"] else np.uint16
        if vendor["padding"] is not None:
            yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
            stored = np.where((yy ** 2 + xx ** 2 > (n / 2) ** 2)[None], vendor["padding"] - inter, stored)
        stored = stored.astype(dtype)
        for_uid = uid(cfg.seed, "for", st["key"])
        table = -1200.0 + 10 * float(r.uniform(0, 20))
        wc, ww = ("-600", "1500") if proto["kernel"] else ("40", "400")
        x0 = -(n - 1) / 2 * ps * 10
        common = series_attrs(cfg, st, person, 0, "CHEST") + [
            ("ImageType", ["ORIGINAL", "PRIMARY", "AXIAL"]),
            ("FrameOfReferenceUID", for_uid), ("PositionReferenceIndicator", ""),
            ("PatientPosition", "HFS"), ("ImageOrientationPatient", ["1", "0", "0", "0", "1", "0"]),
            ("SliceThickness", f"{th * 10:.3f}"), ("PixelSpacing", [f"{ps * 10:.4f}", f"{ps * 10:.4f}"]),
            ("KVP", "120"), ("XRayTubeCurrent", int(40 + 4 * (60 - p["noise"]))),
            ("ConvolutionKernel", vendor["kernels"][proto["kernel"]]),
            ("ContrastBolusAgent", "" if proto["contrast"] == "none" else "IOHEXOL"),
            ("RescaleIntercept", str(inter)), ("RescaleSlope", "1"), ("RescaleType", "HU"),
            ("WindowCenter", wc), ("WindowWidth", ww), ("AcquisitionNumber", 1),
            ("ReconstructionDiameter", f"{p['fov'] * 10:.1f}"),
        ]
        for i in range(nz):
            z_mm = zs[i] * 10 + table
            specific = [
                ("InstanceNumber", i + 1),
                ("ImagePositionPatient", [f"{x0:.3f}", f"{x0:.3f}", f"{z_mm:.3f}"]),
                ("SliceLocation", f"{z_mm:.3f}"),
            ]
            if vendor["padding"] is not None:
                specific.append(("PixelPaddingValue", int(vendor["padding"] - inter)))
            yield st, 0, Instance(common, SOP_CLASSES["CT"], uid(cfg.seed, "sop", st["key"], 0, i + 1),
                                  specific, stored[i], "MONOCHROME2", vendor["bits"])
