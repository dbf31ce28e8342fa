"""A synthetic image-text-music world whose music depends on the image and the text in known ways.

Each triplet has four attributes, two that only the image shows and two that only the caption names:

======================  ===========  ==========================================  ================
attribute               shown by     in the music                                classes (chance)
======================  ===========  ==========================================  ================
``register``            brightness   the note's fundamental (220 Hz dark,         2 (50 %)
                                     494 Hz bright)
``tempo``               hue          notes per second (4 for the warm red and     2 (50 %)
                                     yellow, 2 for the cool green and blue)
``instrument``          caption      harmonic profile (flute/clarinet/trumpet)    3 (33 %)
``mood``                caption      articulation (calm legato, lively staccato)  2 (50 %)
======================  ===========  ==========================================  ================

The captions never mention colour or brightness and the pictures never show an instrument or a mood, so a
text-only model cannot know the register or the tempo: that is what makes the image cue measurable.
:func:`read_attributes` recovers all four from a waveform (pitch with YIN, tempo from the onset envelope,
instrument from the harmonic amplitudes, mood from the envelope's duty cycle), so generated audio can be
scored against the ground truth that :func:`write_synthetic_manifest` writes beside the standard manifest.
Everything is drawn from one seeded generator: the same arguments write the same bytes.

The picture itself has two properties, its ``colour`` (one of four hues) and its ``shade`` (dark or
bright); the brightness-to-pitch pairing follows the well-known cross-modal correspondence (brighter is
higher), and the four hues pair up into the two tempos.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .toy import check_positive_ints, check_sizes
from .writing import jpeg_bytes, png_bytes, wav_bytes, write_dataset_folder

__all__ = [
    "COLOURS", "SHADES", "REGISTERS", "TEMPOS", "TEMPO_OF_COLOUR", "INSTRUMENTS", "MOODS", "ATTRIBUTES",
    "IMAGE_ATTRIBUTES", "TEXT_ATTRIBUTES",
    "SyntheticItem", "synthetic_item", "render_image", "render_audio", "write_synthetic_manifest",
    "PICTURE_FAMILIES", "TRAIN_FAMILIES", "HELDOUT_FAMILIES", "HELDOUT_SIZES", "render_picture", "jpeg_bytes",
    "read_attributes", "attribute_accuracy", "CHANCE", "AUGMENT_SATURATION", "check_saturation_range",
]

#: the saturation range augmented training pictures are drawn from unless told otherwise (the shipped model's)
AUGMENT_SATURATION = (0.6, 0.95)

# the picture: colour (name, hue in [0, 1)) and shade (name, HSV value)
COLOURS = (("red", 0.00), ("yellow", 0.16), ("green", 0.36), ("blue", 0.62))
SHADES = (("dark", 0.36), ("bright", 0.92))
# register, set by the shade: (name, fundamental in Hz); a ninth apart, so a pitch read within a few
# semitones still names the right class
REGISTERS = (("low", 220.00), ("high", 493.88))
# tempo, set by the colour: (name, notes per second)
TEMPOS = (("slow", 2.0), ("fast", 4.0))
#: the tempo class of each colour: warm hues fast, cool hues slow
TEMPO_OF_COLOUR = (1, 1, 0, 0)
# instrument: (name, harmonic amplitudes 1f..8f)
INSTRUMENTS = (
    ("flute", (1.0, 0.10, 0.04, 0.02, 0.0, 0.0, 0.0, 0.0)),
    ("clarinet", (1.0, 0.04, 0.60, 0.03, 0.40, 0.02, 0.25, 0.0)),
    ("trumpet", (1.0, 0.85, 0.70, 0.55, 0.45, 0.35, 0.25, 0.20)),
)
# mood: (name, words used in captions, fraction of each beat the note sounds, attack seconds)
MOODS = (
    ("calm", ("calm", "gentle", "peaceful"), 0.8, 0.02),
    ("lively", ("lively", "playful", "bouncy"), 0.3, 0.004),
)
_TEMPLATES = ("a {mood} {instrument} melody", "{mood} {instrument} music", "a {instrument} playing a {mood} tune",
              "{mood} music on the {instrument}")
ATTRIBUTES = ("register", "tempo", "instrument", "mood")
IMAGE_ATTRIBUTES = ("register", "tempo")
TEXT_ATTRIBUTES = ("instrument", "mood")
#: accuracy of guessing, per attribute (the classes are balanced)
CHANCE = {"register": 1 / len(REGISTERS), "tempo": 1 / len(TEMPOS), "instrument": 1 / len(INSTRUMENTS),
          "mood": 1 / len(MOODS)}
_FIRST_ONSET = 0.05  # seconds


@dataclass(frozen=True)
class SyntheticItem:
    """One triplet's ground truth: the picture's colour and shade, the caption's instrument and mood (class
    indices into the tables above), and the caption. ``register`` and ``tempo`` follow from the picture."""

    colour: int
    shade: int
    instrument: int
    mood: int
    caption: str

    @property
    def register(self) -> int:
        return self.shade

    @property
    def tempo(self) -> int:
        return TEMPO_OF_COLOUR[self.colour]

    @property
    def pitch_hz(self) -> float:
        return REGISTERS[self.register][1]

    @property
    def notes_per_second(self) -> float:
        return TEMPOS[self.tempo][1]

    def labels(self) -> dict[str, Any]:
        return {"register": REGISTERS[self.register][0], "pitch_hz": self.pitch_hz,
                "tempo": TEMPOS[self.tempo][0], "notes_per_second": self.notes_per_second,
                "instrument": INSTRUMENTS[self.instrument][0], "mood": MOODS[self.mood][0],
                "colour": COLOURS[self.colour][0], "shade": SHADES[self.shade][0]}


def synthetic_item(index: int, rng: np.random.Generator) -> SyntheticItem:
    """Item ``index``: the attributes cycle through all 48 combinations (balanced); the wording is drawn."""
    combo = index % (len(COLOURS) * len(SHADES) * len(INSTRUMENTS) * len(MOODS))
    colour, combo = combo % len(COLOURS), combo // len(COLOURS)
    shade, combo = combo % len(SHADES), combo // len(SHADES)
    instrument, mood = combo % len(INSTRUMENTS), combo // len(INSTRUMENTS)
    template = _TEMPLATES[rng.integers(len(_TEMPLATES))]
    word = MOODS[mood][1][rng.integers(len(MOODS[mood][1]))]
    caption = template.format(mood=word, instrument=INSTRUMENTS[instrument][0])
    return SyntheticItem(colour, shade, instrument, mood, caption)


def render_image(item: SyntheticItem, size: int, rng: np.random.Generator) -> Image.Image:
    """A field of the item's colour at its shade, with 1-3 discs of a paler tint on it."""
    hue = (COLOURS[item.colour][1] + rng.uniform(-0.025, 0.025)) % 1.0
    value = SHADES[item.shade][1] + rng.uniform(-0.04, 0.04)
    yy, xx = np.mgrid[0:size, 0:size]
    sat = np.full((size, size), 0.85)
    val = np.full((size, size), value)
    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(0.15, 0.85, size=2) * size
        radius = rng.uniform(0.08, 0.2) * size
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
        sat[disc] = 0.45
        val[disc] = min(value + 0.08, 1.0)
    sat += 0.03 * rng.standard_normal((size, size))
    val += 0.03 * rng.standard_normal((size, size))
    hsv = np.stack([np.full((size, size), hue), np.clip(sat, 0, 1), np.clip(val, 0, 1)], axis=-1)
    pixels = np.ascontiguousarray(np.round(hsv * 255).astype(np.uint8))
    image = Image.frombytes("HSV", (size, size), pixels.tobytes()).convert("RGB")
    if rng.uniform() < 0.5:  # a thin stripe somewhere, for variety the music ignores
        draw = ImageDraw.Draw(image)
        y = int(rng.integers(0, size))
        draw.line([(0, y), (size, y)], fill=image.getpixel((0, y)), width=1)
    return image


def render_audio(item: SyntheticItem, seconds: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Repeated notes at the register's pitch and the tempo's rate, with the instrument's harmonics and the
    mood's articulation; a little detuning, level jitter and noise."""
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    pitch = item.pitch_hz * 2 ** (rng.uniform(-0.1, 0.1) / 12)  # +-10 cents
    period = 1.0 / item.notes_per_second
    _, _, gate, attack = MOODS[item.mood]
    length = gate * period
    env = np.zeros(n)
    start = _FIRST_ONSET
    while start < seconds:
        local = t - start
        inside = (local >= 0) & (local < length + 0.03)
        rise = np.clip(local / attack, 0, 1)
        decay = np.exp(-local / (0.8 if gate > 0.5 else 0.12))
        release = np.clip((length + 0.03 - local) / 0.03, 0, 1)
        env = np.where(inside, np.maximum(env, rise * decay * release), env)
        start += period
    wave = np.zeros(n)
    for k, amp in enumerate(INSTRUMENTS[item.instrument][1], start=1):
        if amp > 0 and k * pitch < sample_rate / 2 - 200:
            wave += amp * np.sin(2 * np.pi * k * pitch * t + rng.uniform(0, 2 * np.pi))
    wave *= env
    peak = np.abs(wave).max()
    wave = wave / peak * 0.5 * 10 ** (rng.uniform(-2, 2) / 20) if peak > 0 else wave
    wave += 0.001 * rng.standard_normal(n)
    return wave.astype(np.float32)


def write_synthetic_manifest(folder: str | Path, *, n: int = 96, seconds: float = 2.56, sample_rate: int = 16000,
                             image_size: int = 64, seed: int = 0, start: int = 0, overwrite: bool = False,
                             families: Sequence[str] | None = None, sizes: Sequence[tuple[int, int]] | None = None,
                             jpeg_quality: int | None = None, augment: bool = False,
                             saturation: tuple[float, float] = AUGMENT_SATURATION) -> Path:
    """Write ``n`` triplets (``audio/*.wav`` PCM_16, ``images/*.png``) and ``manifest.jsonl`` under ``folder``.

    Each manifest row has the standard columns ``captions``, ``location`` and ``img_path`` (relative paths)
    plus the ground truth: ``register``, ``pitch_hz``, ``tempo``, ``notes_per_second``, ``instrument``,
    ``mood``, and the picture's ``colour`` and ``shade``. ``attributes.json`` beside it lists the classes. Item ``i`` (counting from ``start``) has
    combination ``i % 48``, so any 48 consecutive items cover every combination once; use a different
    ``seed`` (and ``start``) for a held-out set. Returns the manifest path.

    ``folder`` must be new, empty, or hold exactly what these arguments write (writing the same set again
    changes nothing); a folder holding other or different files (another set's manifest, anyone's data)
    is refused, naming them, before anything is written, unless ``overwrite=True``, which replaces this
    set's files and keeps the rest (see :mod:`melfusion.datasets.writing`).

    Other pictures (:func:`render_picture`; with any of these set, each row also records its ``family``,
    ``width``, ``height`` and ``jpeg`` quality, ``null`` for PNG):

    - ``families``, ``sizes``: the picture families and ``(width, height)`` sizes, cycled in blocks of 8
      consecutive items (from a ``start`` that is a multiple of 8, a block holds every colour and shade
      once): block ``b`` has family
      ``families[b % len(families)]`` and size ``sizes[(b // len(families)) % len(sizes)]``. Defaults: the
      ``disc`` family and ``image_size`` square.
    - ``jpeg_quality``: every picture saved as a JPEG of that quality (``images/*.jpg``).
    - ``augment``: training augmentation instead of cycling: each picture draws its family from ``families``
      (default :data:`TRAIN_FAMILIES`), its size (half of them ``image_size`` square, the rest 32-320 px a
      side with aspect ratios from 1:2.5 to 2.5:1), its saturation (uniform over ``saturation``, default
      :data:`AUGMENT_SATURATION`, 0.6-0.95), a wider hue jitter, and, for three in ten, JPEG compression at quality 25-90.
    """
    check_positive_ints(n=n, sample_rate=sample_rate, image_size=image_size)
    pictures = _picture_plan(n, seed, image_size, families, sizes, jpeg_quality, augment, saturation)
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
        raise ValueError(f"start: expected a non-negative integer, got {start!r}")
    if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and np.isfinite(seconds) and seconds < 0.5:
        raise ValueError(f"seconds: expected a number of seconds >= 0.5, got {seconds!r}")
    check_sizes(seconds=seconds, sample_rate=sample_rate, image_size=image_size, low=0.0)
    folder = Path(folder)
    def image_name(i: int, k: int) -> str:
        jpeg = pictures is not None and pictures[k]["jpeg"] is not None
        return f"images/syn_{i:05d}.{'jpg' if jpeg else 'png'}"

    names = [(i, f"audio/syn_{i:05d}.wav", image_name(i, k)) for k, i in enumerate(range(start, start + n))]
    planned = [p for _, audio, image in names for p in (audio, image)] + ["attributes.json", "manifest.jsonl"]

    def files():
        rng = np.random.default_rng(seed)
        lines = []
        for k, (i, audio, image) in enumerate(names):
            item = synthetic_item(i, rng)
            yield audio, wav_bytes(render_audio(item, seconds, sample_rate, rng), sample_rate)
            row = {"captions": item.caption, "location": audio, "img_path": image, **item.labels()}
            if pictures is None:
                yield image, png_bytes(render_image(item, image_size, rng))
            else:
                plan = pictures[k]
                picture = render_picture(item.colour, item.shade, rng, plan["family"], plan["size"],
                                         saturation=plan["saturation"], hue_jitter=plan["hue_jitter"])
                quality = plan["jpeg"]
                yield image, png_bytes(picture) if quality is None else jpeg_bytes(picture, quality)
                row.update(family=plan["family"], width=plan["size"][0], height=plan["size"][1], jpeg=quality)
            lines.append(json.dumps(row) + "\n")
        yield "attributes.json", json.dumps(_classes(seconds, sample_rate, seed), indent=2).encode("utf-8")
        yield "manifest.jsonl", "".join(lines).encode("utf-8")

    write_dataset_folder(folder, planned, files, overwrite=overwrite)
    return folder / "manifest.jsonl"


def _picture_plan(n: int, seed: int, image_size: int, families, sizes, jpeg_quality, augment,
                  saturation) -> list[dict] | None:
    """Each item's picture settings (family, size, saturation, hue jitter, JPEG quality), or ``None`` for the
    classic pictures (:func:`render_image`, byte for byte as before these options existed)."""
    sat_low, sat_high = check_saturation_range(saturation)
    if families is None and sizes is None and jpeg_quality is None and not augment:
        return None
    if not isinstance(augment, bool):
        raise ValueError(f"augment: expected True or False, got {augment!r}")
    if families is not None:
        if isinstance(families, str) or not families:
            raise ValueError(f"families: expected a non-empty list of family names, got {families!r}")
        for f in families:
            if f not in PICTURE_FAMILIES:
                raise ValueError(f"families: unknown family {f!r}; expected some of {', '.join(PICTURE_FAMILIES)}")
    if sizes is not None:
        if isinstance(sizes, (str, bytes)) or not sizes:
            raise ValueError(f"sizes: expected a non-empty list of (width, height) pairs, got {sizes!r}")
        for pair in sizes:
            ok = (isinstance(pair, Sequence) and len(pair) == 2
                  and all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) and 8 <= x <= 4096
                          for x in pair))
            if not ok:
                raise ValueError(f"sizes: expected (width, height) pairs of 8-4096 pixels, got {pair!r}")
    if jpeg_quality is not None and (isinstance(jpeg_quality, bool) or not isinstance(jpeg_quality, (int, np.integer))
                                     or not 1 <= jpeg_quality <= 95):
        raise ValueError(f"jpeg_quality: expected an integer from 1 to 95 or None, got {jpeg_quality!r}")
    plan = []
    if augment:
        pool = list(families) if families is not None else list(TRAIN_FAMILIES)
        draw = np.random.default_rng([seed, 17])  # its own stream: the captions and audio keep theirs
        for _ in range(n):
            family = pool[int(draw.integers(len(pool)))]
            if sizes is not None:
                size = tuple(int(x) for x in sizes[int(draw.integers(len(sizes)))])
            elif draw.uniform() < 0.5:
                size = (image_size, image_size)
            else:
                aspect = float(np.exp(draw.uniform(np.log(0.4), np.log(2.5))))
                long_side = int(draw.integers(48, 321))
                short = max(32, int(round(long_side / max(aspect, 1 / aspect))))
                size = (long_side, short) if aspect >= 1 else (short, long_side)
            quality = jpeg_quality
            if quality is None and draw.uniform() < 0.3:
                quality = int(draw.integers(25, 91))
            # one draw whatever the range: the other settings keep their stream
            plan.append({"family": family, "size": size, "saturation": float(draw.uniform(sat_low, sat_high)),
                         "hue_jitter": 0.04, "jpeg": quality})
        return plan
    fams = list(families) if families is not None else ["disc"]
    szs = [tuple(int(x) for x in s) for s in sizes] if sizes is not None else [(image_size, image_size)]
    for k in range(n):
        block = k // 8
        plan.append({"family": fams[block % len(fams)], "size": szs[(block // len(fams)) % len(szs)],
                     "saturation": None, "hue_jitter": 0.025, "jpeg": jpeg_quality})
    return plan


def check_saturation_range(saturation) -> tuple[float, float]:
    """``saturation`` as a ``(low, high)`` pair of floats with ``0 <= low <= high <= 1``; ``ValueError`` else."""
    ok = (isinstance(saturation, Sequence) and not isinstance(saturation, (str, bytes)) and len(saturation) == 2
          and all(isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)
                  and np.isfinite(x) for x in saturation))
    if not ok or not 0.0 <= saturation[0] <= saturation[1] <= 1.0:
        raise ValueError(f"saturation: expected a (low, high) range with 0 <= low <= high <= 1, got {saturation!r}")
    return float(saturation[0]), float(saturation[1])


def _classes(seconds: float, sample_rate: int, seed: int) -> dict[str, Any]:
    return {"register": [{"name": c, "shade": SHADES[i][0], "value": SHADES[i][1], "pitch_hz": p}
                         for i, (c, p) in enumerate(REGISTERS)],
            "tempo": [{"name": c, "notes_per_second": r,
                       "colours": [COLOURS[k][0] for k, v in enumerate(TEMPO_OF_COLOUR) if v == i]}
                      for i, (c, r) in enumerate(TEMPOS)],
            "colour": [{"name": c, "hue": h} for c, h in COLOURS],
            "instrument": [{"name": c, "harmonics": list(h)} for c, h in INSTRUMENTS],
            "mood": [{"name": c, "words": list(w), "gate": g} for c, w, g, _ in MOODS],
            "image_attributes": list(IMAGE_ATTRIBUTES), "text_attributes": list(TEXT_ATTRIBUTES),
            "chance": CHANCE, "seconds": seconds, "sample_rate": sample_rate, "seed": seed}


# ---------------------------------------------------------------------------------------------
# picture families: the same two properties (hue and HSV value) on other shapes, sizes and formats

#: every picture family :func:`render_picture` draws; ``disc`` is :func:`render_image`'s picture
PICTURE_FAMILIES = ("disc", "square", "stripes", "noise", "ring", "triangle", "gradient", "checker", "photo",
                    "plain")
#: the families the shipped mini model was trained on
TRAIN_FAMILIES = ("disc", "square", "stripes", "noise", "ring")
#: families it never saw in training: the generalisation test's pictures
HELDOUT_FAMILIES = ("triangle", "gradient", "checker", "photo", "plain")
#: picture sizes (width, height) of the generalisation test; the library resizes every picture to the image
#: LDM's resolution as it does any user's
HELDOUT_SIZES = ((160, 120), (300, 300), (40, 90))
_TINT_SAT, _TINT_VALUE = 0.45, 0.08  # a shape's paler tint: saturation, value above the field


@functools.lru_cache(maxsize=1)
def _photo() -> Image.Image:
    """Grace Hopper's portrait (public domain, shipped with matplotlib) in grey levels, decoded once."""
    import matplotlib

    with Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg") as im:
        return im.convert("L")


def _photo_luminance(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop of a real photograph (:func:`_photo`), as luminance in [0, 1] at ``width x height``."""
    gray = _photo()
    w, h = gray.size
    cw, ch = int(w * rng.uniform(0.4, 1.0)), int(h * rng.uniform(0.4, 1.0))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    crop = gray.crop((x0, y0, x0 + cw, y0 + ch)).resize((width, height), Image.Resampling.BICUBIC)
    lum = np.asarray(crop, dtype=np.float64) / 255
    if rng.uniform() < 0.5:
        lum = lum[:, ::-1]
    span = np.percentile(lum, 98) - np.percentile(lum, 2)
    return np.clip((lum - np.percentile(lum, 2)) / max(span, 1e-3), 0, 1)


def _smooth_noise(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Value noise in [-1, 1]: a coarse random grid, bicubically upsampled."""
    cells = int(rng.integers(3, 9))
    grid = rng.uniform(0, 255, size=(cells, cells)).astype(np.uint8)
    up = Image.fromarray(grid, "L").resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(up, dtype=np.float64) / 127.5 - 1


def render_picture(colour: int, shade: int, rng: np.random.Generator, family: str = "disc",
                   size: tuple[int, int] = (64, 64), saturation: float | None = None,
                   hue_jitter: float = 0.025) -> Image.Image:
    """A ``size = (width, height)`` RGB picture of ``family`` whose hue is colour ``colour``'s and whose HSV
    value is shade ``shade``'s (both jittered a little), as the music of the synthetic world reads them.

    ``disc`` at a square size is :func:`render_image`'s picture, byte for byte for the same generator state.
    The others keep the field's hue and keep the picture's mean value within 0.1 of the shade's: ``square``,
    ``ring`` and ``triangle`` put 1-4 shapes of a paler tint on the field, ``stripes`` alternate the field
    and the tint in bands, ``checker`` in squares, ``gradient`` ramps the value (and the saturation) across the
    picture in a random direction, ``noise`` modulates it with smooth value noise, ``photo`` with a crop of a
    real photograph's luminance (tinted), and ``plain`` is the field alone.
    """
    if family not in PICTURE_FAMILIES:
        raise ValueError(f"family: expected one of {', '.join(PICTURE_FAMILIES)}, got {family!r}")
    width, height = (int(size[0]), int(size[1]))
    if width < 1 or height < 1:
        raise ValueError(f"size: expected a positive (width, height), got {size!r}")
    if family == "disc" and width == height and saturation is None and hue_jitter == 0.025:
        item = SyntheticItem(colour, shade, 0, 0, "")
        return render_image(item, width, rng)
    hue = (COLOURS[colour][1] + rng.uniform(-hue_jitter, hue_jitter)) % 1.0
    value = SHADES[shade][1] + rng.uniform(-0.04, 0.04)
    base_sat = 0.85 if saturation is None else saturation
    yy, xx = np.mgrid[0:height, 0:width]
    u, v = (xx + 0.5) / width, (yy + 0.5) / height  # 0..1 across each side
    sat = np.full((height, width), base_sat)
    val = np.full((height, width), value)
    tint = np.zeros((height, width), dtype=bool)
    if family == "disc":
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0.15, 0.85, size=2)
            radius = rng.uniform(0.08, 0.2)
            tint |= (u - cx) ** 2 + (v - cy) ** 2 < radius**2
    elif family == "square":
        for _ in range(rng.integers(1, 5)):
            cx, cy = rng.uniform(0.15, 0.85, size=2)
            half = rng.uniform(0.06, 0.2)
            tint |= (np.abs(u - cx) < half) & (np.abs(v - cy) < half * rng.uniform(0.6, 1.6))
    elif family == "ring":
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0.2, 0.8, size=2)
            radius, width_r = rng.uniform(0.1, 0.25), rng.uniform(0.02, 0.06)
            d = np.sqrt((u - cx) ** 2 + (v - cy) ** 2)
            tint |= np.abs(d - radius) < width_r
    elif family == "stripes":
        bands = int(rng.integers(3, 9))
        along = u if rng.uniform() < 0.5 else v
        tint = (np.floor(along * bands) % 2).astype(bool)
    elif family == "checker":
        cells = int(rng.integers(2, 7))
        tint = ((np.floor(u * cells) + np.floor(v * cells)) % 2).astype(bool)
    elif family == "triangle":
        mask = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(mask)
        for _ in range(rng.integers(1, 4)):
            cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
            r = rng.uniform(0.1, 0.25) * min(width, height) + 1
            angle = rng.uniform(0, 2 * np.pi)
            points = [(cx + r * np.cos(angle + k * 2 * np.pi / 3), cy + r * np.sin(angle + k * 2 * np.pi / 3))
                      for k in range(3)]
            draw.polygon(points, fill=255)
        tint = np.asarray(mask) > 0
    elif family == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (u - 0.5) * np.cos(angle) + (v - 0.5) * np.sin(angle)
        ramp = ramp / max(np.abs(ramp).max(), 1e-6)  # -1..1
        val = val + 0.08 * ramp
        sat = sat - 0.15 * ramp
    elif family == "noise":
        noise = _smooth_noise(width, height, rng)
        val = val + 0.08 * noise
        sat = sat + 0.1 * _smooth_noise(width, height, rng)
    elif family == "photo":
        lum = _photo_luminance(width, height, rng)
        val = val + 0.16 * (lum - lum.mean())
        sat = sat * (0.8 + 0.2 * (1 - lum))
    sat[tint] = _TINT_SAT
    val[tint] = np.minimum(val[tint] + _TINT_VALUE, 1.0)
    sat = sat + 0.03 * rng.standard_normal((height, width))
    val = val + 0.03 * rng.standard_normal((height, width))
    hsv = np.stack([np.full((height, width), hue), np.clip(sat, 0, 1), np.clip(val, 0, 1)], axis=-1)
    pixels = np.ascontiguousarray(np.round(hsv * 255).astype(np.uint8))
    return Image.frombytes("HSV", (width, height), pixels.tobytes()).convert("RGB")


# ---------------------------------------------------------------------------------------------
# reading the attributes back from audio


@dataclass(frozen=True)
class AttributeReading:
    """What :func:`read_attributes` measured: class indices (``None`` where nothing could be read)."""

    register: int | None
    tempo: int | None
    instrument: int | None
    mood: int | None
    pitch_hz: float | None
    notes_per_second: float
    duty: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _nearest_register(pitch: float) -> int:
    return int(np.argmin([abs(np.log2(pitch / p)) for _, p in REGISTERS]))


def _harmonic_profile(y: np.ndarray, sr: int, pitch: float) -> np.ndarray:
    """Amplitudes of harmonics 1..5 relative to the first, from the loud frames' average spectrum."""
    import librosa

    n_fft = 4096
    spec = np.abs(librosa.stft(y, n_fft=n_fft, hop_length=512))
    loud = spec.sum(axis=0)
    mean = spec[:, loud >= 0.3 * loud.max()].mean(axis=1) if loud.max() > 0 else spec.mean(axis=1)
    freqs = np.arange(mean.shape[0]) * sr / n_fft
    amps = []
    for k in range(1, 6):
        f = k * pitch
        band = (freqs > f * 0.96) & (freqs < f * 1.04)
        amps.append(mean[band].max() if band.any() else 0.0)
    amps = np.asarray(amps)
    return amps / max(amps[0], 1e-9)


def _instrument_from_profile(profile: np.ndarray) -> int:
    feats = np.log10(np.maximum(profile[1:], 1e-2))  # harmonics 2..5 in decades, floored at -40 dB
    protos = [np.log10(np.maximum(np.asarray(h[1:5]), 1e-2)) for _, h in INSTRUMENTS]
    return int(np.argmin([np.sum((feats - p) ** 2) for p in protos]))


def read_attributes(waveform: np.ndarray, sample_rate: int) -> AttributeReading:
    """Measure register, tempo, instrument and mood from one mono waveform (any length over 0.5 s)."""
    import librosa

    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate < 1000:
        raise ValueError(f"sample_rate: expected an integer rate of at least 1000 Hz, got {sample_rate!r}")
    y = np.asarray(waveform, dtype=np.float32).reshape(-1)
    if y.size < sample_rate // 2 or not np.isfinite(y).all():
        raise ValueError(f"waveform: expected at least 0.5 s of finite audio, got {y.size} samples")
    peak = np.abs(y).max()
    if peak < 1e-4:
        return AttributeReading(None, None, None, None, None, 0.0, 0.0)
    y = y / peak
    hop = sample_rate // 100  # 10 ms frames
    rms = librosa.feature.rms(y=y, frame_length=2 * hop, hop_length=hop)[0]
    loud = rms > 0.3 * rms.max()
    # pitch: YIN's median over the loud frames
    f0 = librosa.yin(y, fmin=150.0, fmax=1100.0, sr=sample_rate, frame_length=2048, hop_length=hop)
    f0 = f0[: loud.size][loud[: f0.size]]
    pitch = float(np.median(f0)) if f0.size >= 3 else None
    # tempo: the onset-strength envelope's self-similarity one fast beat (0.25 s) and one slow beat (0.5 s) apart;
    # repeated notes at 4 per second repeat at both lags, at 2 per second only at the longer one
    onset = librosa.onset.onset_strength(y=y, sr=sample_rate, hop_length=hop)
    onset = onset - onset.mean()
    def similarity(seconds: float) -> float:
        lag = int(round(seconds * 100))
        if onset.size <= lag + 10:
            return 0.0
        return max(float(np.dot(onset[:-k], onset[k:]) / (onset.size - k)) for k in (lag - 1, lag, lag + 1))
    fast, slow = similarity(1 / TEMPOS[1][1]), similarity(1 / TEMPOS[0][1])
    tempo = 1 if fast > 0.5 * max(slow, 1e-12) else 0
    rate = TEMPOS[tempo][1]
    # mood: how much of the time the envelope stays near its peak (legato notes fill their beat)
    active = np.flatnonzero(rms > 0.05 * rms.max())
    span = rms[active[0]: active[-1] + 1]
    duty = float((span > 0.4 * np.percentile(span, 95)).mean())
    mood = 0 if duty > 0.55 else 1
    register = instrument = None
    if pitch is not None:
        register = _nearest_register(pitch)
        instrument = _instrument_from_profile(_harmonic_profile(y, sample_rate, pitch))
    return AttributeReading(register, tempo, instrument, mood, pitch, float(rate), duty)


def attribute_accuracy(readings: Sequence[AttributeReading], truth: Sequence[SyntheticItem | dict]
                       ) -> dict[str, float]:
    """Fraction of clips whose measured class equals the ground truth, per attribute (unread counts as wrong)."""
    if len(readings) != len(truth) or not readings:
        raise ValueError(f"readings, truth: expected equal non-zero lengths, got {len(readings)} and {len(truth)}")
    names = {"register": [c for c, _ in REGISTERS], "tempo": [c for c, _ in TEMPOS],
             "instrument": [c for c, _ in INSTRUMENTS], "mood": [c for c, _, _, _ in MOODS]}
    out = {}
    for attr in ATTRIBUTES:
        hits = 0
        for reading, item in zip(readings, truth, strict=True):
            want = getattr(item, attr) if isinstance(item, SyntheticItem) else names[attr].index(item[attr])
            hits += getattr(reading, attr) == want
        out[attr] = hits / len(readings)
    return out
