"""The turn and zoom views of benchmarks/test_time_views.py (docs/accuracy.md quotes their scores)."""

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "test_time_views.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("test_time_views_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_SCRIPT = _load_script()


def _script():
    return _SCRIPT


def test_no_turn_no_zoom_is_the_input():
    x = torch.randn(2, 1, 8, 8, 5)
    assert torch.allclose(_script()._affine(x), x, atol=1e-5)


def test_a_quarter_turn_rotates_the_first_two_spatial_axes_only():
    x = torch.randn(2, 1, 8, 8, 5)
    turned = _script()._affine(x, degrees=90)
    assert min((turned - torch.rot90(x, k, dims=(2, 3))).abs().max().item() for k in (1, -1)) < 1e-5


def test_zoom_in_magnifies_about_the_centre():
    x = torch.zeros(1, 1, 16, 16, 16)
    x[:, :, 6:10, 6:10, 6:10] = 1.0                    # a centred cube of 4 voxels
    zoomed = _script()._affine(x, zoom=1.5)
    assert zoomed.shape == x.shape
    assert 1.5 ** 3 * 0.8 < zoomed.sum() / x.sum() < 1.5 ** 3 * 1.2
    assert zoomed[0, 0, 8, 8, 8] == 1.0 and zoomed[0, 0, 0, 0, 0] == 0.0


def test_rotzoom_variant_adds_four_views_to_the_shifts():
    module = _script()
    module.register_variant("shifts+rotzoom:3,3")
    from models.networks import TEST_TIME_VIEWS
    views = TEST_TIME_VIEWS.pop("shifts+rotzoom:3,3")(torch.randn(1, 1, 8, 8, 8))
    assert len(views) == 7 + 4
