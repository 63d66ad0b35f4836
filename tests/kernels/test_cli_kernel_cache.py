"""The compiled CPU kernels' cache as installations meet it at start-up: one library per build (so two
virtual environments, or two versions of the sources, never rebuild each other's), loaded without the
compiler when it is there, and a notice whenever a build does run."""

import logging
import shutil
import sys
from pathlib import Path

import torch
from torch.utils import cpp_extension

from clex_serve.kernels import cpu_extension


def _edited_sources(monkeypatch, tmp_path, name: str) -> None:
    """The kernels' sources as another version of clex-serve would ship them: ``name`` changed."""
    csrc = tmp_path / f"csrc-{name}"
    shutil.copytree(cpu_extension.CSRC, csrc)
    (csrc / name).write_text((csrc / name).read_text() + "\n// another version\n")
    monkeypatch.setattr(cpu_extension, "CSRC", csrc)
    monkeypatch.setattr(cpu_extension, "SOURCES", [csrc / source.name for source in cpu_extension.SOURCES])


def test_each_installation_and_each_source_version_has_a_library_of_its_own(monkeypatch, tmp_path):
    here = cpu_extension.extension_name()
    assert here == cpu_extension.extension_name() and here.startswith("clex_serve_cpu_kernels_")

    monkeypatch.setattr(sys, "prefix", "/another/.venv")  # the README's second virtual environment
    other_environment = cpu_extension.extension_name()
    monkeypatch.undo()

    monkeypatch.setattr(torch, "__version__", "2.99.0")
    other_torch = cpu_extension.extension_name()
    monkeypatch.undo()

    _edited_sources(monkeypatch, tmp_path, "sampling.cpp")
    other_source = cpu_extension.extension_name()
    monkeypatch.undo()
    _edited_sources(monkeypatch, tmp_path, "clex_cpu.h")  # torch itself does not look at headers
    other_header = cpu_extension.extension_name()
    monkeypatch.undo()

    assert len({here, other_environment, other_torch, other_source, other_header}) == 5


def test_a_build_says_so_and_a_built_library_loads_without_the_compiler(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    builds, loads = [], []

    def compile_library(name, build_directory, **_):
        builds.append(name)
        (Path(build_directory) / f"{name}.so").write_bytes(b"")

    monkeypatch.setattr(cpp_extension, "load", compile_library)
    monkeypatch.setattr(torch.ops, "load_library", loads.append)
    with caplog.at_level(logging.INFO, logger=cpu_extension.__name__):
        cpu_extension._build()
        assert len(builds) == 1 and "compiling clex-serve's CPU kernels" in caplog.text
        assert str(tmp_path) in caplog.text  # where the library is cached

        caplog.clear()
        cpu_extension._build()  # the next start: the library is loaded as it is, silently
        assert len(builds) == 1 and loads == [
            str(Path(cpp_extension._get_build_directory(builds[0], False)) / f"{builds[0]}.so")
        ]
        assert not caplog.text

        _edited_sources(monkeypatch, tmp_path, "rms_norm.cpp")  # an upgrade: a build, and a notice again
        cpu_extension._build()
        assert len(builds) == 2 and builds[1] != builds[0] and "compiling clex-serve's CPU kernels" in caplog.text
