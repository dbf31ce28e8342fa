"""``melfusion app``: a gradio page over the public API (docs/app.md).

Three tabs: **Generate** (a picture and a prompt -> music, its labelled spectrogram and the synapse's per-layer
weights), **Compare** (the same prompt and seed with two pictures, or with and without the picture, side by
side) and **Storyboard** (several pictures with durations, one piece). Every action calls
:meth:`melfusion.MelFusion.generate`; the app adds only file handling and error messages.

The generate action is also gradio's API endpoint ``/generate``::

    from gradio_client import Client, handle_file
    client = Client("http://127.0.0.1:7860/")
    wav, spectrogram, info = client.predict(handle_file("examples/images/blue-bright.png"),
                                            "a calm flute melody", api_name="/generate")

Its parameters, in order: ``image``, ``text``, then (optional, with the app's defaults) ``steps``, ``guidance``,
``image_guidance``, ``image_strength``, ``seconds``, ``seed``, ``model``.
"""

from __future__ import annotations

import atexit
import io
import math
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Studio", "AppDefaults", "build_app", "launch", "example_pictures", "alphas_figure"]

#: the repository's bundled pictures (present in a clone; an installed package renders its own)
_EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "images"


@dataclass(frozen=True)
class AppDefaults:
    """The controls' starting values: the default model's own sampling settings."""

    steps: int = 25
    guidance: float = 3.0
    image_guidance: float = 5.0
    seconds: float = 2.56
    image_strength: float = 1.0
    seed: int = 0

    @classmethod
    def of(cls, model) -> AppDefaults:
        s = model.config.sampling
        return cls(steps=int(s.num_inference_steps), guidance=float(s.guidance_scale),
                   image_guidance=float(s.image_guidance_scale if s.image_guidance_scale is not None
                                        else s.guidance_scale),
                   seconds=float(s.seconds))


def example_pictures(folder: str | Path | None = None) -> list[Path]:
    """The bundled example pictures: ``examples/images`` of a clone, else two mini-world pictures (a bright
    blue and a dark red disc) rendered into ``folder``."""
    if _EXAMPLES.is_dir():
        found = sorted(p for p in _EXAMPLES.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if found:
            return found
    import numpy as np

    from .datasets.synthetic import render_picture
    from .files import write_atomic

    folder = Path(folder if folder is not None else tempfile.mkdtemp(prefix="melfusion-examples-"))
    out = []
    for name, colour, shade in (("blue-bright", 3, 1), ("red-dark", 0, 0)):
        buffer = io.BytesIO()
        render_picture(colour, shade, np.random.default_rng(0), size=(256, 256)).save(buffer, format="PNG")
        path = folder / f"{name}.png"
        if path.is_file() and path.read_bytes() == buffer.getvalue():
            out.append(path)  # written by an earlier call: the same picture
        else:  # never onto someone else's file of that name (write_atomic refuses it)
            out.append(write_atomic(path, buffer.getvalue(), overwrite=False))
    return out


def alphas_figure(model, title: str = "Synapse weights per layer"):
    """A matplotlib bar chart of the synapse's effective per-layer weights (mean over heads where there are
    several; the spread as error bars), each bar labelled with its music layer; None without a synapse."""
    if model.synapse is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    alphas = model.synapse.mixer.alphas().float().cpu().numpy()
    values = alphas.reshape(len(alphas), -1)
    mean, spread = values.mean(axis=1), values.std(axis=1)
    names = model.synapse.music_layer_names
    labels = [n.replace("down_blocks", "down").replace("up_blocks", "up").replace(".attentions", ".attn")
              for n in names]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(mean) + 3.0), 3.4), layout="constrained")
    x = np.arange(len(mean))
    bars = ax.bar(x, mean, yerr=spread if values.shape[1] > 1 else None, color="#4c72b0", capsize=3)
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in mean], padding=2, fontsize=8)
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("alpha (weight of the picture)")
    ax.set_xlabel("music denoiser layer (0 = text only, 1 = the picture's keys and values only)")
    top = max(1.0, float((mean + spread).max()) * 1.1)
    bottom = min(0.0, float((mean - spread).min()) * 1.1)  # a non-convex mixer's weights may be negative
    ax.set_ylim(bottom, top)
    ax.set_title(title + (" (mean over heads, std as bars)" if values.shape[1] > 1 else ""), fontsize=10)
    return fig


class Studio:
    """The app's state: loaded models (the two most recent, by name) and the folder its outputs go to.

    Usable without gradio: ``Studio().generate("pic.png", "a calm flute melody")`` returns the paths of the
    WAV and spectrogram it wrote and the :class:`~melfusion.GenerationOutput`.
    """

    def __init__(self, model: str = "mini", *, device: Any = None, dtype: Any = None,
                 output_dir: str | Path | None = None, max_models: int = 2, max_seconds: float = 120.0,
                 max_pictures: int = 16):
        self.default_model = str(model)
        self.device, self.dtype = device, dtype
        #: the longest piece one request may ask for, and the most storyboard pictures (a shared server's limits)
        self.max_seconds, self.max_pictures = float(max_seconds), int(max_pictures)
        # every file the app writes goes here (a fresh folder of its own: nothing of the user's is overwritten);
        # a folder the Studio made is removed when the process exits
        if output_dir is None:
            self.output_dir = Path(tempfile.mkdtemp(prefix="melfusion-app-"))
            atexit.register(shutil.rmtree, self.output_dir, ignore_errors=True)
        else:
            self.output_dir = Path(output_dir)
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self._models: OrderedDict[str, Any] = OrderedDict()
        self._max_models = max_models
        self._lock = threading.Lock()
        # one generation at a time: the models' synapse state (features, strength) is shared by every request
        self._generating = threading.Lock()

    # -- models -------------------------------------------------------------------
    def model(self, name: str | None = None):
        """The model ``name`` names (a shipped name, a folder written by ``save_pretrained``, a hub id when
        online, or ``preset:NAME`` for a preset's config with its random or hub weights), loaded once."""
        from .config import PRESETS, MelFusionConfig
        from .pipeline import MelFusion

        name = (str(name).strip() if name is not None else "") or self.default_model
        with self._lock:
            if name in self._models:
                self._models.move_to_end(name)
                return self._models[name]
            if name.startswith("preset:"):
                preset = name.split(":", 1)[1]
                if preset not in PRESETS:
                    raise ValueError(f"model: unknown preset {preset!r}; known presets: {', '.join(sorted(PRESETS))}")
                model = MelFusion.from_config(MelFusionConfig.preset(preset), device=self.device, dtype=self.dtype)
            else:
                try:
                    model = MelFusion.from_pretrained(name, device=self.device, dtype=self.dtype)
                except ValueError as exc:
                    text = str(exc)
                    raise ValueError("model: " + text.split(": ", 1)[1] if text.startswith(("path: ", "name: "))
                                     else text) from None
            self._models[name] = model
            while len(self._models) > self._max_models:
                self._models.popitem(last=False)
            return model

    # -- actions ------------------------------------------------------------------
    def _new_path(self, stem: str, suffix: str) -> Path:
        return self.output_dir / f"{stem}-{uuid.uuid4().hex[:10]}{suffix}"

    def _write(self, out, stem: str) -> tuple[Path, Path]:
        wav = out.save(self._new_path(stem, ".wav"))[0]
        png = out.save_spectrogram(self._new_path(stem, ".png"))
        return wav, png

    def run(self, image: Any, text: str, steps: int | None = None, guidance: float | None = None,
            image_guidance: float | None = None, image_strength: float = 1.0, seconds: float | None = None,
            seed: int = 0, model: str | None = None, progress: bool = True, **extra):
        """One :meth:`MelFusion.generate` call with the app's arguments; returns the GenerationOutput."""
        from .images import open_image

        if image is None and not extra.get("images"):
            raise ValueError("image: upload a picture (or pick one of the examples)")
        if text is None or not str(text).strip():
            raise ValueError("text: type a prompt, e.g. 'a calm flute melody'")
        if not isinstance(text, str):
            raise ValueError(f"text: expected a prompt string, got {type(text).__name__}")
        picture = open_image(image, "image") if isinstance(image, (str, Path)) else image
        seed = _whole(seed, "seed")
        steps = None if steps is None else _whole(steps, "steps")
        if seconds is not None:
            seconds = _bounded(seconds, "seconds", self.max_seconds)
        m = self.model(model)
        with self._generating, m.image_strength(image_strength):
            return m.generate(image=picture, text=text, num_inference_steps=steps, guidance_scale=guidance,
                              image_guidance_scale=image_guidance, seconds=seconds, seed=seed,
                              progress=progress, **extra)

    def generate(self, image: Any, text: str, steps: int | None = None, guidance: float | None = None,
                 image_guidance: float | None = None, image_strength: float = 1.0, seconds: float | None = None,
                 seed: int = 0, model: str | None = None, progress: bool = True):
        """Generate and write: ``(wav_path, spectrogram_path, output)``."""
        out = self.run(image, text, steps, guidance, image_guidance, image_strength, seconds, seed, model, progress)
        wav, png = self._write(out, "generate")
        return wav, png, out

    def compare(self, image_a: Any, image_b: Any, text: str, steps: int | None = None,
                guidance: float | None = None, image_guidance: float | None = None, image_strength: float = 1.0,
                seconds: float | None = None, seed: int = 0, model: str | None = None, progress: bool = True):
        """The same prompt and seed with two pictures, or (``image_b`` None) with and without the picture:
        ``[(wav, png, output), (wav, png, output)]``."""
        if image_a is None:
            raise ValueError("image: upload picture A (picture B may stay empty: then the prompt alone)")
        first = self.generate(image_a, text, steps, guidance, image_guidance, image_strength, seconds, seed, model,
                              progress)
        if image_b is None:  # text only: the same picture at strength 0 (exactly the model without the image)
            out = self.run(image_a, text, steps, guidance, image_guidance, 0.0, seconds, seed, model, progress)
            second = (*self._write(out, "compare-text-only"), out)
        else:
            second = self.generate(image_b, text, steps, guidance, image_guidance, image_strength, seconds, seed,
                                   model, progress)
        return [first, second]

    def storyboard(self, images: Sequence[Any], text: str, durations: str | Sequence[float] | None = None,
                   crossfade: float | None = None, steps: int | None = None, guidance: float | None = None,
                   image_guidance: float | None = None, image_strength: float = 1.0, seed: int = 0,
                   model: str | None = None, progress: bool = True):
        """Several pictures, one section each (``durations`` seconds: a list, or text such as ``"3, 2.5"``;
        default one clip each); ``text`` is one prompt for all, or one per line. ``(wav, png, output)``."""
        from .images import open_image

        paths = [getattr(p, "name", p) for p in (images or [])]
        if not paths:
            raise ValueError("images: upload one or more pictures (one section each)")
        if len(paths) > self.max_pictures:
            raise ValueError(f"images: {len(paths)} pictures, over this app's limit of {self.max_pictures}")
        pictures = [open_image(p, f"images[{i}]") for i, p in enumerate(paths)]
        if isinstance(durations, str):
            durations = _numbers(durations, "durations") or None
        if durations is not None:
            durations = [_bounded(d, "durations", self.max_seconds) for d in durations]
            if len(durations) != len(pictures):
                raise ValueError(f"durations: {len(durations)} numbers for {len(pictures)} pictures (give one per "
                                 "picture, or none for one clip each)")
            if sum(durations) > self.max_seconds:
                raise ValueError(f"durations: {sum(durations):g} s in all, over this app's limit of "
                                 f"{self.max_seconds:g} s")
        texts = [t.strip() for t in str(text or "").splitlines() if t.strip()]
        if not texts:
            raise ValueError("text: type a prompt (or one per line, one per picture)")
        if len(texts) not in (1, len(pictures)):
            raise ValueError(f"text: {len(texts)} prompt lines for {len(pictures)} pictures (give one prompt, or "
                             "one line per picture)")
        extra: dict[str, Any] = {"images": pictures, "durations": durations}
        if len(texts) > 1:
            extra["texts"] = texts
        if crossfade is not None:
            extra["crossfade"] = crossfade
        seed = _whole(seed, "seed")
        m = self.model(model)
        with self._generating, m.image_strength(image_strength):
            out = m.generate(text=texts[0] if len(texts) == 1 else "",
                             num_inference_steps=None if steps is None else _whole(steps, "steps"),
                             guidance_scale=guidance, image_guidance_scale=image_guidance, seed=seed,
                             progress=progress, **extra)
        wav, png = self._write(out, "storyboard")
        return wav, png, out


def _whole(value: Any, name: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a whole number, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")) or number != int(number):
        raise ValueError(f"{name}: expected a whole number, got {value!r}")
    return int(number)


def _numbers(text: str, name: str) -> list[float]:
    """``"2.5, 3"`` (commas, semicolons or spaces between) -> ``[2.5, 3.0]``; an empty entry is refused."""
    text = text.strip()
    if not text:
        return []
    out = []
    for part in re.split(r"\s*[,;]\s*|\s+", text):
        try:
            out.append(float(part))
        except ValueError:
            raise ValueError(f"{name}: expected numbers separated by commas, got {part!r} in {text!r}") from None
    return out


def _bounded(value: Any, name: str, high: float) -> float:
    """A finite number in (0, high], or a ValueError naming ``name``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number of seconds, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name}: expected a positive number of seconds, got {value!r}")
    if number > high:
        raise ValueError(f"{name}: {number:g} s is over this app's limit of {high:g} s")
    return number


#: the library's argument names in messages -> the app's (its controls and API parameters)
_API_NAMES = {"num_inference_steps": "steps", "guidance_scale": "guidance", "image_guidance_scale": "image_guidance",
              "strength": "image_strength"}


def _info(out, model_name: str, took: float) -> str:
    seconds = out.waveforms.shape[-1] / out.sample_rate
    sections = ""
    if len(out.sections) > 1:
        sections = "; sections " + ", ".join(f"{a:.2f}-{b:.2f} s" for a, b in out.sections)
    return f"{seconds:.2f} s at {out.sample_rate} Hz from model '{model_name}' in {took:.1f} s{sections}"


# -- the gradio page --------------------------------------------------------------------------------------------
def _gradio():
    try:
        import gradio as gr
    except ImportError:
        raise ImportError("melfusion app needs gradio: pip install 'melfusion[app]'") from None
    return gr


def build_app(model: str = "mini", *, device: Any = None, dtype: Any = None, studio: Studio | None = None,
              max_upload_mb: float = 20.0):
    """The gradio ``Blocks`` of the app (not launched): ``build_app().launch()``."""
    import time

    gr = _gradio()
    from .cli import describe_error

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    studio = studio if studio is not None else Studio(model, device=device, dtype=dtype)
    defaults = AppDefaults.of(studio.model())  # the default model loads now: its settings are the controls'
    examples = [str(p) for p in example_pictures(studio.output_dir / "examples")]

    def Picture(**kwargs):  # noqa: N802 (used like the component class it returns)
        """A gr.Image whose unreadable uploads become a message on the page, not a bare "Error". (Patched on the
        instance: a gr.Image subclass would make gradio write a .pyi file beside this module.)"""
        component = gr.Image(**kwargs)
        original = component.preprocess

        def preprocess(payload):
            try:
                return original(payload)
            except gr.Error:
                raise
            except Exception as exc:  # PIL could not read it
                name = getattr(payload, "orig_name", None) or "the upload"
                raise gr.Error(f"image: cannot read {name!r} as an image ({type(exc).__name__}); upload a PNG, "
                               "JPEG or WebP picture", print_exception=False) from None

        component.preprocess = preprocess
        return component

    def fail(exc: BaseException, uploads: Sequence[Any] = ()):
        code, line = describe_error(exc)
        line = line.removeprefix("error: ")
        for upload in uploads:  # gradio's cache path -> the uploaded file's own name
            path = getattr(upload, "name", upload)
            if isinstance(path, (str, Path)) and str(path):
                line = line.replace(repr(str(path)), repr(Path(path).name)).replace(str(path), Path(path).name)
        name, sep, rest = line.partition(":")
        if sep and name in _API_NAMES:  # the library's argument name -> the page's / the API's
            line = f"{_API_NAMES[name]}:{rest}"
        return gr.Error(line, print_exception=code == 1)

    def generate(image, text, steps=defaults.steps, guidance=defaults.guidance,
                 image_guidance=defaults.image_guidance, image_strength=defaults.image_strength,
                 seconds=defaults.seconds, seed=defaults.seed, model=studio.default_model,
                 progress=gr.Progress(track_tqdm=True)):
        start = time.perf_counter()
        try:
            wav, png, out = studio.generate(image, text, steps, guidance, image_guidance, image_strength, seconds,
                                            seed, model)
        except Exception as exc:
            raise fail(exc, [image]) from None
        return str(wav), str(png), _info(out, model or studio.default_model, time.perf_counter() - start)

    def weights(model=studio.default_model):
        try:
            return alphas_figure(studio.model(model))
        except Exception as exc:
            raise fail(exc) from None

    def compare(image_a, image_b, text, steps, guidance, image_guidance, image_strength, seconds, seed, model,
                progress=gr.Progress(track_tqdm=True)):
        try:
            (wa, pa, _), (wb, pb, _) = studio.compare(image_a, image_b, text, steps, guidance, image_guidance,
                                                      image_strength, seconds, seed, model)
        except Exception as exc:
            raise fail(exc, [image_a, image_b]) from None
        label = "text only (image strength 0)" if image_b is None else "picture B"
        return str(wa), str(pa), str(wb), str(pb), f"left: picture A; right: {label}; same prompt and seed {seed}"

    def storyboard(files, text, durations, crossfade, steps, guidance, image_guidance, image_strength, seed, model,
                   progress=gr.Progress(track_tqdm=True)):
        start = time.perf_counter()
        try:
            wav, png, out = studio.storyboard(files, text, durations, crossfade or None, steps, guidance,
                                              image_guidance, image_strength, seed, model)
        except Exception as exc:
            raise fail(exc, list(files or [])) from None
        return str(wav), str(png), _info(out, model or studio.default_model, time.perf_counter() - start)

    def settings(prefix: str):
        with gr.Accordion("Settings", open=False):
            with gr.Row():
                steps = gr.Slider(1, 200, value=defaults.steps, step=1, label="steps",
                                  elem_id=f"{prefix}-steps")
                guidance = gr.Slider(0.0, 15.0, value=defaults.guidance, step=0.1, label="guidance (text)")
                image_guidance = gr.Slider(0.0, 15.0, value=defaults.image_guidance, step=0.1,
                                           label="image guidance")
            with gr.Row():
                strength = gr.Slider(0.0, 1.0, value=defaults.image_strength, step=0.05,
                                     label="image strength (scales every alpha; 0 = text only)")
                seconds = gr.Slider(0.5, min(30.0, studio.max_seconds), value=defaults.seconds, step=0.01,
                                    label="seconds")
                seed = gr.Number(value=defaults.seed, precision=0, label="seed")
            model_box = gr.Textbox(value=studio.default_model, label="model (shipped name, folder, or preset:NAME)")
        return steps, guidance, image_guidance, strength, seconds, seed, model_box

    # gradio's copies of the outputs: files older than a day are removed, hourly
    with gr.Blocks(title="melfusion: music from a picture and a prompt", delete_cache=(3600, 86400)) as demo:
        gr.Markdown("## melfusion: music from a picture and a prompt\n"
                    "The picture steers the music through the synapse (MeLFusion, CVPR 2024). With the shipped "
                    "`mini` model a bright picture is heard in the high register and a warm hue as the fast tempo; "
                    "the prompt names the instrument and the mood.")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column():
                    image = Picture(type="filepath", label="picture", sources=["upload", "clipboard"],
                                    elem_id="image")
                    gr.Examples(examples=[[p] for p in examples], inputs=[image], label="bundled pictures")
                    text = gr.Textbox(value="", label="prompt", placeholder="a calm flute melody", elem_id="text")
                    controls = settings("generate")
                    button = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column():
                    audio = gr.Audio(type="filepath", label="music", interactive=False, elem_id="audio")
                    spectrogram = gr.Image(type="filepath", label="mel spectrogram", interactive=False,
                                           elem_id="spectrogram")
                    info = gr.Textbox(label="result", interactive=False, elem_id="info")
                    plot = gr.Plot(label="synapse weights (alpha per layer)", show_label=False, elem_id="alphas")
            button.click(generate, inputs=[image, text, *controls], outputs=[audio, spectrogram, info],
                         api_name="generate", concurrency_id="melfusion").then(weights, inputs=[controls[-1]], outputs=[plot],
                                                   api_name=False)
            demo.load(weights, inputs=[controls[-1]], outputs=[plot], api_name=False)
        with gr.Tab("Compare"):
            gr.Markdown("The same prompt and seed with two pictures; leave picture B empty to hear the prompt "
                        "alone (image strength 0).")
            with gr.Row():
                image_a = Picture(type="filepath", label="picture A", elem_id="image-a")
                image_b = Picture(type="filepath", label="picture B (empty: text only)", elem_id="image-b")
            gr.Examples(examples=[[examples[0], examples[-1]]], inputs=[image_a, image_b], label="bundled pair")
            text_c = gr.Textbox(value="", label="prompt", placeholder="a calm flute melody")
            controls_c = settings("compare")
            button_c = gr.Button("Compare", variant="primary", elem_id="compare")
            with gr.Row():
                with gr.Column():
                    audio_a = gr.Audio(type="filepath", label="A", interactive=False)
                    spec_a = gr.Image(type="filepath", label="A: mel spectrogram", interactive=False)
                with gr.Column():
                    audio_b = gr.Audio(type="filepath", label="B", interactive=False)
                    spec_b = gr.Image(type="filepath", label="B: mel spectrogram", interactive=False)
            info_c = gr.Textbox(label="result", interactive=False)
            button_c.click(compare, inputs=[image_a, image_b, text_c, *controls_c],
                           outputs=[audio_a, spec_a, audio_b, spec_b, info_c], api_name="compare",
                           concurrency_id="melfusion")
        with gr.Tab("Storyboard"):
            gr.Markdown("Several pictures, one section each, crossfaded into one piece (docs/long-form.md).")
            files = gr.File(file_count="multiple", file_types=["image"], label="pictures, in order")
            text_s = gr.Textbox(value="", lines=3, label="prompt (one for all, or one per line per picture)")
            with gr.Row():
                durations = gr.Textbox(value="", label="seconds per picture, e.g. 2.56, 2.56 (empty: one clip each)")
                crossfade = gr.Number(value=None, label="crossfade seconds (empty: the default)")
            steps_s, guidance_s, image_guidance_s, strength_s, _, seed_s, model_s = settings("storyboard")
            button_s = gr.Button("Generate the piece", variant="primary", elem_id="storyboard")
            audio_s = gr.Audio(type="filepath", label="music", interactive=False)
            spec_s = gr.Image(type="filepath", label="mel spectrogram", interactive=False)
            info_s = gr.Textbox(label="result", interactive=False)
            button_s.click(storyboard, inputs=[files, text_s, durations, crossfade, steps_s, guidance_s,
                                               image_guidance_s, strength_s, seed_s, model_s],
                           outputs=[audio_s, spec_s, info_s], api_name="storyboard", concurrency_id="melfusion")
    demo.queue(default_concurrency_limit=1)  # one generation at a time; the rest wait in the queue
    demo.melfusion_studio = studio
    demo.melfusion_max_file_size = int(max_upload_mb * 1024 * 1024)  # bytes, as gradio's launch takes it
    return demo


def launch(host: str = "127.0.0.1", port: int = 7860, model: str = "mini", *, device: Any = None,
           dtype: Any = None, share: bool = False, max_upload_mb: float = 20.0, **kwargs):
    """Build and serve the app (blocks until stopped). ``host='0.0.0.0'`` serves other machines too: anyone who
    reaches the page can then load any model folder on this machine by name."""
    demo = build_app(model, device=device, dtype=dtype, max_upload_mb=max_upload_mb)
    return demo.launch(server_name=host, server_port=port, share=share, max_file_size=demo.melfusion_max_file_size,
                       show_error=True, **kwargs)
