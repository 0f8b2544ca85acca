"""Per-route MONAI normalization chains, the enhancement switches and the router thumbnail."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from models.inference.loading import load_series
from models.inference.transforms import (CLAHE, ENHANCEMENTS, ROUTE_INPUTS, ROUTE_TRANSFORMS, OrientRAS,
                                         ResampleToSpacing, build_route_transforms, clahe_2d, router_thumbnail)
from tests.test_models_loading import make_cohort


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> dict:
    cohort = make_cohort(tmp_path_factory.mktemp("cohort"), patients=1)
    return {s["route"]: load_series(s["files"]) for s in cohort}


@pytest.mark.parametrize("route", ["chest_xr", "chest_ct", "brain_mr", "fundus", "dermoscopy"])
def test_route_chain_gives_the_declared_network_input(loaded, route):
    out = ROUTE_TRANSFORMS[route](loaded[route].image)
    spec = ROUTE_INPUTS[route]
    assert tuple(out.shape) == (spec["channels"], *spec["shape"])
    assert out.dtype == torch.float32
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0 and float(out.std()) > 0.01


def test_volume_chain_is_ras_at_the_route_spacing(loaded):
    out = ROUTE_TRANSFORMS["chest_ct"](loaded["chest_ct"].image)
    affine = out.affine.numpy()
    assert np.all(np.diag(affine)[:3] > 0) and np.allclose(affine[:3, :3], np.diag(np.diag(affine)[:3]))
    assert np.allclose(np.diag(affine)[:3], [3.0, 3.0, 5.0], rtol=0.1)


def test_orient_ras_keeps_every_voxel_at_its_world_position():
    data = torch.arange(4 * 3 * 2, dtype=torch.float32).reshape(1, 4, 3, 2)
    lps_like = np.array([[0, -2.0, 0, 10], [-1.5, 0, 0, 20], [0, 0, 3.0, -5], [0, 0, 0, 1]])  # axes swapped and flipped
    img = MetaTensor(data, affine=torch.as_tensor(lps_like))
    out = OrientRAS()(img)
    new = out.affine.numpy()
    assert np.all(np.diag(new)[:3] > 0) and np.allclose(new[:3, :3], np.diag(np.diag(new)[:3]))
    for index in np.ndindex(*data.shape[1:]):
        world = lps_like @ np.array([*index, 1.0])
        back = np.linalg.solve(new, world).round().astype(int)[:3]
        assert float(out[(0, *back)]) == float(data[(0, *index)])


def test_resample_to_spacing():
    img = MetaTensor(torch.rand(1, 40, 40, 10), affine=torch.as_tensor(np.diag([1.0, 1.0, 6.0, 1.0])))
    out = ResampleToSpacing((2.0, 2.0, 3.0))(img)
    assert tuple(out.shape) == (1, 20, 20, 20)
    assert np.allclose(out.pixdim.tolist(), [2.0, 2.0, 3.0], rtol=0.02)


def test_channels_are_adapted_to_the_route(loaded):
    gray_to_fundus = ROUTE_TRANSFORMS["fundus"](loaded["chest_xr"].image)
    rgb_to_chest = ROUTE_TRANSFORMS["chest_xr"](loaded["dermoscopy"].image)
    assert gray_to_fundus.shape[0] == 3 and rgb_to_chest.shape[0] == 1


@pytest.mark.parametrize("step", ENHANCEMENTS)
@pytest.mark.parametrize("route", ["chest_xr", "fundus", "chest_ct"])
def test_enhancement_switches_change_the_input_not_its_shape(loaded, route, step):
    base = ROUTE_TRANSFORMS[route](loaded[route].image)
    enhanced = build_route_transforms({route: [step]})[route](loaded[route].image)
    assert enhanced.shape == base.shape
    assert torch.isfinite(enhanced).all() and float(enhanced.min()) >= -1e-6 and float(enhanced.max()) <= 1 + 1e-6
    assert float((enhanced - base).abs().mean()) > 1e-3
    untouched = build_route_transforms({route: [step]})["dermoscopy"](loaded["dermoscopy"].image)
    assert torch.equal(untouched, ROUTE_TRANSFORMS["dermoscopy"](loaded["dermoscopy"].image))


def test_unknown_enhancement_or_route_is_refused():
    with pytest.raises(ValueError, match="unknown enhancement"):
        build_route_transforms({"chest_xr": ["sharpen"]})
    with pytest.raises(ValueError, match="unknown route"):
        build_route_transforms({"knee_xr": ["clahe"]})


def test_clahe_raises_local_contrast_and_stays_in_range():
    rng = np.random.default_rng(0)
    low = 0.45 + 0.05 * rng.random((128, 96))          # a dull image: values in [0.45, 0.5]
    out = clahe_2d(low)
    assert out.shape == low.shape and 0 <= out.min() and out.max() <= 1
    assert out.std() > 3 * low.std()
    flat = clahe_2d(np.full((64, 64), 0.3))
    assert np.isfinite(flat).all()
    colour = CLAHE()(torch.rand(3, 64, 64) * 0.1 + 0.4)
    assert colour.shape == (3, 64, 64)


@pytest.mark.parametrize("route", ["chest_xr", "chest_ct", "brain_mr", "fundus", "dermoscopy"])
def test_router_thumbnail(loaded, route):
    thumb = router_thumbnail(loaded[route])
    assert tuple(thumb.shape) == (3, 64, 64) and thumb.dtype == torch.float32
    assert 0.0 <= float(thumb.min()) and float(thumb.max()) <= 1.0 and float(thumb.std()) > 0.01
    assert torch.equal(thumb, router_thumbnail(loaded[route]))
