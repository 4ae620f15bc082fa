"""The built wheel: LICENSE, py.typed and the packages are in it, and it installs and imports on its own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_wheel_contents_and_a_clean_install(tmp_path: Path) -> None:
    # Build from a copy of the tracked files: setuptools' in-tree build/ keeps modules deleted since.
    src = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w",
         str(tmp_path / "dist")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("m3connect-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "m3connect/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    for module in ("m3connect/store.py", "m3connect/adapters/base.py", "m3connect/cli/parser.py",
                   "m3connect/data/sample_corpus.jsonl"):
        assert module in names, module
    assert not any(n.startswith(("tests/", "benchmarks/", "adapters/")) for n in names)  # no bare top-level packages
    assert "m3connect/cli.py" not in names  # the CLI is a package now

    # Install into a bare target and import it from there (dependencies come from this environment).
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    probe = ("import sys, m3connect, m3connect.store, m3connect.cli; "
             "assert m3connect.__file__.startswith(sys.argv[1]), m3connect.__file__; "
             "assert 'torch' not in sys.modules; print(m3connect.__version__)")
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {probe}",
                          str(target)], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip()
