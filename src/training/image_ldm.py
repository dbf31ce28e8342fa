"""Training the mini recipe's image LDM (moved to :mod:`melfusion.backbones.sd_training`, beside the Stable
Diffusion feature source it trains; these names stay importable from here)."""

from ..backbones.sd_training import (
    copy_image_model,
    image_vae_config,
    load_images,
    train_image_unet,
    train_image_vae,
)

__all__ = ["load_images", "train_image_vae", "train_image_unet", "copy_image_model", "image_vae_config"]
