"""Cohort settings, kept free of numpy/pydicom so the CLI can build its parser cheaply."""
from __future__ import annotations

from dataclasses import dataclass, field

MODALITIES = ["cxr", "ct", "mr", "fundus", "derm"]

PRESETS = {
    "small": dict(cxr_size=128, ct_size=64, ct_slices=16, mr_size=64, mr_slices=16,
                  fundus_size=128, derm_size=128),
    "default": dict(cxr_size=256, ct_size=128, ct_slices=32, mr_size=128, mr_slices=24,
                    fundus_size=256, derm_size=256),
    "large": dict(cxr_size=512, ct_size=256, ct_slices=64, mr_size=256, mr_slices=48,
                  fundus_size=512, derm_size=512),
}


@dataclass
class SynthConfig:
    seed: int = 0
    patients: int = 20
    visits: int = 3
    modalities: list = field(default_factory=lambda: list(MODALITIES))
    error_rate: float = 0.05
    sites: int = 3
    twin_rate: float = 0.1
    nuisance: float = 1.0
    derm_sop: str = "dms"
    cxr_size: int = 256
    ct_size: int = 128
    ct_slices: int = 32
    mr_size: int = 128
    mr_slices: int = 24
    fundus_size: int = 256
    derm_size: int = 256

    def to_json(self) -> dict:
        return dict(self.__dict__)
