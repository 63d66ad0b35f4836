"""The package as a user meets it: ``python -m clex_serve``, and one version everywhere."""

import importlib.metadata
import subprocess
import sys

import clex_serve


def test_python_dash_m_runs_the_command():
    result = subprocess.run([sys.executable, "-m", "clex_serve", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--model" in result.stdout and "--max-request-body-bytes" in result.stdout


def test_the_version_is_written_once():
    assert importlib.metadata.version("clex-serve") == clex_serve.__version__
