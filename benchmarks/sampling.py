"""Sampling wall time: text-only vs the released code's image features vs ours (feature cache).

    python benchmarks/sampling.py                       # tiny and mid CPU configurations
    python benchmarks/sampling.py --configs mid --steps 50 --repeats 3
    python benchmarks/sampling.py --configs full --device cuda --dtype bfloat16 --steps 200   # on a GPU

For each configuration, at the same number of denoising steps and batch (one
prompt, one sample, classifier-free guidance):

- (a) text only: the same denoiser, no image;
- (b) the released code's way: the image UNet re-run at every step on the
  guidance-doubled batch (forward-noised image latent at that step), its
  keys/values copied to the host and back, then aligned;
- (c) ours, with each image-feature option: the paper-faithful default
  (DDIM inversion then the reverse pass, every sampling step: 2 image-UNet
  evaluations per step), capture during inversion only (1 per step), and a
  coarser image grid (``image_steps``: k image-UNet evaluations for the whole
  clip); "new" is a first call for an image, "cached" a repeat call that finds
  the image's features in ``model.feature_cache``.

Timed: ``MelFusion.generate`` without the vocoder (a no-op vocoder replaces it,
so the constant vocoder cost does not dilute the ratios); weights are random
(no downloads), which does not change the cost. Each figure is the median of
``--repeats`` runs after one warm-up. The effect of a coarser image grid on the
output is measured as the mel-spectrogram RMS difference from the
paper-faithful output, relative to how far the paper-faithful output is from
the text-only one (the size of the image's effect); alpha is set to 0.5.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow running from a clone without installing
    sys.path.insert(0, str(ROOT))

import melfusion as mf  # noqa: E402
from melfusion.synapse.features import FeatureCache  # noqa: E402
from melfusion.synapse.install import capture  # noqa: E402


def _unet(channels, head_dim, in_channels, cross_dim, sample):
    n = len(channels)
    return {
        "block_out_channels": list(channels),
        "layers_per_block": 1,
        # attention on the two lower resolutions only (the full-resolution level is convolutional)
        "down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (n - 1),
        "up_block_types": ["CrossAttnUpBlock2D"] * (n - 1) + ["UpBlock2D"],
        "attention_head_dim": [c // head_dim for c in channels],  # heads per block, from a fixed head size
        "cross_attention_dim": cross_dim,
        "norm_num_groups": 16,
        "in_channels": in_channels,
        "out_channels": in_channels,
        "sample_size": sample,
    }


def config(name: str) -> mf.MelFusionConfig:
    """``tiny``: the tiny preset. ``mid``: the same UNet shape on both sides with the paper's proportions: a
    384 px image gives a 96x96 latent (9216 positions; attention over 2304 and 576 tokens, as SD 2.1's
    up_blocks 2 and 1 see), 0.64 s of music a 64x64 mel (4096 positions, as Tango's 256x16 latent).
    ``full``: the paper preset (SD 2.1 + Tango sizes) with random weights."""
    if name == "tiny":
        return mf.MelFusionConfig.preset("tiny")
    if name == "full":
        return mf.MelFusionConfig.preset("paper")
    if name != "mid":
        raise ValueError(f"--configs: unknown configuration {name!r}")
    cfg = mf.MelFusionConfig.preset("tiny").to_dict()
    channels = [32, 64, 128]
    cfg["name"] = "mid"
    cfg["feature_source"]["params"] = {"unet": {"config": _unet(channels, 32, 4, 64, 96)},
                                       "vae": {"config": "tiny"}, "resolution": 384}
    cfg["denoiser"]["params"] = {"unet": {"config": _unet(channels, 32, 1, 64, [64, 64])}}
    cfg["text_encoder"]["params"] = {"config": {"vocab_size": 384, "d_model": 64, "d_kv": 16, "d_ff": 128,
                                                "num_layers": 2, "num_heads": 4, "dropout_rate": 0.0,
                                                "decoder_start_token_id": 0, "pad_token_id": 0,
                                                "eos_token_id": 1}}
    cfg["sampling"]["seconds"] = 0.64
    return mf.MelFusionConfig.model_validate(cfg)


class _NoVocoder:
    """Returns silence of the right length: keeps the vocoder's constant cost out of the ratios."""

    def __init__(self, sample_rate, hop):
        self.sample_rate, self.hop = sample_rate, hop

    def __call__(self, mel):
        frames = mel.shape[-2]
        return torch.zeros(mel.shape[0], frames * self.hop)


class _ReleasedWayFeatures:
    """What the released code does per step: image UNet on the guidance-doubled batch, host round trip."""

    def __init__(self, model, images, tokens_and_grids):
        self.model, self.fs = model, model.feature_source
        self.latents = self.fs.encode(images)
        self.tokens, self.grids = tokens_and_grids
        gen = torch.Generator(device="cpu").manual_seed(0)
        self.noise = torch.randn(self.latents.shape, generator=gen).to(self.latents.device, self.latents.dtype)

    def at(self, t):
        fs, t = self.fs, int(t)
        a = fs.alphas_cumprod[t].to(self.latents.device, torch.float32)
        x = (a.sqrt() * self.latents.float() + (1 - a).sqrt() * self.noise.float()).to(fs.dtype)
        x = torch.cat([x, x])  # the guidance-doubled batch
        context = fs._context(x.shape[0])
        handle = capture(fs.unet, fs.layer_names, which="attn1")
        try:
            fs.unet(x, t, encoder_hidden_states=context)
            records = {k: (kk.cpu(), vv.cpu()) for k, (kk, vv) in handle.records.items()}  # to the host ...
        finally:
            handle.remove()
        device = self.latents.device
        records = {k: (kk[:1].to(device), vv[:1].to(device)) for k, (kk, vv) in records.items()}  # ... and back
        step = FeatureCache()
        step.add(t, records)
        return self.model.synapse.align(step, self.tokens, self.grids).at(t)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _time(fn, repeats, device):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(name, steps, repeats, device, dtype, image_steps):
    torch.manual_seed(0)
    cfg = config(name)
    weights = name != "full"  # full size: random weights, the architecture from the shipped configs
    model = mf.MelFusion.from_config(cfg, weights=weights, device=None if device == "cpu" else device, dtype=dtype)
    model.vocoder = _NoVocoder(cfg.sample_rate, cfg.hop_length)
    with torch.no_grad():
        model.synapse.mixer.fill_(0.5)
    image = torch.rand(3, 96, 96, generator=torch.Generator().manual_seed(0))
    counter = [0]

    def fresh_image():  # a new image for every "new" call, so the feature cache cannot help
        counter[0] += 1
        return torch.rand(3, 96, 96, generator=torch.Generator().manual_seed(1000 + counter[0]))

    kw = dict(text="a calm piano melody", num_inference_steps=steps, progress=False, seed=0)
    rows = {}
    rows["a text only"] = _time(lambda: model.generate(image=None, **kw), repeats, device)

    original = model.image_features

    def released(images, timesteps, text_tokens, mode=None, latent_hw=None):
        return _ReleasedWayFeatures(model, images, model.music_tokens(text_tokens, latent_hw))
    # one image-UNet evaluation (batch 1) against one music step (the guidance-doubled batch)
    fs, den = model.feature_source, model.denoiser
    lat = fs.encode(image[None].to(model.device))
    ctx = fs._context(1)
    t = torch.tensor(500, device=model.device)
    with torch.no_grad():
        image_eval = _time(lambda: fs.unet(lat, t, encoder_hidden_states=ctx), repeats, device)
        emb, mask = model.text_encoder(["a calm piano melody", ""])
        emb = emb.to(model.device, den.unet.dtype)
        frames = int(round(cfg.sampling.seconds * cfg.sample_rate / cfg.hop_length))
        down = getattr(model.codec, "downsample", 1)
        x = torch.randn(2, den.in_channels, frames // down, cfg.n_mels // down, device=model.device,
                        dtype=den.unet.dtype)
        music_step = _time(lambda: den(x, t, emb, mask), repeats, device)
    cost = image_eval / music_step

    model.image_features = released
    try:
        rows["b released code's way"] = _time(lambda: model.generate(image=fresh_image(), **kw), repeats, device)
    finally:
        model.image_features = original

    options = [("reverse", None), ("inversion", None), ("inversion", image_steps)]
    outputs = {}
    for mode, k in options:
        model.config.synapse.image_trajectory = mode
        label = f"c ours: {mode}, image_steps={k or steps}"
        rows[label + " (new image)"] = _time(lambda k=k: model.generate(image=fresh_image(), image_steps=k, **kw),
                                             repeats, device)
        model.generate(image=image, image_steps=k, **kw)
        rows[label + " (cached)"] = _time(lambda k=k: model.generate(image=image, image_steps=k, **kw),
                                          repeats, device)
        outputs[(mode, k)] = torch.from_numpy(model.generate(image=image, image_steps=k, **kw).mel)
    model.config.synapse.image_trajectory = "reverse"
    text_only = torch.from_numpy(model.generate(image=None, **kw).mel)
    faithful = outputs[("reverse", None)]
    effect = (faithful - text_only).pow(2).mean().sqrt().item()
    deviations = {key: (out - faithful).pow(2).mean().sqrt().item() / max(effect, 1e-12)
                  for key, out in outputs.items()}
    return model, rows, deviations, cost


def report(name, steps, rows, deviations, image_steps):
    a = rows["a text only"]
    b = rows["b released code's way"]
    print(f"\n## {name}: {steps} steps")
    print(f"{'run':58s} {'seconds':>8s} {'x text-only':>11s}")
    for label, sec in rows.items():
        print(f"{label:58s} {sec:8.3f} {sec / a:11.2f}")
    best_new = min(v for k, v in rows.items() if k.startswith("c") and "new" in k)
    best_cached = min(v for k, v in rows.items() if k.startswith("c") and "cached" in k)
    faithful_new = rows[f"c ours: reverse, image_steps={steps} (new image)"]
    print(f"b/c (paper-faithful, new image) = {b / faithful_new:.2f}   "
          f"c/a new image = {best_new / a:.2f} (target <= 1.35)   c/a cached = {best_cached / a:.2f} "
          "(target <= 1.05)")
    print("output change vs the paper-faithful features, relative to the image's effect: "
          + ", ".join(f"{m} k={k or steps}: {d:.3f}" for (m, k), d in deviations.items()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="tiny,mid", help="comma list of tiny, mid, full")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--image-steps", type=int, default=None, help="coarse image grid (default: steps // 10)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    image_steps = args.image_steps or max(2, args.steps // 10)
    dtype = None if args.dtype == "float32" else getattr(torch, args.dtype)
    print(f"melfusion sampling benchmark: device {args.device}, {args.dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")
    for name in args.configs.split(","):
        _, rows, deviations, cost = run(name.strip(), args.steps, args.repeats, args.device, dtype, image_steps)
        report(name.strip(), args.steps, rows, deviations, image_steps)
        print(f"one image-UNet evaluation (batch 1) costs {cost:.2f} music steps (guidance batch of 2); "
              "paper sizes by FLOPs: 2.15 / (2 x 0.80) = 1.34")
    return 0


if __name__ == "__main__":
    sys.exit(main())
