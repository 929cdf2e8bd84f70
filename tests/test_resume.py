"""`teal-quant run --resume`, as a user meets it (subprocesses, real signals): a run SIGKILLed after its second layer
keeps its finished layers; a plain rerun refuses to throw them away; a changed recipe is refused; `--resume` finishes
the artifact byte for byte as an uninterrupted run wrote it. A full disk is one line and exit 2, with the finished
layers kept for --resume. `--plan` prints the predicted needs and refuses what the machine cannot hold."""

import json
import shutil
import subprocess
import sys
import time

import pytest
from _support import tiny_recipe_text, write_tiny_llama
from test_cli import ENV, assert_one_line_error, teal_quant

LAYERS = 4
SPARSITY = "sparsity: {levels: [0.25, 0.5], default: 0.5, greedy: {step: 0.1, tokens: 128}}"
TIMING_KEYS = ("seconds", "stage_seconds", "peaks")  # calibration_report.json: measured, so they differ per run


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 4-layer tiny Llama, its recipe (every run writes the same output path, so recipe.yaml is the same file) and the
    artifact of one uninterrupted run, moved aside as the reference."""
    root = tmp_path_factory.mktemp("resume")
    model = write_tiny_llama(root / "model", layers=LAYERS)
    out = root / "art"
    recipe = root / "recipe.yaml"
    recipe.write_text(tiny_recipe_text(model, out, sparsity=SPARSITY))
    result = teal_quant("run", recipe)
    assert result.returncode == 0, result.stderr[-2000:]
    reference = root / "reference"
    out.rename(reference)
    return {"root": root, "model": model, "out": out, "recipe": recipe, "reference": reference}


def _files(folder):
    out = {}
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        if f.name == "calibration_report.json":
            report = json.loads(data)
            for layer in report["layers"]:
                assert layer["seconds"] > 0 and layer["peaks"]["host_rss_bytes"] > 0
                for key in TIMING_KEYS:
                    del layer[key]
            data = json.dumps(report, sort_keys=True).encode()
        out[f.name] = data
    return out


def assert_same_artifact(got, reference):
    """Every file byte for byte (weights, index, config, recipe, card, plot); the report with its timing removed."""
    a, b = _files(got), _files(reference)
    assert sorted(a) == sorted(b)
    assert [name for name in a if a[name] != b[name]] == []


def _partials(out):
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


def _layers_done(out) -> int:
    for p in _partials(out):
        try:
            return json.loads((p / ".resume" / "state.json").read_text())["progress"]["layers_done"]
        except (OSError, ValueError, KeyError):
            pass
    return 0


def test_sigkill_after_layer_two_then_resume_gives_the_same_bytes(setup):
    out, recipe = setup["out"], setup["recipe"]
    proc = subprocess.Popen([sys.executable, "-m", "teal_quant.cli", "run", str(recipe)], env=ENV, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while _layers_done(out) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else "slow"
        time.sleep(0.01)
    proc.kill()
    proc.wait(timeout=60)
    done = _layers_done(out)
    assert 2 <= done < LAYERS and not out.exists(), done
    (partial,) = _partials(out)
    # the hidden states entering layer `done` (the other file may be a checkpoint the kill cut short)
    assert (partial / ".resume" / f"hidden-{(done - 1) % 2}.bin").is_file()

    # a plain rerun does not throw the finished layers away, nor start beside them
    assert_one_line_error(teal_quant("run", recipe), f"an interrupted run left {done} of {LAYERS} finished layers in")
    # --resume with another recipe is refused, naming what differs
    changed = setup["root"] / "changed.yaml"
    changed.write_text(recipe.read_text().replace("step: 0.1", "step: 0.05"))
    assert_one_line_error(teal_quant("run", changed, "--resume"), "was made with a different recipe")
    assert _partials(out) == [partial]

    result = teal_quant("run", recipe, "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not _partials(out)
    assert_same_artifact(out, setup["reference"])
    report = json.loads((out / "calibration_report.json").read_text())
    assert [layer["layer"] for layer in report["layers"]] == list(range(LAYERS))
    assert_one_line_error(teal_quant("run", recipe, "--resume", "--overwrite"), "no interrupted run of")
    shutil.rmtree(out)


def test_full_disk_is_one_line_exit_2_and_keeps_finished_layers(setup):
    """The second hidden-state checkpoint hits ENOSPC (patched in the subprocess): one line, exit 2, layer 1's work
    kept; --resume then finishes the same artifact."""
    out, recipe = setup["out"], setup["recipe"]
    script = (
        "import errno, sys\n"
        "from teal_quant.compression import hidden\n"
        "calls = []\n"
        "real = hidden.HiddenStates.save\n"
        "def save(self, path):\n"
        "    calls.append(path)\n"
        "    if len(calls) == 2:\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device', str(path))\n"
        "    real(self, path)\n"
        "hidden.HiddenStates.save = save\n"
        "from teal_quant.cli import main\n"
        f"sys.exit(main(['run', {str(recipe)!r}]))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=600)
    assert_one_line_error(result, "the disk is full")
    assert f"1 of {LAYERS} finished layers kept in" in result.stderr and "--resume" in result.stderr
    assert _layers_done(out) == 1 and not out.exists()
    result = teal_quant("run", recipe, "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_artifact(out, setup["reference"])
    shutil.rmtree(out)


def test_plan_predicts_from_the_config_and_refuses_what_does_not_fit(setup, tmp_path):
    """--plan loads no weight (the model folder without its weights still plans) and prints disk, memory and time;
    a machine without the memory for the run's hidden states is refused with one line, exit 2."""
    model = tmp_path / "model"
    shutil.copytree(setup["model"], model)
    (model / "model.safetensors").unlink()  # config only: nothing to load
    header = setup["model"] / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(header), framework="pt") as f:  # an index naming the (absent) shard, as a Hub model has
        names = list(f.keys())
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: "model.safetensors" for n in names}}))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(tiny_recipe_text(model, tmp_path / "art", sparsity=SPARSITY))
    result = teal_quant("run", recipe, "--plan")
    assert result.returncode == 0, result.stderr[-2000:]
    for row in ("disk (artifact + checkpoints + downloads)", "peak host memory", "time per layer", "whole run"):
        assert row in result.stdout, result.stdout
    assert not (tmp_path / "art").exists() and not list(tmp_path.glob(".art.*"))
    huge = tmp_path / "huge.yaml"  # 100,000 x 131,072 x 64 float32 hidden states: 3.4 TB, spilled to disk: 6.7 TB
    huge.write_text(tiny_recipe_text(model, tmp_path / "art", sparsity=SPARSITY, calibration=(
        "calibration: {source: {kind: text_files, paths: ['x']}, samples: 100000, seq_len: 131072}"),
        runtime="runtime: {hidden_storage: disk}"))
    result = teal_quant("run", huge, "--plan")
    assert_one_line_error(result, "disk: about 6")
    assert "GB needed (artifact" in result.stderr and "cannot run here: disk" in result.stdout
