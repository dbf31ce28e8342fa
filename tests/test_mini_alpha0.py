"""The shipped mini model with every synapse weight forced to 0: the image-only attributes fall to chance
(within 2 standard errors) on the generalisation rows of tests/test_mini.py, and the caption's stay."""

import pytest

import melfusion as mf
from test_mini import CAPTION_MIN, CONTROL_BAND, heldout_manifest, score


@pytest.fixture(scope="module")
def forced(tmp_path_factory):
    model = mf.MelFusion.from_pretrained("mini")
    return score(model, heldout_manifest(tmp_path_factory.mktemp("heldout")), alpha=0.0)


@pytest.mark.parametrize("attribute", ["register", "tempo"])
def test_alpha_zero_loses_the_image_only_attributes(forced, attribute):
    low, high = CONTROL_BAND
    assert low <= forced.accuracy[attribute] <= high, forced.accuracy


def test_alpha_zero_keeps_the_caption_attributes(forced):
    assert forced.accuracy["instrument"] >= CAPTION_MIN and forced.accuracy["mood"] >= CAPTION_MIN, forced.accuracy
