"""Nothing a user owns is lost by a save: folders are swapped in whole, foreign files are refused, kills are safe."""

import os
import random
import signal
import stat
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import melfusion as mf
from melfusion.files import (
    OutputExistsError,
    atomic_path,
    check_output,
    clean_leftovers,
    replace_folder,
    write_atomic,
)
from melfusion.pipeline import is_model_entry


def _loads(path: Path) -> mf.MelFusion:
    return mf.MelFusion.from_pretrained(path)


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("saved") / "model"
    tiny_model.save_pretrained(folder)
    return folder


# -- save_pretrained's folder rules ------------------------------------------------------------------------
def test_save_into_a_folder_with_other_files_is_refused_and_keeps_them(tmp_path, tiny_model):
    project = tmp_path / "my-project"
    project.mkdir()
    (project / "notes.txt").write_text("my thesis")
    (project / "data").mkdir()
    (project / "data" / "x.csv").write_text("1,2")
    with pytest.raises(ValueError, match=r"path: .*my-project.*holds files melfusion did not write \(data, notes.txt\)"):
        tiny_model.save_pretrained(project)
    assert (project / "notes.txt").read_text() == "my thesis" and (project / "data" / "x.csv").read_text() == "1,2"
    assert sorted(p.name for p in project.iterdir()) == ["data", "notes.txt"]
    assert _hidden(tmp_path) == []


def test_save_onto_a_model_with_an_extra_file_is_refused(tmp_path, tiny_model, saved):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(saved, folder)
    (folder / "README.md").write_text("my model card")
    (folder / "unet" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="README.md, unet"):
        tiny_model.save_pretrained(folder)
    assert (folder / "README.md").read_text() == "my model card"


def test_save_onto_a_file_is_refused(tmp_path, tiny_model):
    somefile = tmp_path / "somefile"
    somefile.write_text("precious")
    with pytest.raises(ValueError, match="is a file"):
        tiny_model.save_pretrained(somefile)
    assert somefile.read_text() == "precious"


def test_save_into_an_empty_folder_and_over_an_earlier_save(tmp_path, tiny_model):
    folder = tmp_path / "m"
    folder.mkdir()
    tiny_model.save_pretrained(folder)
    first = (folder / "synapse.safetensors").read_bytes()
    with torch.no_grad():
        for p in tiny_model.synapse.mixer.parameters():
            p.add_(0.01)
    try:
        tiny_model.save_pretrained(folder)
    finally:
        with torch.no_grad():
            for p in tiny_model.synapse.mixer.parameters():
                p.sub_(0.01)
    assert (folder / "synapse.safetensors").read_bytes() != first
    assert _hidden(tmp_path) == []  # no temporary or old copies left beside it
    assert all(is_model_entry(p) for p in folder.iterdir())
    _loads(folder)


def test_non_finite_weights_are_never_saved(tmp_path, tiny_model):
    param = next(tiny_model.synapse.mixer.parameters())
    keep = param.detach().clone()
    with torch.no_grad():
        param.fill_(float("nan"))
    try:
        with pytest.raises(ValueError, match="synapse: 1 tensor.*NaN"):
            tiny_model.save_pretrained(tmp_path / "nan")
    finally:
        with torch.no_grad():
            param.copy_(keep)
    assert not (tmp_path / "nan").exists() and _hidden(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_modes_follow_the_umask(tmp_path, tiny_model, umask):
    old = os.umask(umask)
    try:
        folder = tiny_model.save_pretrained(tmp_path / "m")
        log = write_atomic(tmp_path / "log.csv", "a,b\n")
    finally:
        os.umask(old)
    for p in [folder, *folder.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o777 if p.is_dir() else 0o666) & ~umask, (p, oct(mode))
    assert stat.S_IMODE(log.stat().st_mode) == 0o666 & ~umask


# -- leftovers ---------------------------------------------------------------------------------------------
def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_leftovers_of_killed_saves_are_removed_by_the_next_save_only_if_theirs(tmp_path, tiny_model, saved):
    target = tmp_path / "model"
    dead = tmp_path / f".model.melfusion-tmp-{_dead_pid()}-abcd1234"
    alive = tmp_path / f".model.melfusion-tmp-{os.getppid()}-abcd1234"  # a writer still running: kept
    other = tmp_path / ".model.backup"  # not ours: kept
    for d in (dead, alive, other):
        d.mkdir()
        (d / "x").write_text("x")
    tiny_model.save_pretrained(target)
    assert not dead.exists() and alive.exists() and other.exists()


def test_clean_leftovers_restores_a_target_lost_between_two_renames(tmp_path, saved):
    import shutil

    target = tmp_path / "model"
    tmp = tmp_path / f".model.melfusion-tmp-{_dead_pid()}-00000000"
    shutil.copytree(saved, tmp)
    (tmp / ".melfusion-complete").touch()  # what the two-rename fallback marks before its swap
    clean_leftovers(target)
    assert target.is_dir() and not tmp.exists() and not (target / ".melfusion-complete").exists()
    _loads(target)


def test_fallback_swap_without_an_atomic_exchange(tmp_path, tiny_model, saved, monkeypatch):
    import shutil

    from melfusion import files

    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    target = tmp_path / "model"
    shutil.copytree(saved, target)
    tiny_model.save_pretrained(target)
    assert _hidden(tmp_path) == [] and all(is_model_entry(p) for p in target.iterdir())
    _loads(target)


# -- the kill test -----------------------------------------------------------------------------------------
def _save_in_child(model: mf.MelFusion, target: Path, delay: float) -> int:
    """Fork; the child saves ``model`` onto ``target``; the parent SIGKILLs it after ``delay`` seconds."""
    pid = os.fork()
    if pid == 0:  # the child: save, then exit (it never returns into pytest)
        try:
            model.save_pretrained(target)
        finally:
            os._exit(0)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return pid


def _model_pair(tiny_model):
    """Two models with different synapse weights, to tell which one a folder holds."""
    import copy

    other = copy.copy(tiny_model)
    other.synapse = copy.deepcopy(tiny_model.synapse)
    with torch.no_grad():
        for p in other.synapse.mixer.parameters():
            p.add_(0.125)
    return tiny_model, other


def _synapse_bytes(folder: Path) -> bytes:
    return (folder / "synapse.safetensors").read_bytes()


def test_sigkill_at_random_points_of_save_pretrained_leaves_a_complete_model(tmp_path, tiny_model):
    """60 saves onto an existing model, each SIGKILLed at a random instant: the folder is always a whole model."""
    old_model, new_model = _model_pair(tiny_model)
    target = tmp_path / "model"
    old_model.save_pretrained(target)
    versions = {_synapse_bytes(target)}
    new_model.save_pretrained(tmp_path / "ref-new")
    versions.add(_synapse_bytes(tmp_path / "ref-new"))
    start = time.perf_counter()
    new_model.save_pretrained(tmp_path / "timing")
    took = time.perf_counter() - start
    rng = random.Random(0)
    seen = set()
    for trial in range(60):
        model = (old_model, new_model)[trial % 2]
        _save_in_child(model, target, rng.uniform(0, 1.5 * took))
        assert target.is_dir(), trial
        assert all(is_model_entry(p) for p in target.iterdir()), (trial, list(target.iterdir()))
        assert _synapse_bytes(target) in versions, trial
        seen.add(_synapse_bytes(target))
        # the next save (or load) cleans what a killed save left; leftovers never pile up
        assert len([p for p in tmp_path.iterdir() if ".melfusion-tmp-" in p.name]) <= 1, trial
    assert (tmp_path / "timing").is_dir()
    loaded = _loads(target)
    assert loaded.synapse is not None
    old_model.save_pretrained(target)  # a save after the kills removes every leftover
    assert [p for p in tmp_path.iterdir() if ".melfusion-tmp-" in p.name] == []


@pytest.mark.parametrize("kill_at, expect_new", [("apply_umask", False), ("_set_modes", False),
                                                  ("_exchange", False), ("rmtree", True)])
def test_sigkill_at_each_step_of_the_swap(tmp_path, tiny_model, kill_at, expect_new):
    """A kill before the exchange leaves the old model; after it (the old copy not yet removed), the new one."""
    import shutil

    from melfusion import files

    old_model, new_model = _model_pair(tiny_model)
    target = tmp_path / "model"
    old_model.save_pretrained(target)
    new_model.save_pretrained(tmp_path / "ref")
    expected = _synapse_bytes(tmp_path / "ref") if expect_new else _synapse_bytes(target)
    pid = os.fork()
    if pid == 0:
        try:
            owner = shutil if kill_at == "rmtree" else files

            def die(*args, **kwargs):
                os.kill(os.getpid(), signal.SIGKILL)

            setattr(owner, kill_at, die)
            new_model.save_pretrained(target)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert _synapse_bytes(target) == expected
    _loads(target)
    new_model.save_pretrained(target)
    assert [p for p in tmp_path.iterdir() if ".melfusion-tmp-" in p.name] == []


def test_sigkill_inside_the_two_rename_fallback(tmp_path, tiny_model, monkeypatch):
    """Without an atomic exchange, a kill between the two renames is repaired by the next load or save."""
    from melfusion import files

    old_model, new_model = _model_pair(tiny_model)
    target = tmp_path / "model"
    old_model.save_pretrained(target)
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    real_rename = Path.rename

    def rename(self, dst):
        out = real_rename(self, dst)
        if Path(dst).name.startswith(".model.melfusion-tmp-"):  # the old model just moved aside
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    pid = os.fork()
    if pid == 0:
        try:
            monkeypatch.setattr(Path, "rename", rename)
            new_model.save_pretrained(target)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert not target.exists()  # the instant the fallback cannot avoid...
    loaded = _loads(target)  # ...which loading repairs: the new model, complete
    assert loaded is not None and target.is_dir()
    assert [p for p in tmp_path.iterdir() if ".melfusion-tmp-" in p.name and (p / ".melfusion-complete").exists()] == []


# -- files and the output policy ---------------------------------------------------------------------------
def test_atomic_path_leaves_the_old_file_when_the_write_fails(tmp_path):
    target = write_atomic(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


@given(exists=st.booleans(), overwrite=st.booleans(), is_input=st.booleans(), is_dir=st.booleans(),
       suffix=st.sampled_from([".wav", ".WAV", ".flac", ".mp3", "", ".png"]))
def test_check_output_policy(tmp_path_factory, exists, overwrite, is_input, is_dir, suffix):
    folder = tmp_path_factory.mktemp("out")
    path = folder / f"x{suffix}"
    if is_dir:
        path.mkdir()
    elif exists or is_input:
        path.write_bytes(b"user data")
    inputs = [path] if is_input else [folder / "other.png"]
    try:
        check_output(path, "--out", overwrite=overwrite, inputs=inputs, suffixes=(".wav", ".flac", ".ogg"))
    except OutputExistsError as exc:
        assert (exists or is_input) and not is_dir and not overwrite and "--out" in str(exc)
        assert not is_input or suffix.lower() not in (".wav", ".flac")  # an input is refused before that
    except ValueError as exc:
        assert str(exc).startswith("--out: ")
        assert is_dir or suffix.lower() not in (".wav", ".flac") or is_input
    else:
        assert not is_dir and not is_input and suffix.lower() in (".wav", ".flac")
        assert overwrite or not exists
    if path.is_file():
        assert path.read_bytes() == b"user data"  # checking never touches the file


def test_generation_output_save_refuses_existing_files(tmp_path):
    import numpy as np

    out = mf.GenerationOutput(waveforms=np.zeros((2, 800), np.float32), sample_rate=8000, mel=np.zeros((2, 5, 4)))
    (tmp_path / "s_1.wav").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="s_1.wav"):
        out.save(tmp_path / "s.wav")
    assert not (tmp_path / "s_0.wav").exists()  # nothing is written unless everything can be
    paths = out.save(tmp_path / "s.wav", overwrite=True)
    assert [p.name for p in paths] == ["s_0.wav", "s_1.wav"] and (tmp_path / "s_1.wav").stat().st_size > 100
    with pytest.raises(ValueError, match="expected one of"):
        out.save(tmp_path / "s.mp3")
    with pytest.raises(ValueError, match="is a folder"):
        mf.GenerationOutput(out.waveforms[:1], 8000, out.mel[:1]).save(tmp_path)
    bad = mf.GenerationOutput(np.full((1, 10), np.nan, np.float32), 8000, out.mel[:1])
    with pytest.raises(ValueError, match="NaN"):
        bad.save(tmp_path / "nan.wav")
    assert not (tmp_path / "nan.wav").exists()
    out.save_spectrogram(tmp_path / "s.png")
    with pytest.raises(FileExistsError):
        out.save_spectrogram(tmp_path / "s.png")


def test_replace_folder_refuses_before_writing(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "keep").write_text("k")
    with pytest.raises(ValueError, match=r"out: .* \(keep\)"), replace_folder(tmp_path / "t", "out") as tmp:
        (tmp / "never").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


# -- found by a red-team pass ------------------------------------------------------------------------------
@pytest.mark.parametrize("plant", [
    lambda d: (d / "text_encoder.my_notes.safetensors").write_bytes(b"user weights"),
    lambda d: ((d / "unet").mkdir(), (d / "unet" / "config.json").write_text("{}"),
               (d / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"user")),
    lambda d: (d / "synapse.safetensors").write_bytes(b"user file of our name"),
    lambda d: (d / "melfusion_config.json").write_text("{}"),
])
def test_files_that_merely_look_like_ours_are_refused(tmp_path, tiny_model, plant):
    folder = tmp_path / "d"
    folder.mkdir()
    plant(folder)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="holds files melfusion did not write"):
        tiny_model.save_pretrained(folder)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_a_file_the_index_does_not_list_is_the_users(tmp_path, tiny_model, saved):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(saved, folder)
    (folder / "codec.extra.safetensors").write_bytes(b"mine")  # a part name, but not in the index
    with pytest.raises(ValueError, match="codec.extra.safetensors"):
        tiny_model.save_pretrained(folder)


def test_save_through_a_symlink_keeps_the_link(tmp_path, tiny_model):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "lnk"
    link.symlink_to(real)
    tiny_model.save_pretrained(link)
    assert link.is_symlink() and (real / "melfusion_weights.json").is_file()
    tiny_model.save_pretrained(link)  # and again, over the earlier save
    assert link.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["lnk", "real"]
    _loads(link)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="broken symbolic link"):
        tiny_model.save_pretrained(dangling)


def test_odd_save_targets(tmp_path, tiny_model, monkeypatch):
    empty = tmp_path / "cwd"
    empty.mkdir()
    monkeypatch.chdir(empty)
    tiny_model.save_pretrained(".")  # the current folder, empty: allowed, as any empty folder
    assert (empty / "melfusion_weights.json").is_file()
    (tmp_path / "pf").write_text("a file")
    with pytest.raises(ValueError, match="pf.* is a file"):
        tiny_model.save_pretrained(tmp_path / "pf" / "model")
    for bad in ("", None, 123):
        with pytest.raises(ValueError, match="^path: "):
            tiny_model.save_pretrained(bad)


def test_a_malformed_index_or_weights_is_one_error_naming_it(tmp_path, saved):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    for index in (["unet"], {"stored_frozen_modules": ["unet"]}, {"stored_frozen_modules": {"feature_source": "unet"}},
                  {"unet": 5}, {"unet": "../../etc"}, {"synapse": "/etc/passwd"}):
        folder = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
        shutil.copytree(saved, folder)
        (folder / "melfusion_weights.json").write_text(json.dumps(index))
        with pytest.raises(OSError, match="melfusion_weights.json"):
            mf.MelFusion.from_pretrained(folder)
    folder = tmp_path / "nan"
    shutil.copytree(saved, folder)
    tensors = load_file(folder / "synapse.safetensors")
    save_file({k: torch.full_like(v, float("nan")) for k, v in tensors.items()}, folder / "synapse.safetensors")
    with pytest.raises(ValueError, match=r"synapse.safetensors.*NaN"):
        mf.MelFusion.from_pretrained(folder)


def test_a_unet_of_another_model_is_named(tmp_path, saved):
    import shutil

    other = mf.MelFusion.from_config(mf.MelFusionConfig.preset("mini"), weights=False)
    folder = tmp_path / "m"
    shutil.copytree(saved, folder)
    shutil.rmtree(folder / "unet")
    other.denoiser.unet.save_pretrained(folder / "unet", safe_serialization=True)
    # named by the folder whose weights do not fit (the denoiser loads them into the configured architecture)
    with pytest.raises(OSError, match=r"model: cannot load .*unet.* does not fit the model its config describes"):
        mf.MelFusion.from_pretrained(folder)


def test_wrong_types_at_the_loading_api(saved):
    for bad in (None, 123, ""):
        with pytest.raises(ValueError, match="^path: "):
            mf.MelFusion.from_pretrained(bad)
    for dtype in (torch.int8, "int8", "banana"):
        with pytest.raises(ValueError, match="^dtype: "):
            mf.MelFusion.from_pretrained(saved, dtype=dtype)
    assert mf.MelFusion.from_pretrained(saved, dtype="float32").device.type == "cpu"
    for config in (None, 5):
        with pytest.raises(ValueError, match="^config: "):
            mf.MelFusion.from_config(config)
    with pytest.raises(ValueError, match="^config: "):
        mf.MelFusionConfig.load(None)


def test_a_file_that_appears_during_the_write_is_kept(tmp_path):
    """The existence check and the write are one step: a file made by someone else meanwhile is not replaced."""
    target = tmp_path / "song.png"
    with pytest.raises(OutputExistsError, match="appeared"), atomic_path(target, overwrite=False) as tmp:
        tmp.write_bytes(b"ours")
        target.write_bytes(b"theirs, written meanwhile")
    assert target.read_bytes() == b"theirs, written meanwhile"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["song.png"]
    write_atomic(tmp_path / "new.txt", "x", overwrite=False)
    assert (tmp_path / "new.txt").read_text() == "x" and len(list(tmp_path.iterdir())) == 2
