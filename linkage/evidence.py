"""Field comparisons and their Fellegi-Sunter weights.

Each comparison of two studies' demographics yields, per field, an outcome level (e.g.
name: exact / close / partial / different / missing). A level's weight is ln(m / u), where
m = P(level | the hypothesis) and u = P(level | its alternative); missing values weigh 0.
Weights are natural logs so they add to the image evidence, which the identity model's
calibration gives as a natural-log likelihood ratio.

Two hypotheses, two tables, because the demographics mean different things:

* ``same``: two Patient IDs are one person. Demographics are strong evidence: a random
  other patient rarely shares name and birth date.
* ``belongs``: a study filed under a Patient ID is that patient's. The usual mistake is the
  wrong patient picked from the worklist, which copies that patient's demographics into
  the study; so agreement is weak evidence of belonging and only disagreement (someone's
  ID typed for another person) speaks loudly.

Defaults below are set from published base rates and the registration noise a site sees
(typos, day/month swaps, missing birth dates); `reestimate` moves m and u towards what
archivists confirmed and rejected, with the defaults as a prior of PSEUDO_COUNT pairs.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

from rapidfuzz import fuzz
from rapidfuzz.distance import OSA

PSEUDO_COUNT = 20.0

# (m, u) per hypothesis, field and level.
DEFAULT_MU: dict[str, dict[str, dict[str, tuple[float, float]]]] = {
    "same": {
        # partial: the family name alone agrees. One person's given name is rarely entirely
        # different between registrations, while twins and siblings share family name, birth
        # date and sex, which the independence of the fields would otherwise count three times.
        "name": {"exact": (0.80, 0.001), "close": (0.15, 0.003), "partial": (0.005, 0.06),
                 "different": (0.045, 0.936)},
        # far / impossible: birth years FAR_YEARS or more apart. Set to outweigh the most image
        # evidence one pair can have (decide.Thresholds.max_image_total, 16 nats), not estimated
        # from data: look-alike relatives decades apart must not be linked on their images.
        "birth_date": {"exact": (0.93, 0.0005), "swapped": (0.025, 0.0002), "near": (0.025, 0.004),
                       "different": (0.02, 0.6953), "far": (3e-8, 0.3)},
        "sex": {"same": (0.98, 0.5), "different": (0.02, 0.5)},
        "age": {"consistent": (0.97, 0.3), "inconsistent": (0.03, 0.4), "impossible": (3e-8, 0.3)},
        "issuer": {"same": (0.5, 0.4), "different": (0.5, 0.6)},
    },
    "belongs": {
        "name": {"exact": (0.85, 0.70), "close": (0.12, 0.10), "partial": (0.02, 0.03),
                 "different": (0.01, 0.17)},
        "birth_date": {"exact": (0.95, 0.80), "swapped": (0.02, 0.01), "near": (0.015, 0.02),
                       "different": (0.015, 0.17)},
        "sex": {"same": (0.99, 0.90), "different": (0.01, 0.10)},
        "age": {"consistent": (0.98, 0.85), "inconsistent": (0.02, 0.15)},
    },
}

FIELDS = ("name", "birth_date", "sex", "age", "issuer")

# Birth years this far apart (from birth dates, or from Patient Age at the study date) are two
# persons, whatever the images say; closer ones may be a typing error ("different").
FAR_YEARS = 10
# Dates some systems store for "unknown": compared as missing, not as a birth date.
PLACEHOLDER_DATES = frozenset({"19000101", "18991231", "00010101", "19010101"})

# Relatives break the independence of the fields: twins share family name, birth date and sex
# and differ in the given name. Where only the family name agrees (name "partial"), a shared
# birth date is much less rare among different persons than among random pairs (u 0.0005):
# its u under "same" is TWIN_U instead (twins and same-day relatives among same-family pairs).
TWIN_U = 0.01
TWIN_NOTE = "only the family name agrees: the pattern of twins"


@dataclass(frozen=True)
class Demographics:
    name: str | None
    birth_date: str | None       # YYYYMMDD
    sex: str | None
    age: str | None              # DICOM AS, e.g. 042Y
    study_date: str | None
    issuer: str | None = None


# ----- comparisons ---------------------------------------------------------------------

@lru_cache(maxsize=65536)
def normalize_name(name: str | None) -> str:
    """DICOM PN 'Family^Given^Middle' -> 'FAMILY GIVEN MIDDLE', without accents or punctuation."""
    if not name:
        return ""
    text = unicodedata.normalize("NFKD", name.split("=")[0])     # alphabetic group only
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = "".join(c if c.isalnum() else " " for c in text.upper())
    return " ".join(text.split())


@lru_cache(maxsize=65536)     # the same few names are compared for every pair of studies
def compare_name(a: str | None, b: str | None) -> str:
    x, y = normalize_name(a), normalize_name(b)
    if not x or not y:
        return "missing"
    tx, ty = set(x.split()), set(y.split())
    if tx == ty or (len(tx & ty) >= 2 and (tx <= ty or ty <= tx)):
        return "exact"             # same words, in any order; a middle name may be left out
    # Typos: optimal-string-alignment distance (a transposition counts once) between the
    # order-normalized names, about one edit per six letters; token_set: a middle name
    # missing on one side.
    sx, sy = " ".join(sorted(x.split())), " ".join(sorted(y.split()))
    if OSA.distance(sx, sy) <= max(1, min(len(sx), len(sy)) // 6) or fuzz.token_set_ratio(x, y) >= 97:
        return "close"
    family_x, family_y = x.split()[0], y.split()[0]
    # family_x in ty: one side's family name is a given name of the other (name order swapped)
    if (family_x == family_y or family_x in ty or family_y in tx or fuzz.ratio(family_x, family_y) >= 85
            or fuzz.token_sort_ratio(x, y) >= 75):
        return "partial"
    return "different"


def compare_birth_date(a: str | None, b: str | None) -> str:
    if not valid_date(a) or not valid_date(b):
        return "missing"
    if a == b:
        return "exact"
    if a[:4] == b[:4] and a[4:6] == b[6:8] and a[6:8] == b[4:6]:
        return "swapped"
    if sum(p != q for p, q in zip(a, b)) == 1 or (a[4:] == b[4:] and abs(int(a[:4]) - int(b[:4])) == 1):
        return "near"
    return "far" if abs(int(a[:4]) - int(b[:4])) >= FAR_YEARS else "different"


def compare_sex(a: str | None, b: str | None) -> str:
    x, y = (a or "").strip().upper()[:1], (b or "").strip().upper()[:1]
    if x not in ("M", "F") or y not in ("M", "F"):
        return "missing"           # O (other) and blanks say nothing either way
    return "same" if x == y else "different"


def compare_age(a: Demographics, b: Demographics) -> str:
    """Do the birth years agree (± 1 year), each from the birth date or else from Patient Age at
    the study date? `impossible`: FAR_YEARS or more apart. `missing` unless at least one side
    gives only an age (two birth dates are compared as birth dates)."""
    ya, yb = _birth_year(a), _birth_year(b)
    if ya is None or yb is None or (valid_date(a.birth_date) and valid_date(b.birth_date)):
        return "missing"
    gap = abs(ya - yb)
    if gap <= 1:
        return "consistent"
    return "impossible" if gap >= FAR_YEARS else "inconsistent"


def _birth_year(d: Demographics) -> int | None:
    if valid_date(d.birth_date):
        return int(d.birth_date[:4])
    years = _age_years(d.age)
    if years is None or not valid_date(d.study_date):
        return None
    return int(d.study_date[:4]) - years


def compare_issuer(a: str | None, b: str | None) -> str:
    if a is None or b is None:
        return "missing"
    return "same" if a == b else "different"


def compare(a: Demographics, b: Demographics, hypothesis: str) -> dict[str, str]:
    levels = {"name": compare_name(a.name, b.name), "birth_date": compare_birth_date(a.birth_date, b.birth_date),
              "sex": compare_sex(a.sex, b.sex), "age": compare_age(a, b)}
    if levels["birth_date"] != "missing":
        # Age follows from the birth dates: counting it as well would double the evidence
        # (Fellegi-Sunter assumes independent fields). It speaks when a birth date is missing.
        levels["age"] = "missing"
    if hypothesis == "same":
        levels["issuer"] = compare_issuer(a.issuer, b.issuer)
    else:
        # belongs: a wrong-patient study usually carries the ID's own demographics (a worklist
        # mistake copies them), so the far levels are no stronger there than "different".
        levels["birth_date"] = {"far": "different"}.get(levels["birth_date"], levels["birth_date"])
        levels["age"] = {"impossible": "inconsistent"}.get(levels["age"], levels["age"])
    return levels


# ----- weights -------------------------------------------------------------------------

class MatchWeights:
    """m/u tables per hypothesis; `weight` is ln(m/u) of an outcome, 0 when missing."""

    def __init__(self, overrides: dict[tuple[str, str], tuple[float, float]] | None = None) -> None:
        self.table = {h: {f: dict(levels) for f, levels in fields.items()} for h, fields in DEFAULT_MU.items()}
        for (key, level), (m, u) in (overrides or {}).items():
            hypothesis, _, field_name = key.partition(".")
            if field_name in self.table.get(hypothesis, {}) and level in self.table[hypothesis][field_name]:
                self.table[hypothesis][field_name][level] = (m, u)

    def weight(self, hypothesis: str, field_name: str, level: str) -> float:
        if level == "missing":
            return 0.0
        m, u = self.table[hypothesis][field_name][level]
        return math.log(max(m, 1e-9) / max(u, 1e-9))

    def score(self, levels: dict[str, str], hypothesis: str) -> tuple[float, dict[str, dict]]:
        """Total weight and the per-field evidence {field: {level, weight}}."""
        fields = {f: {"level": lvl, "weight": round(self.weight(hypothesis, f, lvl), 3)} for f, lvl in levels.items()}
        if hypothesis == "same" and levels.get("name") == "partial" and levels.get("birth_date") == "exact":
            m = self.table["same"]["birth_date"]["exact"][0]
            fields["birth_date"] = {"level": "exact", "weight": round(math.log(max(m, 1e-9) / TWIN_U), 3),
                                    "note": TWIN_NOTE}
        return sum(v["weight"] for v in fields.values()), fields


def reestimate(decided: list[tuple[str, str, dict]]) -> dict[tuple[str, str], tuple[float, float, int, int]]:
    """New m/u per (hypothesis.field, level) from reviewed links.

    For a same_patient_different_id link, confirmed means the pair is one person (m side)
    and rejected means it is not (u side); for a different_patient_same_id link, rejected
    means the study does belong (m side of `belongs`) and confirmed that it does not. Each
    distribution is the default one plus the observed counts, the default weighing
    PSEUDO_COUNT pairs, so a handful of reviews nudges rather than overturns it."""
    counts: dict[tuple[str, str, str], list[float]] = {}      # (hyp, field, level) -> [m_n, u_n]
    for kind, status, evidence in decided:
        hypothesis = "same" if kind == "same_patient_different_id" else "belongs"
        match_side = (status == "confirmed") == (hypothesis == "same")
        for field_name, item in (evidence.get("fields") or {}).items():
            level = item.get("level") if isinstance(item, dict) else None
            if field_name not in DEFAULT_MU[hypothesis] or level not in DEFAULT_MU[hypothesis][field_name]:
                continue
            cell = counts.setdefault((hypothesis, field_name, level), [0.0, 0.0])
            cell[0 if match_side else 1] += 1
    out = {}
    for hypothesis, fields in DEFAULT_MU.items():
        for field_name, levels in fields.items():
            m_total = sum(counts.get((hypothesis, field_name, lvl), [0, 0])[0] for lvl in levels)
            u_total = sum(counts.get((hypothesis, field_name, lvl), [0, 0])[1] for lvl in levels)
            if m_total == 0 and u_total == 0:
                continue
            for level, (m0, u0) in levels.items():
                m_n, u_n = counts.get((hypothesis, field_name, level), [0.0, 0.0])
                m = (m0 * PSEUDO_COUNT + m_n) / (PSEUDO_COUNT + m_total)
                u = (u0 * PSEUDO_COUNT + u_n) / (PSEUDO_COUNT + u_total)
                out[(f"{hypothesis}.{field_name}", level)] = (m, u, int(m_n), int(u_n))
    return out


# ----- helpers -------------------------------------------------------------------------

def valid_date(value: str | None) -> bool:
    return (bool(value) and len(value) == 8 and value.isdigit() and "01" <= value[4:6] <= "12"
            and "01" <= value[6:8] <= "31" and value not in PLACEHOLDER_DATES)


def _age_years(age: str | None) -> int | None:
    if not age or len(age) != 4 or not age[:3].isdigit():
        return None
    value, unit = int(age[:3]), age[3].upper()
    return {"Y": value, "M": value // 12, "W": value // 52, "D": value // 365}.get(unit)
