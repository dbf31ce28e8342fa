"""Shared fixtures: tiny seeded diffusers UNets; the hub is off for every test."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# one thread, chosen before torch starts: torch.set_num_threads(1) alone, after start-up, selects other CPU
# kernels on some processors (AVX-512) than a process started with one thread, and the subprocess tests compare
# their files byte for byte with ones made in this process
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from hypothesis import settings  # noqa: E402

torch.set_num_threads(1)

# Property tests draw the same examples on every run ("seeded"), so CI cannot fail on a draw that the last
# run did not make. HYPOTHESIS_PROFILE=explore draws new ones each run, for looking for counterexamples.
settings.register_profile("seeded", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "seeded"))


def make_unet(seed: int = 0, cross_attention_dim: int = 16, in_channels: int = 4) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


@pytest.fixture
def unet() -> UNet2DConditionModel:
    return make_unet()


@pytest.fixture(scope="session")
def tiny_model():
    import melfusion as mf

    torch.manual_seed(0)
    return mf.MelFusion.from_config(mf.MelFusionConfig.preset("tiny"))
