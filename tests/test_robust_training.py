"""Training never loses what a user owns, never lets a non-finite value pass, and answers each bad input with one
line: config fields, NaN weights, run folders, the run lock, max_steps, resume with other data, file modes,
corrupt checkpoints, empty data."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from melfusion.checks import NonFiniteError
from melfusion.datasets import write_toy_manifest
from melfusion.training import (
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from melfusion.training.logs import TrainingLog
from melfusion.training.runfolder import LOCK_NAME, RunFolderLockedError, RunLock
from melfusion.training.trainer import NonFiniteWeightsError

sys.path.insert(0, str(Path(__file__).parent))
from test_training import make_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return write_toy_manifest(tmp_path_factory.mktemp("toy"), n=8, seconds=1.0)


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text, text
    return text


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder`` with its bytes (None for folders)."""
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))}


# -- 1. config fields ---------------------------------------------------------------------------------------------

# dotted field -> (lowest allowed, highest allowed, low open, high open); None: unbounded
FLOAT_FIELDS = {
    "optim.unet_lr": (0.0, None, True, False),
    "optim.synapse_lr": (0.0, None, True, False),
    "optim.alpha_lr": (0.0, None, True, False),
    "optim.weight_decay": (0.0, None, False, False),
    "optim.eps": (0.0, None, True, False),
    "optim.max_grad_norm": (0.0, None, True, False),
    "optim.betas.0": (0.0, 1.0, False, True),
    "optim.betas.1": (0.0, 1.0, False, True),
    "ema.decay": (0.0, 1.0, True, True),
    "data.seconds": (0.0, None, True, False),
    "min_snr_gamma": (0.0, None, True, False),
    "text_dropout": (0.0, 1.0, False, False),
    "image_dropout": (0.0, 1.0, False, False),
}


def with_field(dotted: str, value) -> dict:
    """A config mapping with ``dotted`` set (``optim.betas.1`` sets one beta)."""
    parts = dotted.split(".")
    if parts[-1].isdigit():
        betas = [0.9, 0.999]
        betas[int(parts[-1])] = value
        return {"optim": {"betas": betas}}
    data: dict = {}
    target = data
    for p in parts[:-1]:
        target = target.setdefault(p, {})
    target[parts[-1]] = value
    return data


def in_range(value: float, low, high, low_open, high_open) -> bool:
    if not math.isfinite(value):
        return False
    if low is not None and (value <= low if low_open else value < low):
        return False
    return not (high is not None and (value >= high if high_open else value > high))


@settings(max_examples=120, deadline=None)
@given(field=st.sampled_from(sorted(FLOAT_FIELDS)),
       value=st.one_of(st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1.0, -1e-9]),
                       st.floats(allow_nan=True, allow_infinity=True)))
def test_every_float_field_rejects_non_finite_and_out_of_range(field, value):
    low, high, low_open, high_open = FLOAT_FIELDS[field]
    data = with_field(field, value)
    if in_range(value, low, high, low_open, high_open):
        TrainConfig.from_dict(data)
        return
    with pytest.raises(ValueError) as info:
        TrainConfig.from_dict(data)
    assert one_line(info.value).startswith(field + ":"), (field, value, str(info.value))


@settings(max_examples=40, deadline=None)
@given(field=st.sampled_from(sorted(FLOAT_FIELDS)), text=st.sampled_from([".inf", "-.inf", ".nan", ".NaN", "1e999"]))
def test_yaml_infinities_are_one_line_naming_the_file_and_field(tmp_path_factory, field, text):
    path = tmp_path_factory.mktemp("cfg") / "train.yaml"
    parts = field.split(".")
    if parts[-1].isdigit():
        betas = ["0.9", "0.999"]
        betas[int(parts[-1])] = text
        body = f"optim:\n  betas: [{', '.join(betas)}]\n"
    else:
        body = "".join(f"{'  ' * i}{p}:\n" for i, p in enumerate(parts[:-1])) + f"{'  ' * (len(parts) - 1)}{parts[-1]}: {text}\n"
    path.write_text("model: tiny\n" + body)
    with pytest.raises(ValueError) as info:
        TrainConfig.load(path)
    message = one_line(info.value)
    assert str(path) in message and field + ":" in message, message


@pytest.mark.parametrize("fields, name", [
    ({"seed": -1}, "seed"), ({"seed": 2**63}, "seed"), ({"output": ""}, "output"),
    ({"data": {"manifest": ""}}, "data.manifest"), ({"optim": {"warmup_steps": -1}}, "optim.warmup_steps"),
    ({"max_steps": 0}, "max_steps"), ({"batch_size": 0}, "batch_size"), ({"optim": {"eps": "inf"}}, "optim.eps"),
])
def test_other_bad_fields_are_one_line_naming_them(fields, name):
    with pytest.raises(ValueError) as info:
        TrainConfig.from_dict(fields)
    assert one_line(info.value).startswith(name + ":"), str(info.value)


def test_cli_rejects_an_infinite_learning_rate_with_one_line_and_exit_2(toy, tmp_path, capsys):
    from melfusion.cli import main

    config = tmp_path / "t.yaml"
    config.write_text("model: tiny\noptim: {unet_lr: .inf}\n")
    assert main(["train", "--config", str(config), "--manifest", str(toy), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "optim.unet_lr" in err, err
    assert not (tmp_path / "run").exists()
    config.write_text("model: tiny\noptim: [unclosed\n")
    assert main(["train", "--config", str(config), "--output", str(tmp_path / "run")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_overrides_do_not_change_the_callers_mapping():
    data = {"data": {"manifest": "a.jsonl"}}
    cfg = TrainConfig.from_dict(data, **{"data.manifest": "b.jsonl"})
    assert cfg.data.manifest == "b.jsonl" and data == {"data": {"manifest": "a.jsonl"}}
    assert TrainConfig.from_dict({"data": None}, **{"data.manifest": "c.jsonl"}).data.manifest == "c.jsonl"


# -- 2. non-finite weights are never saved ------------------------------------------------------------------------


def poison_at(trainer: Trainer, step: int) -> None:
    """Make the optimizer step that completes ``step`` (1-based) write a NaN into one trained weight."""
    real = trainer.optimizer.step

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        if trainer.step + 1 == step:
            with torch.no_grad():
                next(iter(trainer._trained().values())).view(-1)[0] = float("nan")
        return out

    trainer.optimizer.step = poisoned


def test_nan_weights_stop_training_and_keep_the_last_good_checkpoint(toy, tmp_path):
    trainer = Trainer(make_config(toy, tmp_path / "run", max_steps=4, checkpoint_every=2))
    poison_at(trainer, 3)
    with pytest.raises(NonFiniteWeightsError, match=r"after step 3.*step-00000002") as info:
        trainer.train()
    assert isinstance(info.value, NonFiniteLossError)  # the CLI's handler for a diverged run covers both
    one_line(info.value)
    folder = tmp_path / "run" / "checkpoints"
    assert [p.name for p in folder.iterdir()] == ["step-00000002"]
    tensors, state = load_checkpoint(folder / "step-00000002")
    assert state["step"] == 2
    assert not (tmp_path / "run" / "model").exists()


def test_nan_weights_at_the_last_step_write_neither_checkpoint_nor_model(toy, tmp_path):
    trainer = Trainer(make_config(toy, tmp_path / "run", max_steps=2, checkpoint_every=2))
    poison_at(trainer, 2)
    with pytest.raises(NonFiniteWeightsError, match="after step 2"):
        trainer.train()
    assert latest_checkpoint(tmp_path / "run" / "checkpoints") is None
    assert not (tmp_path / "run" / "model").exists()


def test_save_state_and_save_model_refuse_non_finite_weights(toy, tmp_path):
    trainer = Trainer(make_config(toy, tmp_path / "run", max_steps=2, checkpoint_every=2))
    trainer.train()
    before = tree(tmp_path / "run" / "model"), tree(tmp_path / "run" / "checkpoints")
    with torch.no_grad():
        next(iter(trainer._trained().values())).view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match="step-00000002"):
        trainer.save_state()
    with pytest.raises(NonFiniteWeightsError):
        trainer.save_model()
    assert (tree(tmp_path / "run" / "model"), tree(tmp_path / "run" / "checkpoints")) == before


def test_save_checkpoint_refuses_non_finite_tensors_and_state(tmp_path):
    good = {"trainable": {"w": torch.ones(3)}}
    first = save_checkpoint(tmp_path, 1, good, {"step": 1})
    for tensors, state in (({"trainable": {"w": torch.tensor([1.0, math.nan])}}, {"step": 2}),
                           ({"optimizer": {"state.0.exp_avg_sq": torch.tensor([math.inf])}}, {"step": 2}),
                           (good, {"step": 2, "lr": math.nan})):
        with pytest.raises(NonFiniteError) as info:
            save_checkpoint(tmp_path, 2, tensors, state)
        one_line(info.value)
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


# -- 3. the run folder ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("setup", ["foreign-file", "foreign-folder", "model-is-a-file", "output-is-a-file"])
def test_a_folder_that_is_not_a_run_is_refused_before_anything_is_written(toy, tmp_path, setup):
    out = tmp_path / "mine"
    if setup == "output-is-a-file":
        out.write_text("my notes")
    else:
        out.mkdir()
        if setup == "foreign-file":
            (out / "thesis.tex").write_text("years of work")
        elif setup == "foreign-folder":
            (out / "photos").mkdir()
            (out / "photos" / "a.jpg").write_bytes(b"jpeg")
        else:
            (out / "model").write_text("not a model folder")
    before = out.read_bytes() if out.is_file() else tree(out)
    with pytest.raises(ValueError) as info:
        Trainer(make_config(toy, out))
    message = one_line(info.value)
    assert str(out) in message and "output" in message
    if setup != "output-is-a-file":
        assert {"foreign-file": "thesis.tex", "foreign-folder": "photos", "model-is-a-file": "model"}[setup] in message
    assert (out.read_bytes() if out.is_file() else tree(out)) == before


@pytest.mark.parametrize("entry", ["train_log.csv", "model", "train_config.yaml", "checkpoints"])
def test_a_fresh_run_refuses_a_previous_run_without_changing_it(toy, tmp_path, entry):
    out = tmp_path / "run"
    out.mkdir()
    if entry == "model":
        (out / "model").mkdir()
        (out / "model" / "melfusion_config.json").write_text("{}")
    elif entry == "checkpoints":
        (out / "checkpoints" / ".step-00000002.melfusion-tmp-1-ab").mkdir(parents=True)  # a killed first save
    else:
        (out / entry).write_text("step,loss\n1,0.5\n")
    before = tree(out)
    trainer = Trainer(make_config(toy, out, max_steps=2))
    with pytest.raises(FileExistsError, match="--resume") as info:
        trainer.train()
    assert str(out) in one_line(info.value) and entry in str(info.value)
    # the run's files are untouched; skipped_rows.json (the manifest's validation report, which every Trainer
    # refreshes as it reads the manifest) and the lock file are the only additions
    after = tree(out)
    assert {k: v for k, v in after.items() if k not in (LOCK_NAME, "skipped_rows.json")} == before


def test_a_fresh_run_accepts_an_empty_folder_and_reuses_the_cache(toy, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    Trainer(make_config(toy, out, max_steps=1, checkpoint_every=1)).train()
    for name in ("train_log.csv", "train_config.yaml", "checkpoints", "model"):
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    assert (out / "cache").is_dir()  # left: reusable, not a run
    assert Trainer(make_config(toy, out, max_steps=1, checkpoint_every=1)).train().step == 1


def test_a_user_file_in_a_run_folder_survives_a_resume(toy, tmp_path):
    out = tmp_path / "run"
    Trainer(make_config(toy, out, max_steps=2)).train()
    (out / "notes.txt").write_text("lr 1e-3 looked good")
    assert Trainer(make_config(toy, out, max_steps=4)).train(resume=True).step == 4
    assert (out / "notes.txt").read_text() == "lr 1e-3 looked good"
    with pytest.raises(ValueError, match="notes.txt"):  # and a fresh run there names it
        Trainer(make_config(toy, out, max_steps=4)).train()


def test_a_failed_start_leaves_no_folder_behind(toy, tmp_path):
    out = tmp_path / "new" / "run"
    with pytest.raises(ValueError, match="none.jsonl"):
        Trainer(make_config(tmp_path / "none.jsonl", out))
    assert not out.exists()


# -- 3b. checkpoint folders ------------------------------------------------------------------------------------


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_checkpoint_leftovers_are_cleaned_and_a_lost_old_checkpoint_comes_back(tmp_path):
    pid = dead_pid()
    good = {"trainable": {"w": torch.ones(2)}}
    save_checkpoint(tmp_path, 2, good, {"step": 2})
    (tmp_path / f".step-00000004.melfusion-tmp-{pid}-0badc0de").mkdir()  # a killed write of step 4
    (tmp_path / f".tmp-step-00000006-{pid}").mkdir()  # older versions' names
    old = tmp_path / f".old-step-00000008-{pid}"  # killed between the old two renames: step 8 only here
    old.mkdir()
    save_file({"w": torch.ones(2)}, str(old / "trainable.safetensors"))
    (old / "state.json").write_text(json.dumps({"step": 8}))
    save_checkpoint(tmp_path, 3, good, {"step": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002", "step-00000003", "step-00000008"]
    assert load_checkpoint(tmp_path / "step-00000008")[1] == {"step": 8}


def test_a_repeated_step_is_replaced_whole_and_foreign_files_are_refused(tmp_path):
    save_checkpoint(tmp_path, 2, {"trainable": {"w": torch.ones(2)}, "ema": {"w": torch.ones(2)}}, {"step": 2})
    save_checkpoint(tmp_path, 2, {"trainable": {"w": torch.zeros(2)}}, {"step": 2, "again": True})
    tensors, state = load_checkpoint(tmp_path / "step-00000002")
    assert set(tensors) == {"trainable"} and state["again"] and torch.equal(tensors["trainable"]["w"], torch.zeros(2))
    (tmp_path / "step-00000002" / "README").write_text("mine")
    with pytest.raises(ValueError, match="README"):
        save_checkpoint(tmp_path, 2, {"trainable": {"w": torch.ones(2)}}, {"step": 2})
    assert (tmp_path / "step-00000002" / "README").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002"]


# -- 4. the run lock ---------------------------------------------------------------------------------------------

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from melfusion.training.runfolder import RunLock
    lock = RunLock(sys.argv[1]).acquire()  # held while this process lives
    print("locked", flush=True)
    time.sleep(120)
""")


def test_a_second_training_into_a_locked_folder_fails_at_once_and_a_killed_holder_does_not_block(toy, tmp_path):
    out = tmp_path / "run"
    with RunLock(out):  # in this process, as a second Trainer would see it
        with pytest.raises(RunFolderLockedError) as info:
            Trainer(make_config(toy, out, max_steps=1))
        assert str(out) in one_line(info.value) and isinstance(info.value, OSError)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderLockedError, match=rf"process {holder.pid}"):
            Trainer(make_config(toy, out, max_steps=1))
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    trainer = Trainer(make_config(toy, out, max_steps=1, checkpoint_every=1))  # the dead holder's lock is gone
    with pytest.raises(RunFolderLockedError):  # while a trainer is alive, the folder is its
        Trainer(make_config(toy, out, max_steps=1))
    assert trainer.train().step == 1
    # train() released it: the next run resumes (the same object, or a new one)
    assert Trainer(make_config(toy, out, max_steps=2, checkpoint_every=1)).train(resume=True).step == 2


# -- 5. max_steps and resume arguments ---------------------------------------------------------------------------------


def test_max_steps_and_resume_arguments_are_checked(toy, tmp_path):
    trainer = Trainer(make_config(toy, tmp_path / "run", max_steps=4))
    for bad in (0, -1, 1.5, 2.0, "3", True):
        with pytest.raises(ValueError, match="^max_steps") as info:
            trainer.train(max_steps=bad)
        one_line(info.value)
    for bad in ("", 3, 1.0):
        with pytest.raises(ValueError, match="^resume"):
            trainer.train(resume=bad)
    assert not (tmp_path / "run" / "train_log.csv").exists()  # nothing ran
    assert trainer.train(max_steps=np.int64(2)).step == 2
    with pytest.raises(ValueError, match="max_steps: 1 is before step 2"):
        trainer.train(max_steps=1)
    assert trainer.train(max_steps=3).step == 3  # the same trainer continues its own run


# -- 6. resume with other data ----------------------------------------------------------------------------------


def test_resume_with_another_or_a_changed_manifest_warns_naming_both(toy, tmp_path):
    out = tmp_path / "run"
    Trainer(make_config(toy, out, max_steps=6, checkpoint_every=1)).train(max_steps=1)
    state = json.loads((out / "checkpoints" / "step-00000001" / "state.json").read_text())
    assert state["manifest"]["path"] == str(toy.resolve()) and len(state["manifest"]["sha256"]) == 64

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same manifest: no warning
        Trainer(make_config(toy, out, max_steps=6, checkpoint_every=1)).train(max_steps=2, resume=True)

    other = toy.parent / "other.jsonl"
    other.write_text(toy.read_text())
    with pytest.warns(UserWarning, match="resume") as record:
        Trainer(make_config(other, out, max_steps=6, checkpoint_every=1)).train(max_steps=3, resume=True)
    message = " ".join(str(w.message) for w in record)
    assert str(toy.resolve()) in message and str(other.resolve()) in message

    other.write_text("\n".join(toy.read_text().splitlines()[:6]) + "\n")  # the file changed under the same name
    with pytest.warns(UserWarning, match="changed since the checkpoint"):
        Trainer(make_config(other, out, max_steps=6, checkpoint_every=1)).train(max_steps=4, resume=True)

    # a checkpoint from before the record resumes without it
    path = out / "checkpoints" / "step-00000004" / "state.json"
    old = json.loads(path.read_text())
    old.pop("manifest")
    path.write_text(json.dumps(old))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Trainer(make_config(other, out, max_steps=6, checkpoint_every=1)).train(
            max_steps=5, resume=True).step == 5


# -- 7. file modes follow the umask ---------------------------------------------------------------------------


def test_run_files_and_folders_follow_the_umask(toy, tmp_path):
    old = os.umask(0o027)
    try:
        out = tmp_path / "run"
        Trainer(make_config(toy, out, max_steps=2, checkpoint_every=1, plot=True)).train()
    finally:
        os.umask(old)
    checked = list(out.rglob("*"))
    assert any(p.name == "training.png" for p in checked) and any(p.parent.name == "step-00000002" for p in checked)
    wrong = {str(p.relative_to(out)): oct(stat.S_IMODE(p.stat().st_mode)) for p in checked
             if stat.S_IMODE(p.stat().st_mode) != (0o750 if p.is_dir() else 0o640)}
    assert not wrong, wrong


# -- 8. corrupt checkpoints, empty data ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(toy, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    Trainer(make_config(toy, out, max_steps=2, checkpoint_every=2)).train()
    return out


def _truncate(ck: Path) -> None:
    f = ck / "trainable.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _state(edit):
    def apply(ck: Path) -> None:
        path = ck / "state.json"
        state = json.loads(path.read_text())
        path.write_text(json.dumps(edit(state)))
    return apply


def _tensors(stem: str, edit):
    def apply(ck: Path) -> None:
        path = ck / f"{stem}.safetensors"
        tensors = load_file(str(path))
        save_file(edit(tensors), str(path))
    return apply


def _first(tensors, value_fn):
    key = sorted(tensors)[0]
    return {**tensors, key: value_fn(tensors[key])}


CORRUPTIONS = {
    "truncated-weights": (_truncate, OSError, "trainable.safetensors"),
    "garbage-state": (lambda ck: (ck / "state.json").write_bytes(b"\xff\x00{"), OSError, "state.json"),
    "state-is-a-list": (lambda ck: (ck / "state.json").write_text("[1, 2]"), OSError, "state.json"),
    "state-without-optimizer": (_state(lambda s: {k: v for k, v in s.items() if k != "optimizer"}), OSError,
                                "optimizer"),
    "state-step-mismatch": (_state(lambda s: {**s, "step": 7}), OSError, "step 7"),
    "nan-weights": (_tensors("trainable", lambda t: _first(t, lambda v: torch.full_like(v, math.nan))),
                    NonFiniteError, "trainable.safetensors"),
    "resized-weights": (_tensors("trainable", lambda t: _first(t, lambda v: torch.zeros(v.numel() + 1))),
                        ValueError, "shapes"),
    "resized-optimizer-state": (_tensors("optimizer", lambda t: {
        **t, next(k for k in sorted(t) if k.endswith("exp_avg")): torch.zeros(3, 3, 3)}), ValueError, "exp_avg"),
    "no-weights-file": (lambda ck: (ck / "trainable.safetensors").unlink(), OSError, "trainable.safetensors"),
    "no-optimizer-file": (lambda ck: (ck / "optimizer.safetensors").unlink(), OSError, "optimizer.safetensors"),
    "bad-scheduler": (_state(lambda s: {**s, "lr_scheduler": [1]}), OSError, "lr_scheduler"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_a_corrupt_checkpoint_is_one_line_naming_it(toy, trained_run, tmp_path, case):
    corrupt, kind, needle = CORRUPTIONS[case]
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    ck = out / "checkpoints" / "step-00000002"
    corrupt(ck)
    trainer = Trainer(make_config(toy, out, max_steps=4, checkpoint_every=2))
    before = {k: v.detach().clone() for k, v in trainer._trained().items()}
    with pytest.raises(kind) as info:
        trainer.train(resume=True)
    assert isinstance(info.value, (ValueError, OSError))
    message = one_line(info.value)
    assert needle in message, message
    assert "step-00000002" in message, message
    assert trainer.step == 0
    for k, v in trainer._trained().items():  # nothing was half-loaded
        assert torch.equal(before[k], v.detach()), k


def test_all_rows_skipped_is_one_line_naming_the_manifest(toy, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"captions": "x", "location": str(tmp_path / "nope.wav"),
                               "img_path": str(tmp_path / "nope.png")}) + "\n")
    with pytest.warns(UserWarning, match="skipping 1 bad rows"), pytest.raises(ValueError) as info:
        Trainer(make_config(bad, tmp_path / "run", data={"on_bad_rows": "skip"}))
    assert "data.manifest" in one_line(info.value) and "bad.jsonl" in str(info.value)


@pytest.mark.parametrize("fields, name", [({"inversion_steps": 5000, "image_features": "inverted"}, "inversion_steps"),
                                          ({"data": {"seconds": 1e9}}, "data.seconds")])
def test_impossible_sizes_are_refused_before_training(toy, tmp_path, fields, name):
    with pytest.raises(ValueError) as info:
        Trainer(make_config(toy, tmp_path / "run", **fields))
    assert one_line(info.value).startswith(name), str(info.value)
    assert not (tmp_path / "run").exists()


def test_a_half_written_log_line_does_not_break_a_resume(tmp_path):
    log = TrainingLog(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        log.write(step, 0.5, {"unet": 1e-3}, [0.5], 10.0, 1.0)
    with open(tmp_path / "train_log.csv", "a") as f:
        f.write("4,0.4")  # killed mid-row
    log.truncate_after(2)
    rows = (tmp_path / "train_log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]


def test_mini_recipe_checks_its_settings_and_output_first(tmp_path):
    from melfusion.training.mini import MiniRecipe, train_mini

    for fields, name in (({"unet_lr": math.inf}, "unet_lr"), ({"music_steps": 0}, "music_steps"),
                         ({"image_dropout": math.nan}, "image_dropout"), ({"seed": -1}, "seed")):
        with pytest.raises(ValueError, match=f"^{name}"):
            MiniRecipe(**fields)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="thesis.tex"):
        train_mini(tmp_path / "mine", MiniRecipe(n_train=4, n_heldout=2), progress=False)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["thesis.tex"]


def test_image_ldm_stages_check_their_arguments(tiny_model):
    from melfusion.training.image_ldm import train_image_unet, train_image_vae

    fs = tiny_model.feature_source
    images = torch.rand(2, 3, fs.resolution, fs.resolution, generator=torch.Generator().manual_seed(0))
    for kwargs, name in (({"steps": 0}, "steps"), ({"lr": math.nan}, "lr"), ({"batch_size": -1}, "batch_size")):
        if fs.vae is not None:
            with pytest.raises(ValueError, match=f"^{name}"):
                train_image_vae(fs, images, progress=False, **kwargs)
        with pytest.raises(ValueError, match=f"^{name}"):
            train_image_unet(fs, torch.zeros(2, 4, 8, 8), progress=False, **kwargs)
    with pytest.raises(ValueError, match="^latents"):
        train_image_unet(fs, torch.full((2, 4, 8, 8), math.nan), progress=False)
    with pytest.raises(ValueError, match="^latents"):
        train_image_unet(fs, torch.zeros(0, 4, 8, 8), progress=False)


def test_two_processes_stop_together_on_a_locked_folder(toy, tmp_path):
    """Under ``accelerate launch`` the main process holds the lock; its refusal reaches every process (no hang)."""
    config = tmp_path / "train.yaml"
    make_config(toy, tmp_path / "unused", max_steps=1).save(config)
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "melfusion.cli", "train", "--config", str(config), "--output", str(out)]
    with RunLock(out):
        proc = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("melfusion train: error:")]
    assert errors and all("is in use by another training" in line and str(out) in line for line in errors), \
        proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]


def test_a_lock_file_that_is_a_link_is_never_written_through(tmp_path):
    from melfusion.training.runfolder import LOCK_NAME, RunLock

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).symlink_to(victim)
    with pytest.raises(ValueError, match="never writes through it"):
        RunLock(run).acquire()
    assert victim.read_text() == "precious"
