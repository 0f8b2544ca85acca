"""Synthetic persons: true demographics, sibling (hard-negative) structure, registration noise.

The anatomy of a person is drawn by each modality's renderer from
``person_draw(seed, person, modality)``: a :class:`~synth.common.Draw` keyed by
the person (so it is identical at every visit) and, for a sibling, blended with the
parent's stream so the sibling's anatomy is a small perturbation of the parent's.
"""
from __future__ import annotations

import datetime as dt
import unicodedata
from dataclasses import asdict, dataclass, field

from .common import Draw, rng_for

MALE = ["James", "John", "Robert", "Michael", "William", "David", "Richard", "Thomas", "Daniel",
        "Matthew", "Anthony", "Mark", "Paul", "Steven", "Andrew", "Joshua", "Kevin", "Brian",
        "George", "Edward", "Ronald", "Timothy", "Jason", "Jeffrey", "Ryan", "Jacob", "Gary",
        "Nicholas", "Eric", "Jonathan", "Stephen", "Larry", "Justin", "Scott", "Frank", "Peter",
        "Jose", "Luis", "Carlos", "Juan", "Ahmed", "Omar", "Mohammed", "Wei", "Hiroshi", "Raj",
        "Arjun", "Lars", "Jörg", "Søren", "Pierre", "François", "Giovanni", "Marco", "Ivan",
        "Dmitri", "Kwame", "Tunde", "Mateo", "Noah"]
FEMALE = ["Mary", "Patricia", "Jennifer", "Linda", "Elizabeth", "Barbara", "Susan", "Jessica",
          "Sarah", "Karen", "Lisa", "Nancy", "Betty", "Margaret", "Sandra", "Ashley", "Emily",
          "Donna", "Michelle", "Carol", "Amanda", "Melissa", "Deborah", "Stephanie", "Rebecca",
          "Sharon", "Laura", "Cynthia", "Kathleen", "Amy", "Anna", "Maria", "Sofia", "Lucia",
          "Fatima", "Aisha", "Mei", "Yuki", "Priya", "Ananya", "Ingrid", "Björk", "Zoë",
          "Chloé", "Hélène", "Giulia", "Olga", "Natalia", "Amara", "Ngozi", "Valentina", "Emma"]
FAMILY = ["Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis",
          "Rodriguez", "Martinez", "Hernandez", "Lopez", "Gonzalez", "Wilson", "Anderson",
          "Thomas", "Taylor", "Moore", "Jackson", "Martin", "Lee", "Perez", "Thompson", "White",
          "Harris", "Sanchez", "Clark", "Ramirez", "Lewis", "Robinson", "Walker", "Young",
          "Allen", "King", "Wright", "Scott", "Torres", "Nguyen", "Hill", "Flores", "Green",
          "Adams", "Nelson", "Baker", "Hall", "Rivera", "Campbell", "Mitchell", "Carter",
          "Roberts", "Müller", "Schmidt", "Schneider", "Fischer", "Weber", "Jürgens", "Meyer",
          "Wagner", "Becker", "Hoffmann", "Núñez", "García", "Peña", "Ibáñez", "Dubois",
          "Lefèvre", "Rossi", "Russo", "Bianchi", "Kowalski", "Nowak", "Novák", "Dvořák",
          "Ivanov", "Petrov", "Kim", "Park", "Chen", "Wang", "Zhang", "Liu", "Tanaka", "Suzuki",
          "Sato", "Patel", "Shah", "Singh", "Kumar", "Okafor", "Mensah", "Haddad", "Nasser",
          "Andersen", "Nielsen", "Eriksson", "Lindqvist", "O'Brien", "McDonald", "van der Berg",
          "De Jong"]

SITE_ISSUERS = ["SITE_A", "SITE_B", "SITE_C", "SITE_D", "SITE_E", "SITE_F"]
# Per-site registration conventions: character set, upper-casing of names.
SITE_STYLE = [
    {"charset": "ISO_IR 192", "upper": False},
    {"charset": None, "upper": True},
    {"charset": "ISO_IR 192", "upper": True},
    {"charset": None, "upper": False},
    {"charset": "ISO_IR 192", "upper": False},
    {"charset": None, "upper": True},
]

EPOCH = dt.date(2012, 1, 1)


@dataclass
class Person:
    index: int
    person_id: str
    sex: str
    family: str
    given: str
    middle: str
    birth_date: str          # YYYYMMDD, the truth
    home_site: int
    first_visit: str         # YYYYMMDD of the person's first imaging episode
    sibling_of: str | None = None
    twin: bool = False
    sibling_weight: float = 1.0
    patient_ids: dict = field(default_factory=dict)   # issuer -> ID, filled by the planner

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("index")
        return d


def ymd(d: dt.date) -> str:
    return d.strftime("%Y%m%d")


def parse_ymd(s: str) -> dt.date:
    return dt.datetime.strptime(s, "%Y%m%d").date()


def make_persons(seed: int, n: int, n_sites: int, twin_rate: float) -> list[Person]:
    """Draw ``n`` persons; a fraction ``twin_rate`` are siblings (hard negatives) of earlier ones."""
    persons: list[Person] = []
    for i in range(n):
        r = rng_for(seed, "person", i)
        pid = f"P{i + 1:05d}"
        sex = "F" if r.random() < 0.5 else "M"
        given = str(r.choice(FEMALE if sex == "F" else MALE))
        middle = str(r.choice(FEMALE if sex == "F" else MALE))[0] if r.random() < 0.3 else ""
        family = str(r.choice(FAMILY))
        first = EPOCH + dt.timedelta(days=int(r.integers(0, 5 * 365)))
        age = int(r.integers(18, 90))
        birth = first - dt.timedelta(days=age * 365 + int(r.integers(0, 365)))
        home = int(r.integers(0, n_sites))
        p = Person(i, pid, sex, family, given, middle, ymd(birth), home, ymd(first))
        if i > 0 and r.random() < twin_rate:
            parent = persons[int(r.integers(0, i))]
            p.sibling_of = parent.person_id
            p.family = parent.family
            p.home_site = parent.home_site
            p.twin = bool(r.random() < 0.5)
            if p.twin:                          # identical twins: same sex, same birth date
                p.sex = parent.sex
                p.given = str(r.choice(FEMALE if p.sex == "F" else MALE))
            p.sibling_weight = float(r.uniform(0.25, 0.45))
            if p.twin:
                p.birth_date = parent.birth_date
            p.first_visit = ymd(parse_ymd(parent.first_visit) + dt.timedelta(days=int(r.integers(-200, 200))))
        persons.append(p)
    return persons


def person_draw(seed: int, persons: list[Person], person: Person, modality: str) -> Draw:
    """The stable anatomy stream of ``person`` for ``modality`` (sibling-blended)."""
    own = ("anatomy", person.person_id, modality)
    if person.sibling_of is None:
        return Draw.keyed(seed, own)
    root = person
    by_id = {p.person_id: p for p in persons}
    while root.sibling_of is not None:       # siblings of siblings share the family root
        root = by_id[root.sibling_of]
    return Draw.keyed(seed, own, ("anatomy", root.person_id, modality), person.sibling_weight)


def age_years(birth: str, on: str) -> int:
    b, d = parse_ymd(birth), parse_ymd(on)
    return d.year - b.year - ((d.month, d.day) < (b.month, b.day))


def dicom_age(birth: str, on: str) -> str:
    return f"{max(0, min(age_years(birth, on), 999)):03d}Y"


def strip_diacritics(s: str) -> str:
    s = s.replace("ø", "o").replace("Ø", "O").replace("ß", "ss")
    return "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c))


def typo(s: str, r) -> str:
    """One keyboard-style error: swap, drop, double or substitute a letter."""
    if len(s) < 3:
        return s + s[-1]
    i = int(r.integers(1, len(s) - 1))
    kind = int(r.integers(0, 4))
    if kind == 0:
        return s[:i] + s[i + 1] + s[i] + s[i + 2:]
    if kind == 1:
        return s[:i] + s[i + 1:]
    if kind == 2:
        return s[:i] + s[i] + s[i:]
    sub = "aeiouyrnst"[int(r.integers(0, 10))]
    return s[:i] + (sub if sub != s[i].lower() else "e") + s[i + 1:]


def registered_demographics(person: Person, site: int, r, boost: float = 1.0) -> dict:
    """Demographics as a registration clerk at ``site`` entered them, with noise kinds applied."""
    style = SITE_STYLE[site % len(SITE_STYLE)]
    family, given, middle = person.family, person.given, person.middle
    birth, sex = person.birth_date, person.sex
    noise = []
    if r.random() < 0.04 * boost:
        family = typo(family, r)
        noise.append("typo_family_name")
    if r.random() < 0.04 * boost:
        given = typo(given, r)
        noise.append("typo_given_name")
    if middle and r.random() < 0.3:
        middle = ""
        noise.append("missing_middle_name")
    if style["charset"] is None:
        f2, g2 = strip_diacritics(family), strip_diacritics(given)
        if (f2, g2) != (family, given):
            noise.append("diacritics_stripped")
        family, given = f2, g2
    if style["upper"]:
        family, given, middle = family.upper(), given.upper(), middle.upper()
    parts = [family, given] + ([middle] if middle else [])
    if r.random() < 0.03 * boost:
        parts[0], parts[1] = parts[1], parts[0]
        noise.append("swapped_name_order")
    if r.random() < 0.05 * boost:
        birth = ""
        noise.append("missing_birth_date")
    elif int(birth[6:8]) <= 12 and birth[4:6] != birth[6:8] and r.random() < 0.02 * boost:
        birth = birth[:4] + birth[6:8] + birth[4:6]
        noise.append("birth_date_day_month_swapped")
    if r.random() < 0.01 * boost:
        sex = ""
        noise.append("missing_sex")
    return {"name": "^".join(parts), "birth_date": birth, "sex": sex,
            "charset": style["charset"], "noise": noise}


def id_format(site: int, number: int) -> str:
    """Site-specific Patient ID formats (distinct per site so IDs never collide across sites)."""
    fmt = ["A{:07d}", "{:08d}", "C-{:06d}", "D{:07d}", "E-{:07d}", "F{:06d}"][site % 6]
    return fmt.format(number)


class IdAllocator:
    """Unique random Patient IDs per site, deterministic in the order they are requested."""

    def __init__(self, seed: int):
        self.seed = seed
        self.used: dict[int, set] = {}
        self.count: dict[int, int] = {}

    def new(self, site: int) -> str:
        used = self.used.setdefault(site, set())
        k = self.count.get(site, 0)
        while True:
            r = rng_for(self.seed, "patient-id", site, k)
            k += 1
            number = int(r.integers(1, 999_999))
            if number not in used:
                used.add(number)
                self.count[site] = k
                return id_format(site, number)
