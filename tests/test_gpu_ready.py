"""What can be checked on a CPU of the GPU paths: attention through scaled_dot_product_attention everywhere,
torch.compile of the music denoiser without recompiles from the synapse's per-step features, dtype moves."""

import numpy as np
import pytest
import torch

import melfusion as mf
from melfusion.synapse.processors import CaptureProcessor, InjectProcessor, KVProcessor

IMAGE = "examples/images/blue-bright.png"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return mf.MelFusion.from_config("tiny")


def attention_processors(model) -> dict[str, object]:
    out = {}
    for part in (model.feature_source, model.denoiser):
        for name, module in part.stored_modules().items():
            for key, proc in getattr(module, "attn_processors", {}).items():
                out[f"{type(part).__name__}.{name}.{key}"] = proc
    return out


def test_every_attention_runs_through_sdpa(tiny):
    from diffusers.models.attention_processor import AttnProcessor2_0

    procs = attention_processors(tiny)
    assert len(procs) >= 8
    ours = (KVProcessor, CaptureProcessor, InjectProcessor)
    kinds = {type(p).__name__ for p in procs.values()}
    assert all(isinstance(p, (AttnProcessor2_0, *ours)) for p in procs.values()), kinds
    assert any(isinstance(p, ours) for p in procs.values())  # the synapse's own, installed on the music UNet


def test_synapse_attention_calls_sdpa(tiny, monkeypatch):
    import torch.nn.functional as F

    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(args[0].dtype)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    tiny.generate(image=IMAGE, text="x", num_inference_steps=1, seed=0, progress=False)
    layers = len(tiny.synapse.music_layer_names)
    assert len(calls) >= layers  # every synapse layer at least once (and the stock processors too)


def test_compiled_denoiser_gives_the_same_audio_without_recompiling(tiny):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    ref = tiny.generate(image=IMAGE, text="x", num_inference_steps=3, seed=0, progress=False).waveforms
    # another picture, seed and step count, and a prompt of as many tokens (another length is another shape: one
    # more compilation, as for any compiled model, unless dynamic=True)
    other_ref = tiny.generate(image="examples/images/red-dark.png", text="q", num_inference_steps=4,
                              seed=1, progress=False).waveforms
    torch.manual_seed(0)
    model = mf.MelFusion.from_config("tiny")
    model.compile(backend="eager", dynamic=False)  # dynamo's tracing and guards, without a C++ toolchain
    out = model.generate(image=IMAGE, text="x", num_inference_steps=3, seed=0, progress=False).waveforms
    graphs = counters["stats"]["unique_graphs"]
    other = model.generate(image="examples/images/red-dark.png", text="q", num_inference_steps=4,
                           seed=1, progress=False).waveforms
    assert graphs == 1  # one graph for the whole denoiser: no graph breaks in the synapse's processors
    assert counters["stats"]["unique_graphs"] == graphs  # another picture, prompt and step count: no recompile
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(other, other_ref, rtol=0, atol=1e-6)
    torch._dynamo.reset()


# -- model CPU offload ------------------------------------------------------------------------------------------
def test_model_cpu_offload_chains_the_parts_in_the_order_generation_runs_them(monkeypatch):
    from accelerate.hooks import CpuOffload

    torch.manual_seed(0)
    model = mf.MelFusion.from_config("tiny")
    ref = model.generate(image=IMAGE, text="x", num_inference_steps=2, seed=0, progress=False).waveforms
    names = {id(m): f"{part}.{attr}" for part in model.OFFLOAD_ORDER
             for attr, m in getattr(model, part).stored_modules().items()}
    seen = []
    real = CpuOffload.pre_forward

    def spy(self, module, *args, **kwargs):
        seen.append(names.get(id(module), "?"))
        return real(self, module, *args, **kwargs)

    monkeypatch.setattr(CpuOffload, "pre_forward", spy)
    model.enable_model_cpu_offload("cpu")  # the CPU as the "accelerator": the hooks run, nothing moves
    assert model.device == torch.device("cpu") and len(model.offload["hooks"]) == 4
    out = model.generate(image=IMAGE, text="x", num_inference_steps=2, seed=0, progress=False).waveforms
    np.testing.assert_array_equal(out, ref)
    first = [seen[i] for i in range(len(seen)) if i == 0 or seen[i] != seen[i - 1]]  # runs of one module
    # the tiny preset's codec (identity) and vocoder (Griffin-Lim) hold no weights: nothing to offload there
    assert first == ["text_encoder.model", "feature_source.vae", "feature_source.unet", "denoiser.unet"], first
    model.to("cpu")  # undoes it
    assert model.offload is None
