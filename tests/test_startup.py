"""Start-up: ``import melfusion``, ``melfusion --help`` and ``--version`` import neither torch, diffusers nor
transformers; the public names and the registries still work, importing what they need on first use."""

import os
import subprocess
import sys

import pytest

HEAVY = ("torch", "diffusers", "transformers")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def run_python(code: str) -> subprocess.CompletedProcess:
    probe = code + f"\nimport sys\nprint('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    return subprocess.run([sys.executable, "-c", probe], env=ENV, capture_output=True, text=True, timeout=300)


def heavy_modules(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stderr[-2000:]
    return next(line[6:] for line in done.stdout.splitlines() if line.startswith("HEAVY="))


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["generate", "--help"], ["data", "--help"],
                                  ["inspect", "--help"]])
def test_cli_help_and_version_import_no_torch(argv):
    done = run_python(f"from melfusion.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass")
    assert heavy_modules(done) == ""
    assert "melfusion" in done.stdout


def test_generate_refuses_an_existing_output_before_importing_the_models(tmp_path):
    """An output that would be overwritten (or an input that is missing) is refused in a fraction of a second:
    before torch, diffusers or transformers are imported, let alone a model loaded."""
    from pathlib import Path

    image = Path(__file__).resolve().parents[1] / "examples" / "images" / "blue-bright.png"
    (tmp_path / "song.wav").write_bytes(b"mine")
    for out, image_arg, message in ((tmp_path / "song.wav", image, "already exists"),
                                    (tmp_path / "new.wav", tmp_path / "missing.png", "--image")):
        argv = ["generate", "--image", str(image_arg), "--text", "a tune", "--out", str(out)]
        done = run_python(f"from melfusion.cli import main\nassert main({argv!r}) == 2")
        assert heavy_modules(done) == ""
        assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert (tmp_path / "song.wav").read_bytes() == b"mine"


def test_version_flag_prints_the_package_version():
    import melfusion

    done = subprocess.run([sys.executable, "-m", "melfusion.cli", "--version"], env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"melfusion {melfusion.__version__}"


def test_import_melfusion_and_its_config_import_no_torch():
    done = run_python("import melfusion, melfusion.config, melfusion.datasets\nassert melfusion.__version__\n"
                      "assert 'ddim' in melfusion.config.SCHEDULERS")
    assert heavy_modules(done) == ""


def test_public_names_import_on_first_use():
    done = run_python("import melfusion as mf\n"
                      "assert 'convex' in mf.registry.REGISTRIES['mixer'].names()\n"
                      "assert mf.synapse.ConvexMixer(num_layers=2).alphas().shape == (2,)\n"
                      "assert mf.MelFusion.__name__ == 'MelFusion' and issubclass(mf.GenerationOutput, object)\n"
                      "assert set(mf.__all__) <= set(dir(mf))")
    assert heavy_modules(done) == "torch,diffusers,transformers"


def test_an_unknown_attribute_is_an_attribute_error():
    import melfusion

    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        melfusion.NoSuchThing  # noqa: B018


def test_lazy_subcommands_still_parse_their_arguments(capsys):
    from melfusion.cli import build_parser, main

    args = build_parser().parse_args(["data", "split", "m.jsonl", "--ratios", "0.5,0.5"])
    assert args.ratios == "0.5,0.5" and callable(args.func)
    assert main(["evaluate", "--help"]) == 0
    assert "--generated" in capsys.readouterr().out
    assert main(["data", "split", "m.jsonl", "--no-such-flag"]) == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_a_user_registered_part_meets_the_builtin_names():
    done = run_python("from melfusion.registry import register\n"
                      "try:\n"
                      "    @register('mixer', 'convex')\n"
                      "    class Mine: pass\n"
                      "except ValueError as exc:\n"
                      "    assert 'already taken' in str(exc)\n"
                      "else:\n"
                      "    raise SystemExit('a built-in name was silently shadowed')")
    assert done.returncode == 0, done.stderr[-2000:]


def test_submodules_are_attributes_as_before():
    done = run_python("import melfusion as mf\n"
                      "assert 'ddim' in mf.config.SCHEDULERS and mf.datasets.synthetic.__name__.endswith('synthetic')\n"
                      "assert mf.pipeline.MelFusion is mf.MelFusion and 'importlib' not in dir(mf)")
    assert done.returncode == 0, done.stderr[-2000:]


def test_unregistering_a_builtin_before_any_lookup_sticks():
    done = run_python("from melfusion.registry import registry\n"
                      "registry('mixer').unregister('convex')\n"
                      "assert 'convex' not in registry('mixer') and 'per_head' in registry('mixer')\n"
                      "assert 'per_head' in repr(registry('mixer'))")
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_long_error_keeps_its_start_and_its_hint():
    from melfusion.cli import describe_error

    code, line = describe_error(OSError("model: could not fetch 'x' " + "detail " * 100 + "Give a local folder."))
    assert code == 2 and len(line) <= 410 and "\n" not in line
    assert line.startswith("error: model: could not fetch") and line.endswith("Give a local folder.")


def test_metric_math_imports_without_torch_and_evaluate_stays_the_function():
    done = run_python("import numpy as np\nfrom melfusion.metrics import frechet_distance, kl_divergence, imsm\n"
                      "x = np.random.default_rng(0).normal(size=(64, 4))\nprint(frechet_distance(x, x + 1.0))")
    assert heavy_modules(done) == ""
    assert abs(float(done.stdout.splitlines()[0]) - 4.0) < 0.5  # |mean difference|^2 = 4, same covariance
    # importing the submodule of the same name first must not hide the function
    done = run_python("from melfusion.metrics.evaluate import run_evaluate\nimport melfusion.metrics as m\n"
                      "from melfusion.metrics import evaluate\nprint(callable(evaluate), callable(m.evaluate))")
    assert done.stdout.splitlines()[0] == "True True", done.stderr[-2000:]
