"""Video in (melfusion.video) and the long-form command line: storyboards, continuation, inpainting, --video."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import soundfile as sf

from melfusion.cli import main

av = pytest.importorskip("av", reason="PyAV (melfusion[video]) is not installed")

from melfusion.video import mux, read_storyboard  # noqa: E402

IMG = "examples/images/blue-bright.png"
IMG2 = "examples/images/red-dark.png"
TINY = ["--preset", "tiny", "--steps", "2", "--no-progress"]
COLOURS = [(230, 30, 30), (20, 20, 120), (30, 200, 40)]


def make_video(path, colours=COLOURS, seconds=(1.5, 1.0, 2.0), fps=10, size=(64, 48)):
    container = av.open(str(path), "w")
    stream = container.add_stream("mpeg4", rate=fps)
    stream.width, stream.height = size
    stream.pix_fmt = "yuv420p"
    rng = np.random.default_rng(0)
    for colour, length in zip(colours, seconds, strict=True):
        for _ in range(int(round(length * fps))):
            img = np.clip(np.full((size[1], size[0], 3), colour, int) + rng.integers(-12, 12, (size[1], size[0], 3)),
                          0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)
    container.close()
    return path


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return make_video(tmp_path_factory.mktemp("video") / "clip.mp4")


def test_scenes_are_found_at_the_cuts_with_their_pictures(video):
    story = read_storyboard(video)
    assert [round(s.start, 2) for s in story.scenes] == [0.0, 1.5, 2.5]
    assert story.duration == pytest.approx(4.5)
    assert sum(story.durations) == pytest.approx(story.duration)
    for scene, colour in zip(story.scenes, COLOURS, strict=True):
        mean = np.asarray(scene.image.convert("RGB"), dtype=float).mean(axis=(0, 1))
        assert np.abs(mean - colour).max() < 20  # the scene's own picture


def test_every_n_seconds_and_the_scene_cap(video):
    story = read_storyboard(video, every=1.0)
    assert story.durations == pytest.approx([1.0, 1.0, 1.0, 1.0, 0.5])
    capped = read_storyboard(video, max_scenes=2)
    assert len(capped.scenes) == 2 and sum(capped.durations) == pytest.approx(4.5)
    assert read_storyboard(video, threshold=1.0).durations == pytest.approx([4.5])  # no cut is that large


def test_bad_videos_are_named(tmp_path):
    fake = tmp_path / "fake.mp4"
    fake.write_text("not a video")
    with pytest.raises(ValueError, match="^video: .*fake.mp4"):
        read_storyboard(fake)
    with pytest.raises(ValueError, match="^video: no such file"):
        read_storyboard(tmp_path / "missing.mp4")
    wav = tmp_path / "sound.wav"
    sf.write(wav, np.zeros(16000, np.float32), 16000)
    with pytest.raises(ValueError, match="^video: .*(no video stream|not a video)"):
        read_storyboard(wav)


def test_mux_copies_the_video_and_adds_the_soundtrack(video, tmp_path):
    out = tmp_path / "scored.mp4"
    wave = (0.3 * np.sin(np.arange(int(4.5 * 16000)) / 8)).astype(np.float32)
    mux(video, wave, 16000, out)
    with av.open(str(out)) as c:
        kinds = sorted(s.type for s in c.streams)
        audio = c.streams.audio[0]
        assert kinds == ["audio", "video"] and audio.codec_context.name == "aac"
        decoded = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio)])
    assert decoded.size == pytest.approx(wave.size, abs=2048)
    with av.open(str(video)) as a, av.open(str(out)) as b:  # the video stream is copied, not re-encoded
        assert [p.size for p in a.demux(a.streams.video[0]) if p.dts is not None] == \
            [p.size for p in b.demux(b.streams.video[0]) if p.dts is not None]
    with pytest.raises(ValueError, match="mux"):
        mux(video, wave, 16000, video, overwrite=True)  # never onto its input
    with pytest.raises(FileExistsError):
        mux(video, wave, 16000, out)
    with pytest.raises(ValueError, match="mux"):
        mux(video, wave, 16000, tmp_path / "x.avi")


def test_without_pyav_the_error_says_what_to_install(video, monkeypatch):
    from melfusion.video import require_av

    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(ImportError, match=r"melfusion\[video\]"):
        require_av()
    assert main(["generate", "--video", str(video), "--text", "x", "--out", "/tmp/never.wav", *TINY]) == 2


# -- the command line ------------------------------------------------------------------------------------------
def test_cli_storyboard_from_two_pictures(tmp_path, capsys):
    out = tmp_path / "story.wav"
    assert main(["generate", "--image", IMG, "--image", IMG2, "--text", "calm", "--text", "lively",
                 "--durations", "1.0", "1.5", "--out", str(out), *TINY]) == 0
    wave, sr = sf.read(out)
    assert wave.shape[0] == int(2.5 * sr)
    assert "sections: 0.00-1.00 s, 1.00-2.50 s" in capsys.readouterr().out


def test_cli_video_in_and_muxed_out(video, tmp_path):
    out, scored = tmp_path / "music.wav", tmp_path / "scored.mp4"
    assert main(["generate", "--video", str(video), "--text", "calm", "--out", str(out), "--mux", str(scored),
                 *TINY]) == 0
    wave, sr = sf.read(out)
    assert wave.shape[0] == pytest.approx(4.5 * sr, abs=2)  # as long as the video
    with av.open(str(scored)) as c:
        assert len(c.streams.audio) == 1 and len(c.streams.video) == 1


def test_cli_continue_and_regenerate(tmp_path):
    first = tmp_path / "first.wav"
    assert main(["generate", "--image", IMG, "--text", "calm", "--out", str(first), *TINY]) == 0
    given, sr = sf.read(first, dtype="float32")
    longer = tmp_path / "longer.wav"
    assert main(["generate", "--image", IMG, "--text", "calm", "--audio", str(first), "--continue-seconds", "1",
                 "--out", str(longer), *TINY]) == 0
    assert sf.info(longer).frames == given.size + sr
    fixed = tmp_path / "fixed.wav"
    assert main(["generate", "--image", IMG2, "--text", "lively", "--audio", str(first), "--regenerate", "0.2",
                 "0.8", "--out", str(fixed), *TINY]) == 0
    repaired, _ = sf.read(fixed, dtype="float32")
    np.testing.assert_allclose(repaired[: int(0.2 * sr)], given[: int(0.2 * sr)], atol=1 / 2**15)


@pytest.mark.parametrize("argv, flag", [
    (["--image", IMG, "--image", IMG2, "--durations", "1"], "--durations"),
    (["--image", IMG, "--continue-seconds", "1"], "--continue-seconds"),
    (["--image", IMG, "--regenerate", "1", "2"], "--regenerate"),
    (["--image", IMG, "--mux", "x.mp4"], "--mux"),
    (["--image", IMG, "--every", "2"], "--every"),
    (["--image", IMG, "--image", "missing.png"], "--image"),
    (["--image", IMG, "--image", IMG2, "--crossfade", "-1"], "--crossfade"),
    (["--image", IMG, "--audio", "missing.wav", "--continue-seconds", "1"], "--audio"),
    (["--video", "missing.mp4"], "--video"),
    (["--video", "VIDEO", "--image", IMG], "--video"),
    (["--video", "VIDEO", "--durations", "1"], "--durations"),
])
def test_cli_bad_long_form_flags_get_one_line_and_status_2(argv, flag, video, tmp_path, capsys):
    argv = [str(video) if a == "VIDEO" else a for a in argv]
    code = main(["generate", *argv, "--text", "x", "--out", str(tmp_path / "o.wav"), *TINY])
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("note: --preset")]
    assert code == 2 and len(lines) == 1 and flag in lines[0] and "Traceback" not in lines[0]


def test_cli_regenerate_outside_the_audio_is_named(tmp_path, capsys):
    clip = tmp_path / "clip.wav"
    sf.write(clip, np.zeros(16000, np.float32), 16000)
    code = main(["generate", "--image", IMG, "--text", "x", "--audio", str(clip), "--regenerate", "0.5", "3",
                 "--out", str(tmp_path / "o.wav"), *TINY])
    assert code == 2 and "--regenerate" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF0000WAVEfmt garbage")
    code = main(["generate", "--image", IMG, "--text", "x", "--audio", str(corrupt), "--continue-seconds", "1",
                 "--out", str(tmp_path / "o.wav"), *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "corrupt.wav" in err
