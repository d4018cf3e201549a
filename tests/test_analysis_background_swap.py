"""The synthetic renderer draws a sample's own object on any background, exactly: the ground truth of the
interventional reliance test (analysis.interventions)."""

from __future__ import annotations

import numpy as np
import pytest

from ex2l_xai.data import BACKGROUNDS, get_dataset
from ex2l_xai.errors import DataError


@pytest.fixture(scope="module")
def ds():
    return get_dataset("synthetic", "test", challenge="m2m_hard", image_size=48, per_group=4, test_per_group=6)


def test_own_background_reproduces_the_sample(ds) -> None:
    for i in range(0, len(ds), 5):
        img, mask = ds.render_on_background(i, int(ds.confounders[i]))
        s = ds[i]
        np.testing.assert_array_equal(img, s["image"].numpy())
        np.testing.assert_array_equal(mask, s["mask"][0].numpy() > 0.5)


def test_same_object_pixel_for_pixel_on_every_background(ds) -> None:
    for i in (0, 7, len(ds) - 1):
        own = ds[i]
        inside = own["mask"][0].numpy() > 0.5
        assert 0.02 < inside.mean() < 0.3
        for b in range(len(BACKGROUNDS)):
            img, mask = ds.render_on_background(i, b)
            np.testing.assert_array_equal(mask, inside)  # the object's footprint does not move
            np.testing.assert_array_equal(img[:, inside], own["image"].numpy()[:, inside])
            alone, empty = ds.render_on_background(i, b, draw_object=False)
            assert not empty.any()
            # outside the mask the swapped image IS that background; inside, the background alone differs
            np.testing.assert_array_equal(img[:, ~inside], alone[:, ~inside])
            assert np.abs(img[:, inside] - alone[:, inside]).mean() > 0.05
            assert alone.dtype == np.float32 and np.abs(alone * 255 - np.round(alone * 255)).max() < 1e-3
        # different backgrounds really differ outside the object
        a, _ = ds.render_on_background(i, 0)
        b, _ = ds.render_on_background(i, 4)
        assert np.abs(a[:, ~inside] - b[:, ~inside]).mean() > 0.1


def test_render_on_background_rejects_unknown_background(ds) -> None:
    with pytest.raises(DataError, match="background=6"):
        ds.render_on_background(0, 6)
