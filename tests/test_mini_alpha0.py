"""The shipped mini model with every synapse weight forced to 0: the image-only attributes fall to about chance
(the other half of tests/test_mini.py's must-show, in its own file so the two run on separate workers)."""

import pytest

import melfusion as mf
from melfusion.datasets.synthetic import write_synthetic_manifest
from melfusion.metrics.synthetic import score_synthetic
from test_mini import CONTROL_MAX, HELDOUT_ROWS, STEPS


@pytest.fixture(scope="module")
def forced(tmp_path_factory):
    manifest = write_synthetic_manifest(tmp_path_factory.mktemp("heldout"), n=HELDOUT_ROWS, seed=1000, start=100_000)
    model = mf.MelFusion.from_pretrained("mini")
    return score_synthetic(model, manifest, alpha=0.0, num_inference_steps=STEPS, batch_size=48, progress=False)


@pytest.mark.parametrize("attribute", ["register", "tempo"])
def test_alpha_zero_loses_the_image_only_attributes(forced, attribute):
    assert forced.accuracy[attribute] <= CONTROL_MAX, forced.accuracy


def test_alpha_zero_keeps_the_caption_attributes(forced):
    assert forced.accuracy["instrument"] >= 0.9 and forced.accuracy["mood"] >= 0.9, forced.accuracy
