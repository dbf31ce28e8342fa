"""A music denoiser from outside melfusion: plain torch (no diffusers model), written against
``melfusion.interfaces`` alone, registered from this file, composed with the synapse, sampled and trained.

It is a small flow-matching transformer on mel latents: the mel image is cut into 4 x 4 patches, each block
has a cross-attention over the text whose keys and values pass through the synapse's hook, and the model
predicts the velocity ``noise - x0`` (the ``flow`` noise-schedule family, sampled with diffusers'
FlowMatchEulerDiscreteScheduler). Walked through in docs/extending.md.

Run it::

    python examples/custom_denoiser.py            # generate a clip with and without the image, train 1 step
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import melfusion as mf
from melfusion.interfaces import KVHook, LayerInfo, MusicDenoiser, NoiseSchedule
from melfusion.registry import register


class CrossAttention(nn.Module):
    """Queries from the music tokens, keys/values from the text; the synapse hook sees the keys and values."""

    def __init__(self, name: str, width: int, text_dim: int, heads: int):
        super().__init__()
        self.name, self.heads, self.head_dim = name, heads, width // heads
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(text_dim, width), nn.Linear(text_dim, width)
        self.out = nn.Linear(width, width)
        self.hook: KVHook | None = None

    def split(self, x: torch.Tensor) -> torch.Tensor:  # (b, n, width) -> (b, heads, n, head_dim)
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, text: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self.split(self.q(x)), self.split(self.k(text)), self.split(self.v(text))
        if self.hook is not None:
            k, v = self.hook(self.name, k, v)  # the whole contract between a denoiser and the synapse
        bias = None
        if mask is not None and mask.shape[-1] == k.shape[2]:
            # rows with no text at all (the unconditional guidance row) attend to everything, as zeros would
            keep = mask[:, None, None, :] | ~mask.any(dim=-1)[:, None, None, None]
            bias = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill(~keep, float("-inf"))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.out(y.transpose(1, 2).reshape(x.shape))


class Block(nn.Module):
    def __init__(self, name: str, width: int, text_dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = CrossAttention(name, width, text_dim, heads)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x, text, mask):
        x = x + self.attn(self.norm1(x), text, mask)
        return x + self.mlp(self.norm2(x))


class _Hooked:
    """What install_synapse returns: ``remove()`` takes the hook off every layer it was set on."""

    def __init__(self, layers: list[CrossAttention]):
        self.layers = layers

    def remove(self) -> None:
        for layer in self.layers:
            layer.hook = None


@register("denoiser", "plain_torch_flow")
class PlainTorchFlowDenoiser(MusicDenoiser):
    """A patch transformer on ``(batch, 1, frames, mels)`` mel latents, trained by flow matching."""

    patch = 4

    def __init__(self, width: int = 32, heads: int = 4, depth: int = 2, text_dim: int = 32, mels: int = 64,
                 weights: bool = True, device=None, dtype=None):
        super().__init__()  # weights/device/dtype: the build arguments every part receives
        self.width, self.mels = width, mels
        self.embed = nn.Conv2d(1, width, self.patch, stride=self.patch)
        self.time = nn.Sequential(nn.Linear(32, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(Block(f"blocks.{i}.attn", width, text_dim, heads) for i in range(depth))
        self.unembed = nn.ConvTranspose2d(width, 1, self.patch, stride=self.patch)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    # -- the synapse's view ---------------------------------------------------------------------
    @property
    def layers(self) -> list[LayerInfo]:
        n = len(self.blocks)
        return [LayerInfo(b.attn.name, b.attn.heads, b.attn.head_dim, depth=i / max(1, n - 1))
                for i, b in enumerate(self.blocks)]

    def probe_layers(self, names: Sequence[str], latent_shape: Sequence[int]) -> list[LayerInfo]:
        by_name = {info.name: info for info in self.layers}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ValueError(f"layers: {unknown} are not attention layers of this denoiser ({sorted(by_name)})")
        return [by_name[n] for n in names]  # cross-attention over text: the key count is the text's

    def install_synapse(self, hook: KVHook, layers: Sequence[str]) -> _Hooked:
        chosen = [b.attn for b in self.blocks if b.attn.name in set(layers)]
        for layer in chosen:
            layer.hook = hook
        return _Hooked(chosen)

    # -- shapes and schedule ----------------------------------------------------------------------
    @property
    def noise_schedule(self) -> NoiseSchedule:
        return NoiseSchedule.flow()

    @property
    def in_channels(self) -> int:
        return 1

    def latent_shape(self, codec_shape: Sequence[int], round_up: bool = True) -> tuple[int, ...]:
        channels, frames, mels = (int(n) for n in codec_shape)
        if mels != self.mels or channels != 1:
            raise ValueError(f"codec: expected (1, frames, {self.mels}) mel latents, got {tuple(codec_shape)}")
        frames = -(-frames // self.patch) * self.patch if round_up else frames - frames % self.patch
        if frames <= 0:
            raise ValueError("seconds: the clip is too short for this model")
        return channels, frames, mels

    # -- the model ---------------------------------------------------------------------------------
    def forward(self, latents, timestep, text, text_mask=None, timing=None):
        b = latents.shape[0]
        t = torch.as_tensor(timestep, device=latents.device, dtype=torch.float32).reshape(-1).expand(b)
        freqs = torch.exp(-math.log(10_000) * torch.arange(16, device=latents.device) / 16)
        angles = (t / 1000.0)[:, None] * 1000.0 * freqs[None]
        temb = self.time(torch.cat([angles.sin(), angles.cos()], dim=-1).to(latents.dtype))
        x = self.embed(latents)  # (b, width, frames / p, mels / p)
        h, w = x.shape[2:]
        x = x.flatten(2).transpose(1, 2) + temb[:, None]
        for block in self.blocks:
            x = block(x, text.to(x.dtype), text_mask)
        return self.unembed(x.transpose(1, 2).reshape(b, self.width, h, w))

    # -- persistence ---------------------------------------------------------------------------------
    def save_weights(self, folder) -> str:
        from safetensors.torch import save_model

        target = Path(folder) / "denoiser"
        target.mkdir(parents=True, exist_ok=True)
        save_model(self, str(target / "model.safetensors"))
        return "denoiser"

    def load_weights(self, folder) -> None:
        from safetensors.torch import load_model

        file = Path(folder) / "denoiser" / "model.safetensors"
        if not file.is_file():
            raise OSError(f"model: missing weights file {str(file)!r}")
        try:
            load_model(self, str(file), device=str(self.device))
        except Exception as exc:
            raise OSError(f"model: cannot load {str(file)!r} ({exc})") from None


def config() -> mf.MelFusionConfig:
    """The tiny preset with this denoiser as the music model (the tiny SD image side, the tiny T5 text)."""
    data = mf.MelFusionConfig.preset("tiny").model_dump()
    data["name"] = "plain_torch_flow"
    data["denoiser"] = {"name": "plain_torch_flow", "params": {"width": 32, "heads": 4, "depth": 2}}
    # SD's 64-wide image keys onto this model's 32-wide ones: a learned projection
    data["synapse"]["aligner"] = {"name": "linear"}
    data["sampling"]["num_inference_steps"] = 6
    return mf.MelFusionConfig.model_validate(data)


def main(workdir: str | Path | None = None) -> dict:
    torch.manual_seed(0)
    model = mf.MelFusion.from_config(config())
    image = Path(__file__).parent / "images" / "blue-bright.png"
    with_image = model.generate(image=image, text="a calm flute melody", seed=0, progress=False)
    text_only = model.generate(image=None, text="a calm flute melody", seed=0, progress=False)
    print(f"generated {with_image.waveforms.shape} at {with_image.sample_rate} Hz with "
          f"{type(model.make_scheduler()).__name__}; the image changed the audio by "
          f"{abs(with_image.waveforms - text_only.waveforms).max():.4f} (max abs)")

    from melfusion.datasets import write_toy_manifest
    from melfusion.training import TrainConfig, Trainer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workdir) if workdir is not None else Path(tmp)
        manifest = write_toy_manifest(root / "toy", n=4, seconds=1.28)
        train_cfg = TrainConfig.model_validate({
            "model": config().model_dump(), "output": str(root / "run"), "data": {"manifest": str(manifest)},
            "max_steps": 1, "batch_size": 2, "mode": "synapse+unet", "progress": False, "tensorboard": False,
            "plot": False})
        result = Trainer(train_cfg).train()
        print(f"trained {result.step} step(s): loss {result.losses[-1]:.4f}; model in {result.model_path}")
        loaded = mf.MelFusion.from_pretrained(result.model_path)
        again = loaded.generate(image=image, text="a calm flute melody", seed=0, progress=False)
        return {"with_image": with_image, "text_only": text_only, "losses": result.losses, "reloaded": again}


if __name__ == "__main__":
    main()
