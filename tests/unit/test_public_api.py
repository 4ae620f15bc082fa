"""The public surface: ``__all__`` lists exactly what is importable, and errors share one root."""

from __future__ import annotations

import importlib

import pytest

import m3connect

MODULES = [
    "m3connect", "m3connect.scoring", "m3connect.errors", "m3connect.types", "m3connect.encoder",
    "m3connect.fusion", "m3connect.protocols", "m3connect.store", "m3connect.adapters.base",
]


@pytest.mark.parametrize("name", MODULES)
def test_all_names_exist(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__all__, name
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert not missing
    assert len(set(module.__all__)) == len(module.__all__)


def test_top_level_exports_every_public_error() -> None:
    from m3connect import errors

    for name in errors.__all__:
        assert name in m3connect.__all__
        cls = getattr(errors, name)
        assert issubclass(cls, m3connect.M3Error)


def test_errors_keep_builtin_meaning() -> None:
    assert issubclass(m3connect.InvalidInputError, ValueError)
    assert issubclass(m3connect.InvalidTypeError, TypeError)
    assert issubclass(m3connect.MissingDependencyError, ImportError)
    assert issubclass(m3connect.BackendUnavailableError, ConnectionError)


def test_package_ships_py_typed() -> None:
    from importlib import resources

    assert resources.files("m3connect").joinpath("py.typed").is_file()


def test_import_and_help_do_not_load_torch() -> None:
    """Clients with a remote or precomputed encoder need no torch: it loads only for M3Encoder."""
    import subprocess
    import sys

    code = (
        "import sys, m3connect, m3connect.store, m3connect.fusion\n"
        "from m3connect.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch was imported'\n"
        "m3connect.M3Encoder\n"
        "assert 'torch' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
