"""The metric embedders: full-size architectures on the meta device, front ends, loading tiny saved weights back."""

import json
import os

import librosa
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from melfusion.metrics.embedders import (
    EMBEDDERS,
    ClapEmbedder,
    ClipEmbedder,
    Cnn14,
    PANNsEmbedder,
    VGGish,
    VGGishEmbedder,
    load_embedder,
    vggish_examples,
    vggish_log_mel,
)

TINY_VGGISH = {"channels": (4, 8, 8, 16), "hidden": 32, "embedding_dim": 8}
TINY_CNN14 = (2, 4, 4, 8, 8, 16)


def _count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def tiny_vggish(seed: int = 0) -> VGGish:
    torch.manual_seed(seed)
    return VGGish(**TINY_VGGISH).eval()


def tiny_cnn14(seed: int = 0) -> Cnn14:
    torch.manual_seed(seed)
    model = Cnn14(channels=TINY_CNN14)
    for m in model.modules():  # non-trivial batch-norm statistics, so loading them is tested
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def tone(seconds: float, sr: int, freq: float = 440.0, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    noise = np.random.default_rng(seed).standard_normal(t.size) * 0.01
    return (0.5 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


# -- full-size architectures ----------------------------------------------------------------------


def test_full_size_parameter_counts_on_meta():
    with torch.device("meta"):
        vggish, cnn14 = VGGish(), Cnn14()
    assert _count(vggish) == pytest.approx(72.1e6, rel=0.01)  # VGGish: 72.1M
    assert _count(cnn14) == pytest.approx(80.8e6, rel=0.01)  # CNN14: 80.8M (PANNs paper: 81M)
    keys = set(vggish.state_dict())
    assert {f"features.{i}.weight" for i in (0, 3, 6, 8, 11, 13)} <= keys
    assert {f"embeddings.{i}.bias" for i in (0, 2, 4)} <= keys
    assert tuple(vggish.embeddings[0].weight.shape) == (4096, 12288)
    assert {"bn0.running_var", "conv_block6.bn2.num_batches_tracked", "fc_audioset.weight"} <= set(cnn14.state_dict())
    assert tuple(cnn14.fc_audioset.weight.shape) == (527, 2048)


# -- VGGish ---------------------------------------------------------------------------------------


def test_vggish_front_end_shapes_and_tone():
    x = tone(2.0, 16_000, freq=1000.0)
    log_mel = vggish_log_mel(x)
    assert log_mel.shape == (1 + (32_000 - 400) // 160, 64)  # 25 ms windows every 10 ms, no padding
    assert vggish_examples(x).shape == (2, 96, 64)  # non-overlapping 0.96 s examples
    assert vggish_examples(x[:15_000]).shape == (0, 96, 64)  # under 0.975 s: no example
    # a 1 kHz tone peaks in the band whose HTK-mel centre is nearest 1 kHz
    mel = lambda f: 1127 * np.log1p(f / 700)  # noqa: E731
    centres = np.linspace(mel(125), mel(7500), 66)[1:-1]
    assert int(log_mel.mean(0).argmax()) == int(np.abs(centres - mel(1000)).argmin())
    assert log_mel.min() >= np.log(0.01) - 1e-9


def test_vggish_flattens_in_tensorflow_order():
    model = tiny_vggish()
    x = torch.randn(2, 1, 96, 64)
    maps = model.features(x)
    assert maps.shape == (2, 16, 6, 4)
    expected = model.embeddings[:-1](maps.permute(0, 2, 3, 1).reshape(2, -1))
    torch.testing.assert_close(model(x), expected)
    model.final_relu = True
    assert (model(x) >= 0).all()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_vggish_round_trip(tmp_path, suffix):
    model = tiny_vggish()
    path = tmp_path / f"vggish{suffix}"
    if suffix == ".pth":
        torch.save(model.state_dict(), path)  # a plain state dict, as torchvggish publishes it
    else:
        save_file(model.state_dict(), str(path))
    loaded = VGGishEmbedder.from_pretrained(path)
    direct = VGGishEmbedder(tiny_vggish())
    x = tone(2.5, 16_000)
    out = loaded.embed(x)
    assert out.shape == (2, 8) and out.dtype == np.float32
    np.testing.assert_array_equal(out, direct.embed(x))
    assert loaded.identity() == direct.identity()
    assert loaded.identity() != VGGishEmbedder(tiny_vggish(seed=1)).identity()
    assert loaded.identity() != VGGishEmbedder.from_pretrained(path, final_relu=True).identity()
    assert EMBEDDERS.get("vggish") is not None and load_embedder("vggish", tmp_path).source == str(path)


def test_vggish_pca_postprocess(tmp_path):
    path = tmp_path / "vggish.safetensors"
    save_file(tiny_vggish().state_dict(), str(path))
    pca = tmp_path / "pca.pth"
    torch.save({"pca_eigen_vectors": torch.eye(8, dtype=torch.float64), "pca_means": torch.zeros(8, 1)}, pca)
    raw = VGGishEmbedder.from_pretrained(path).embed(tone(1.0, 16_000))
    post = VGGishEmbedder.from_pretrained(path, pca_params=pca, postprocess=True).embed(tone(1.0, 16_000))
    np.testing.assert_array_equal(post, np.floor((np.clip(raw.astype(np.float64), -2, 2) + 2) * 63.75))
    assert post.min() >= 0 and post.max() <= 255
    with pytest.raises(ValueError, match="postprocess: the PCA postprocessing needs PCA params"):
        VGGishEmbedder.from_pretrained(path, postprocess=True)


def test_vggish_errors(tmp_path):
    with pytest.raises(OSError, match="no such file or folder 'nowhere/vggish.pth'"):
        VGGishEmbedder.from_pretrained("nowhere/vggish.pth")
    with pytest.raises(OSError, match="could not fetch weights from the hub repo 'someone/vggish'"):
        VGGishEmbedder.from_pretrained("someone/vggish")  # HF_HUB_OFFLINE=1
    with pytest.raises(OSError, match="none of .* in the folder"):
        VGGishEmbedder.from_pretrained(tmp_path)
    bad = tmp_path / "pickled.pth"
    torch.save({"features.0.weight": torch.zeros(1), "extra": object.__new__(_Opaque)}, bad)
    with pytest.raises(OSError, match="refused to load"):
        VGGishEmbedder.from_pretrained(bad)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"foo": torch.zeros(2)}, str(wrong))
    with pytest.raises(ValueError, match="'features.0.weight'"):
        VGGishEmbedder.from_pretrained(wrong)
    with pytest.raises(ValueError, match="shorter than one VGGish example"):
        VGGishEmbedder(tiny_vggish()).embed(np.zeros(8000, dtype=np.float32))


class _Opaque:
    pass


# -- PANNs CNN14 ----------------------------------------------------------------------------------


def test_cnn14_front_end_matches_librosa():
    x = tone(1.0, 32_000, freq=3000.0)
    ours = tiny_cnn14().log_mel(torch.from_numpy(x)[None])[0, 0].numpy()
    power = librosa.feature.melspectrogram(y=x, sr=32_000, n_fft=1024, hop_length=320, window="hann", center=True,
                                           pad_mode="reflect", power=2.0, n_mels=64, fmin=50, fmax=14_000)
    np.testing.assert_allclose(ours, 10 * np.log10(np.maximum(power, 1e-10)).T, atol=2e-3)


def test_cnn14_round_trip_from_published_layout(tmp_path):
    model = tiny_cnn14()
    state = dict(model.state_dict())
    # the published checkpoint also carries its front end (dropped) and wraps everything in {"model": ...}
    state["spectrogram_extractor.stft.conv_real.weight"] = torch.zeros(513, 1, 1024)
    state["logmel_extractor.melW"] = torch.zeros(513, 64)
    for key in [k for k in state if k.endswith("num_batches_tracked")][:3]:
        del state[key]  # older checkpoints lack some counters
    path = tmp_path / "Cnn14_mAP=0.431.pth"
    torch.save({"model": state, "iteration": 600000}, path)
    loaded = PANNsEmbedder.from_pretrained(tmp_path)
    x = tone(1.5, 32_000)
    out, ref = loaded.embed_outputs(x), PANNsEmbedder(tiny_cnn14()).embed_outputs(x)
    assert out["embedding"].shape == (1, 16) and out["logits"].shape == (1, 527)
    assert (out["embedding"] >= 0).all()  # after fc1's ReLU
    np.testing.assert_array_equal(out["embedding"], ref["embedding"])
    np.testing.assert_array_equal(out["logits"], ref["logits"])
    np.testing.assert_array_equal(loaded.embed(x), out["embedding"])
    st_path = tmp_path / "cnn14.safetensors"
    save_file(model.state_dict(), str(st_path))
    assert PANNsEmbedder.from_pretrained(st_path).identity() == loaded.identity()
    with pytest.raises(ValueError, match="too short for CNN14"):
        loaded.embed(np.zeros(5000, dtype=np.float32))


def test_cnn14_rejects_foreign_weights(tmp_path):
    state = dict(tiny_cnn14().state_dict())
    state["conv_block7.conv1.weight"] = torch.zeros(1)
    path = tmp_path / "extra.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match="do not fit CNN14.*conv_block7"):
        PANNsEmbedder.from_pretrained(path)


# -- CLAP and CLIP (tiny random transformers models, offline tokenizers) ---------------------------


def _bpe_files(folder, vocab):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return str(folder / "vocab.json"), str(folder / "merges.txt")


def make_tiny_clap(folder):
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor, RobertaTokenizer

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4, "\u0120": 5}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab["\u0120" + c] = len(vocab)
    tokenizer = RobertaTokenizer(*_bpe_files(folder / "_tok", vocab))
    features = ClapFeatureExtractor(feature_size=16, sampling_rate=48_000, hop_length=480, max_length_s=1,
                                    fft_window_size=1024, truncation="rand_trunc")
    config = ClapConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=40),
        audio_config=dict(spec_size=64, num_mel_bins=16, patch_size=4, patch_stride=(4, 4), window_size=4,
                          depths=[1, 1], num_attention_heads=[1, 2], hidden_size=16, patch_embeds_hidden_size=8,
                          enable_fusion=False),
        projection_dim=8,
    )
    torch.manual_seed(0)
    ClapModel(config).save_pretrained(folder)
    ClapProcessor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def make_tiny_clip(folder):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(*_bpe_files(folder / "_tok", vocab))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32),
        projection_dim=8,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_joint(tmp_path_factory):
    root = tmp_path_factory.mktemp("joint")
    return make_tiny_clap(root / "clap"), make_tiny_clip(root / "clip")


def test_clap_round_trip(tiny_joint):
    from transformers import ClapModel

    folder = tiny_joint[0]
    clap = ClapEmbedder.from_pretrained(str(folder))
    assert clap.sample_rate == 48_000 and clap.max_samples == 48_000
    x = tone(0.8, 48_000)
    emb = clap.embed(x)
    assert emb.shape == (1, 8)
    assert np.linalg.norm(emb) == pytest.approx(1.0, abs=1e-5)
    texts = clap.embed_text(["a calm piano", "loud drums"])
    assert texts.shape == (2, 8)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    # the same numbers as transformers' own forward pass (cosine similarity times exp(logit_scale_a))
    model = ClapModel.from_pretrained(str(folder)).eval()
    feats = clap.feature_extractor([x], sampling_rate=48_000, return_tensors="pt")
    toks = clap.tokenizer(["a calm piano", "loud drums"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=toks.input_ids, attention_mask=toks.attention_mask, input_features=feats.input_features)
    np.testing.assert_allclose(clap.logit_scale * emb @ texts.T, out.logits_per_audio.numpy(), rtol=1e-4, atol=1e-5)
    # longer than max_length_s: consecutive windows, deterministic
    long = tone(2.5, 48_000)
    np.testing.assert_array_equal(clap.embed(long), clap.embed(long))
    assert clap.identity() == ClapEmbedder.from_pretrained(str(folder)).identity()


def test_clip_round_trip(tiny_joint, tmp_path):
    from PIL import Image

    clip = ClipEmbedder.from_pretrained(str(tiny_joint[1]))
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((40, 50, 3)) * 255).astype(np.uint8)) for _ in range(2)]
    images[1].save(tmp_path / "b.png")
    emb = clip.embed_images([images[0], tmp_path / "b.png"])
    assert emb.shape == (2, 8)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(clip.embed_images(images[1:]), emb[1:], atol=1e-6)
    long_caption = " ".join(["abc"] * 200)  # longer than CLIP's 77 tokens: truncated, not an error
    assert clip.embed_text(["a cat", long_caption]).shape == (2, 8)
    with pytest.raises(TypeError, match="not audio"):
        clip.embed(np.zeros(10))


def test_joint_loading_errors(tmp_path):
    with pytest.raises(OSError, match="clap: no such folder"):
        ClapEmbedder.from_pretrained(str(tmp_path / "../nope/.."))
    with pytest.raises(OSError, match="clip: could not load the model from"):
        ClipEmbedder.from_pretrained(str(tmp_path))
    with pytest.raises(OSError, match="clap: could not load the model from 'someone/missing-clap'"):
        ClapEmbedder.from_pretrained("someone/missing-clap")


def test_hub_offline_is_set():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def save_tiny_embedders(root) -> dict:
    """Tiny VGGish (safetensors), PANNs (a torch.save checkpoint), CLAP and CLIP saved under ``root``:
    ``{"vggish", "panns"}`` paths and ``{"clap", "clip"}`` folder names, as evaluate takes them."""
    weights = root / "weights"
    weights.mkdir()
    save_file(tiny_vggish().state_dict(), str(weights / "vggish.safetensors"))
    torch.save({"model": tiny_cnn14().state_dict()}, weights / "Cnn14_mAP=0.431.pth")
    return {"vggish": weights / "vggish.safetensors", "panns": weights / "Cnn14_mAP=0.431.pth",
            "clap": str(make_tiny_clap(root / "clap")), "clip": str(make_tiny_clip(root / "clip"))}
