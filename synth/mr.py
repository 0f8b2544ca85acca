"""Brain MR: 3D axial series (T1 plus T2 or FLAIR per study).

Identity: skull shape and thickness, the gyral/sulcal pattern (zero set of a person-specific
band-pass field), ventricle size/shape/asymmetry, deep grey nuclei, cerebellum, orbits.
Visit: head position and 3D rotation, slice positioning and coverage, field of view,
sequence contrast, vendor bias field and gain, noise (Rician), slow atrophy (ventricles and
sulci widen), accumulating white matter lesions.
Patient coordinates in cm (LPS): x to the patient's left, y posterior, z superior.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from .common import bandpass_field, fourier_coeffs, polar_radius_lut, rng_for, sample_field3, smooth_field
from .dicom_writer import SOP_CLASSES, Instance, uid
from .plan import VENDORS, series_attrs

GEXT = (10.0, 11.0, 9.0)      # person gyral field half extents (z, y, x), cm
# tissue -> (T1, T2, FLAIR) relative intensity
TISSUES = ["bg", "scalp", "diploe", "bone", "csf", "gm", "wm", "deep", "lesion", "eye", "fat", "muscle", "air"]
CONTRAST = {
    "T1": [0.0, 0.80, 0.70, 0.03, 0.12, 0.45, 0.68, 0.52, 0.35, 0.10, 0.95, 0.35, 0.0],
    "T2": [0.0, 0.55, 0.45, 0.03, 0.95, 0.58, 0.38, 0.48, 0.85, 0.95, 0.60, 0.25, 0.0],
    "FLAIR": [0.0, 0.50, 0.40, 0.03, 0.06, 0.60, 0.42, 0.52, 0.95, 0.05, 0.55, 0.25, 0.0],
}
SEQ = {
    "T1": dict(ScanningSequence="SE", SequenceVariant="SP", RepetitionTime="550", EchoTime="9", FlipAngle="90"),
    "T2": dict(ScanningSequence="SE", SequenceVariant=["SK", "SP"], RepetitionTime="4500", EchoTime="95",
               FlipAngle="150"),
    "FLAIR": dict(ScanningSequence=["SE", "IR"], SequenceVariant=["SK", "SP", "MP"], RepetitionTime="9000",
                  EchoTime="85", FlipAngle="150", InversionTime="2500"),
}


def person_features(d, person) -> dict:
    s = float(np.clip(d.normal(1.0, 0.04), 0.9, 1.1)) * (1.02 if person.sex == "M" else 0.97)
    f = {"s": s,
         "axes": (7.2 * s * (1 + 0.04 * d.std()), 9.3 * s * (1 + 0.04 * d.std()), 8.0 * s * (1 + 0.04 * d.std())),
         "shape": fourier_coeffs(d, 5, 0.025), "tilt": 0.04 * d.std(), "scalp": 0.5 + 0.12 * d.std(),
         "skull": 0.75 + 0.12 * d.std(), "csf": 0.25 + 0.06 * d.std(), "sulc_depth": 1.6 + 0.2 * d.std(),
         "vent": (1 + 0.18 * d.std(), 0.15 * d.std(), 0.25 * d.std()),    # size, asymmetry, shift y
         "vent_z": 1.0 + 0.4 * d.std(), "thal": (0.9 + 0.1 * d.std(), 0.8 + 0.2 * d.std()),
         "cereb": (4.4 * s * (1 + 0.05 * d.std()), 2.6 * (1 + 0.06 * d.std()), -4.6 + 0.3 * d.std()),
         "eyes": (3.1 + 0.15 * d.std(), -7.6 * s + 0.2 * d.std(), -3.6 + 0.3 * d.std(), 1.15 + 0.06 * d.std()),
         "midline": 0.15 * d.std()}
    f["gyri"] = bandpass_field(d.sub("gyri"), (40, 44, 36), 0.9, 2.2)
    f["folia"] = smooth_field(d.sub("folia"), (24, 24, 24), 1.0)
    g = d.sub("lesions")
    n_les = int(g.integers(0, 12))
    f["lesions"] = [(g.uniform(-1.0, 3.5), g.uniform(-3.5, 3.5), g.choice([-1, 1]) * g.uniform(1.5, 4.0),
                     g.uniform(0.15, 0.45), int(g.integers(0, 5))) for _ in range(11)][:n_les]
    f["atrophy"] = d.uniform(0.0, 0.08)
    return f


def visit_params(r, f, st, n) -> dict:
    return dict(yaw=r.normal(0, 4) * n, pitch=r.normal(0, 7) * n, roll=r.normal(0, 3) * n,
                tx=r.normal(0, 0.8) * n, ty=r.normal(0, 1.2) * n, tz=r.normal(0, 1.2) * n,
                fov=23.0 + r.uniform(-1.5, 2.5) * n, cover=15.0 + r.uniform(-1, 2) * n,
                noise=0.015 + r.uniform(0, 0.03) * n, gain=1 + r.uniform(-0.3, 0.3) * n,
                bias_seed=int(r.integers(0, 2 ** 31)), visit=st["visit"])


def _rot(yaw, pitch, roll):
    a, b, c = (math.radians(v) for v in (yaw, pitch, roll))
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    ry = np.array([[math.cos(c), 0, math.sin(c)], [0, 1, 0], [-math.sin(c), 0, math.cos(c)]])
    return rz @ rx @ ry


def tissue_volume(f, p, nz, n):
    """Label volume (indices into TISSUES) plus geometry for one visit."""
    ps, th = p["fov"] / n, p["cover"] / nz
    zs = (p["cover"] / 2 - th / 2 - th * np.arange(nz, dtype=np.float32)) + 0.5
    xs = (np.arange(n, dtype=np.float32) - (n - 1) / 2) * ps
    Zs, Ys, Xs = np.meshgrid(zs, xs, xs, indexing="ij")
    R = _rot(p["yaw"], p["pitch"], p["roll"]).astype(np.float32)
    px, py, pz = Xs - p["tx"], Ys - p["ty"], Zs - p["tz"]
    X = R[0, 0] * px + R[1, 0] * py + R[2, 0] * pz         # inverse rotation (R^T)
    Y = R[0, 1] * px + R[1, 1] * py + R[2, 1] * pz
    Z = R[0, 2] * px + R[1, 2] * py + R[2, 2] * pz
    ax, ay, az = f["axes"]
    zc = Z + 0.5
    rad = polar_radius_lut(np.arctan2(Y, X), f["shape"]) * (1 + f["tilt"] * Y / ay)
    rho = np.sqrt((X / ax) ** 2 + (Y / ay) ** 2 + (np.where(zc < 0, zc * 0.75, zc) / az) ** 2) / rad
    depth = (1 - rho) * 8.0
    lab = np.zeros(X.shape, np.uint8)
    lab[depth > 0] = 1
    lab[depth > f["scalp"]] = 2
    outer = f["scalp"] + 0.2
    lab[(depth > f["scalp"]) & (depth < outer)] = 3
    inner = f["scalp"] + f["skull"]
    lab[(depth > inner - 0.2) & (depth < inner)] = 3
    atro = f["atrophy"] * p["visit"]
    brain_d = depth - inner - f["csf"] * (1 + 2 * atro)
    lab[depth > inner] = 4
    inside = brain_d > 0
    idx = np.nonzero(inside)
    g = sample_field3(f["gyri"], Z[idx], Y[idx], X[idx], GEXT)
    bd = brain_d[idx]
    w_s = 0.10 + 0.3 * atro
    sulcus = (np.abs(g) < w_s) & (bd < f["sulc_depth"])
    gm = (bd < 0.35) | ((np.abs(g) < w_s + 0.55) & (bd < f["sulc_depth"] + 0.35))
    sub = np.where(sulcus, 4, np.where(gm, 5, 6)).astype(np.uint8)
    lab[idx] = sub
    fiss = (np.abs(X - f["midline"]) < 0.18 + 0.1 * atro) & (depth > inner) & (brain_d < 4.0) & (Z > -2)
    lab[fiss] = 4
    # deep structures, evaluated only on the voxels of a box around them
    sub = np.nonzero((np.abs(X) < 5.0) & (np.abs(Y) < 7.0) & (np.abs(Z - f["vent_z"] + 0.5) < 3.5))
    x, y, z = X[sub], Y[sub], Z[sub]
    ls = lab[sub]
    ins = ls >= 4
    vs, vasym, vy = f["vent"]
    vs = vs * (1 + atro * 2)
    zv = z - f["vent_z"]
    for side in (-1, 1):
        sz = vs * (1 + side * vasym)
        body = ((x - side * 1.05 * sz) / (0.75 * sz)) ** 2 + ((y - vy) / 3.6) ** 2 + (zv / 1.4) ** 2 < 1
        front = ((x - side * 1.2) / (0.9 * sz)) ** 2 + ((y - vy + 2.8) / 1.4) ** 2 + ((zv + 0.7) / 1.3) ** 2 < 1
        occ = ((x - side * 1.8) / (0.6 * sz)) ** 2 + ((y - vy - 3.6) / 1.5) ** 2 + ((zv + 0.9) / 1.0) ** 2 < 1
        tr, tz = f["thal"]
        thal = ((x - side * 1.1) / (0.9 * tr)) ** 2 + ((y - 0.9) / 1.4) ** 2 + ((zv + 1.6) / tz) ** 2 < 1
        lent = ((x - side * 2.6) / 0.7) ** 2 + ((y + 0.4) / 1.5) ** 2 + ((zv + 1.3) / 0.9) ** 2 < 1
        ls[(thal | lent) & ins] = 7
        ls[(body | front | occ) & ins] = 4
    third = (np.abs(x) < 0.2 * vs) & (np.abs(y - 0.6) < 1.1) & (np.abs(zv + 1.8) < 0.9)
    ls[third & ins] = 4
    for lz, ly, lx, lr, onset in f["lesions"]:
        if p["visit"] >= onset - 2:
            ls[((x - lx) ** 2 + (y - ly) ** 2 + (z - lz) ** 2 < lr ** 2) & (ls == 6)] = 8
    lab[sub] = ls
    # posterior fossa, orbits and sinuses: only below the ventricles
    sub = np.nonzero(Z < -0.5)
    x, y, z = X[sub], Y[sub], Z[sub]
    ls = lab[sub]
    cr, ch, cz = f["cereb"]
    cer = ((x / cr) ** 2 + ((y - 4.2) / (0.65 * cr)) ** 2 + ((z - cz) / ch) ** 2) < 1
    folia = sample_field3(f["folia"], z[cer] * 1.5, y[cer] * 1.5, x[cer] * 0.5, (8, 8, 8))
    ls[cer] = np.where(np.abs(folia) < 0.12, 4, 5)
    ls[cer & (((x / (0.45 * cr)) ** 2 + ((y - 4.0) / 1.5) ** 2 + ((z - cz) / (0.6 * ch)) ** 2) < 1)] = 6
    ls[(x ** 2 + ((y - 1.4) / 1.2) ** 2 < 1.3) & (z < -1.5) & (z > cz - 4)] = 6
    ex, ey, ez, er = f["eyes"]
    for side in (-1, 1):
        orb = (((x - side * ex) / (er * 1.5)) ** 2 + ((y - ey - 0.8) / (er * 1.8)) ** 2
               + ((z - ez) / (er * 1.2)) ** 2) < 1
        ls[orb] = 10
        ls[(x - side * ex) ** 2 + (y - ey) ** 2 + (z - ez) ** 2 < er ** 2] = 9
    ls[(x ** 2 / 2.0 + ((y + 6.3) / 1.2) ** 2 + ((z - ez + 0.8) / 1.2) ** 2) < 1] = 12
    lab[sub] = ls
    return lab, zs, ps, th


def contrast_image(f, lab, seq, p, vendor, r) -> np.ndarray:
    lut = np.asarray(CONTRAST[seq], np.float32)
    img = ndimage.gaussian_filter(lut[lab], (0.0, 0.7, 0.7))
    nz, ny, nx = img.shape
    br = rng_for(p["bias_seed"], "bias", seq)
    c = br.standard_normal(7).astype(np.float32)
    z = np.linspace(-1, 1, nz, dtype=np.float32)[:, None, None]
    y = np.linspace(-1, 1, ny, dtype=np.float32)[None, :, None]
    x = np.linspace(-1, 1, nx, dtype=np.float32)[None, None, :]
    bias2d = c[0] * y + c[1] * x + c[2] * x * y + c[3] * (x * x - y * y)       # smooth coil profile
    bias = bias2d + (c[4] * z + c[5] * z * z) + c[6] * z * x
    img = img * np.exp(np.float32(vendor["bias"] * 0.5) * bias) * np.float32(p["gain"])
    sd = p["noise"]
    n1 = r.standard_normal(img.shape, dtype=np.float32) * sd
    n2 = r.standard_normal(img.shape, dtype=np.float32) * sd
    return np.sqrt((img + n1) ** 2 + n2 ** 2)


def render_studies(cfg, persons, person, draw, studies):
    f = person_features(draw, person)
    for st in studies:
        r = rng_for(cfg.seed, "visit", st["key"])
        vendor = VENDORS["mr"][st["vendor"]]
        p = visit_params(r, f, st, cfg.nuisance)
        nz, n = cfg.mr_slices, cfg.mr_size
        lab, zs, ps, th = tissue_volume(f, p, nz, n)
        for_uid = uid(cfg.seed, "for", st["key"])
        for si, seq in enumerate(st["protocol"]["sequences"]):
            img = contrast_image(f, lab, seq, p, vendor, r)
            pix = np.clip(np.rint(img * 2000), 0, 4095).astype(np.uint16)
            x0 = -(n - 1) / 2 * ps * 10
            hi = float(np.percentile(pix[nz // 2], 99.5))
            common = series_attrs(cfg, st, person, si, "HEAD", minutes=4 * si) + [
                ("ImageType", ["ORIGINAL", "PRIMARY", "M", "ND"]),
                ("FrameOfReferenceUID", for_uid), ("PositionReferenceIndicator", ""),
                ("PatientPosition", "HFS"), ("ScanOptions", ""), ("MRAcquisitionType", "2D"),
                ("SliceThickness", f"{th * 10 * 0.9:.2f}"), ("SpacingBetweenSlices", f"{th * 10:.2f}"),
                ("MagneticFieldStrength", f"{vendor['field']:.1f}"), ("ImagedNucleus", "1H"),
                ("ImagingFrequency", f"{42.577 * vendor['field']:.4f}"), ("EchoTrainLength", 1 if seq == "T1" else 16),
                ("ImageOrientationPatient", ["1", "0", "0", "0", "1", "0"]),
                ("PixelSpacing", [f"{ps * 10:.4f}", f"{ps * 10:.4f}"]),
                ("WindowCenter", f"{hi / 2:.0f}"), ("WindowWidth", f"{max(hi, 1):.0f}"),
                ("AcquisitionNumber", 1),
            ] + [(k, v) for k, v in SEQ[seq].items()]
            for i in range(nz):
                z_mm = zs[i] * 10
                specific = [
                    ("InstanceNumber", i + 1),
                    ("ImagePositionPatient", [f"{x0:.3f}", f"{x0:.3f}", f"{z_mm:.3f}"]),
                    ("SliceLocation", f"{z_mm:.3f}"),
                ]
                yield st, si, Instance(common, SOP_CLASSES["MR"], uid(cfg.seed, "sop", st["key"], si, i + 1),
                                       specific, pix[i], "MONOCHROME2", 12)
