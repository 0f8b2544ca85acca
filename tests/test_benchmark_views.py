"""The turn and zoom views of benchmarks/test_time_views.py (docs/accuracy.md quotes their scores)."""

import pytest
import torch

from tests.helpers import load_benchmark

_SCRIPT = load_benchmark("test_time_views")


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


def test_scales_variant_resamples_each_size_and_applies_the_inner_views():
    module = _script()
    from models.networks import TEST_TIME_VIEWS
    module.register_variant("scales:0.857142857,1,1.142857143@dihedral")
    x = torch.randn(2, 3, 28, 28)
    views = TEST_TIME_VIEWS.pop("scales:0.857142857,1,1.142857143@dihedral")(x)
    assert len(views) == 24 and [tuple(v.shape[-2:]) for v in views[::8]] == [(24, 24), (28, 28), (32, 32)]
    assert torch.equal(views[8], x)
    # the card value "dihedral+scales" is the same set in another order
    card = TEST_TIME_VIEWS["dihedral+scales"](x)
    assert sorted(v.sum().item() for v in card) == pytest.approx(sorted(v.sum().item() for v in views), abs=1e-3)
    module.register_variant("scales:0.5,1")
    volumes = TEST_TIME_VIEWS.pop("scales:0.5,1")(torch.randn(1, 1, 8, 10, 6))
    assert [tuple(v.shape[2:]) for v in volumes] == [(4, 5, 3), (8, 10, 6)]
