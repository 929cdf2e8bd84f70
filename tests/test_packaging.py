"""The wheel: `pip install .` gives every module, the kernels (as teal_quant.kernels) and the configs, and nothing else.

Builds the wheel with the installed setuptools (`pip wheel --no-deps --no-build-isolation`: no network), checks its
file list against the source tree, then installs it (no dependencies) into a fresh venv whose only other packages are
this environment's dependencies, added by a .pth file (its editable teal_quant is not, since .pth files reached that
way are not read), and runs the installed `teal-quant` and `teal_quant.load` from outside the repository.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out),
                             str(ROOT)], capture_output=True, text=True, timeout=600, cwd=out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "not a listed package" not in result.stderr + result.stdout  # setuptools' package-data warning
    assert "Warning" not in result.stderr, result.stderr[-3000:]
    (whl,) = out.glob("teal_quant-*.whl")
    return whl


def test_wheel_holds_every_module_the_kernels_and_the_configs_and_nothing_else(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(ROOT).as_posix() for p in (ROOT / "teal_quant").rglob("*.py")}
    expected |= {f"teal_quant/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    expected |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "teal_quant" / "configs").glob("*.json")}
    expected |= {f"teal_quant/kernels/configs/{p.name}" for p in (ROOT / "kernels" / "configs").glob("*.json")}
    assert len(expected) > 40 and "teal_quant/kernels/gemv_triton.py" in expected
    assert "teal_quant/kernels/configs/h200.json" in expected
    assert "teal_quant/configs/llama3_8b.json" in expected
    files = {n for n in names if ".dist-info/" not in n}
    assert files == expected, (sorted(expected - files), sorted(files - expected))
    assert not any(n.startswith(("tests/", "data/", "kernels/", "benchmarks/", "recipes/")) for n in names)
    top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["teal_quant"]
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "teal-quant = teal_quant.cli:main" in entry_points


def test_installed_wheel_works_outside_the_repository(wheel, tiny_artifact, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    result = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "TEAL_QUANT_QUIET": "1", "HOME": str(tmp_path)}

    code = ("import json, importlib.resources as r, torch, teal_quant, teal_quant.kernels as k; "
            f"m = teal_quant.load({str(tiny_artifact)!r}, device='cpu'); "
            "out = m(torch.tensor([[1, 5, 9, 42]])).logits; "
            "print(json.dumps({'file': teal_quant.__file__, 'kernels': k.__file__, 'finite': bool(out.isfinite().all()), "
            "'configs': sorted(p.name for p in r.files('teal_quant').joinpath('configs').iterdir())}))")
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["file"].startswith(site) and info["kernels"].startswith(site)  # the installed copy, not the repository
    assert info["finite"] and info["configs"] == ["llama3_70b.json", "llama3_8b.json"]

    result = subprocess.run([str(venv / "bin" / "teal-quant"), "inspect", str(tiny_artifact), "--json"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["quantization"]["bits"] == 4
