"""The Docker files, checked without a Docker daemon: hadolint where it is installed; the images install
torch with the same script as CI (the version is pinned there alone) and the package from this tree; the
CPU image compiles the CPU kernels while it is built; the CUDA image fails when flash-attn does not build;
both check /health; the compose file runs the server and the web demo; .dockerignore keeps out what the
images do not copy."""

import fnmatch
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
DOCKERFILES = [ROOT / "docker" / "Dockerfile.cpu", ROOT / "docker" / "Dockerfile.cuda"]


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed")
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_hadolint_is_clean(dockerfile):
    result = subprocess.run(["hadolint", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_torch_is_pinned_once_and_installed_as_ci_installs_it():
    script = (ROOT / "scripts" / "install-torch").read_text()
    assert re.search(r"^TORCH_VERSION=\d+\.\d+\.\d+$", script, re.MULTILINE)
    for path in [*DOCKERFILES, ROOT / "scripts" / "test"]:
        text = path.read_text()
        assert "scripts/install-torch" in text, path
        assert not re.search(r"torch==", text), f"{path} pins torch itself"
    for dockerfile in DOCKERFILES:
        assert re.search(r'python -m pip install (--no-build-isolation )?"\.\[\$\{EXTRAS\}\]"', dockerfile.read_text())


def test_the_cpu_image_compiles_its_kernels_and_the_cuda_image_fails_without_flash_attn():
    cpu, cuda = (path.read_text() for path in DOCKERFILES)
    assert "g++" in cpu and "cpu_extension._build()" in cpu and "TORCH_EXTENSIONS_DIR" in cpu
    assert "import flash_attn" in cuda and "exit 1" in cuda
    assert "|| pip install" not in cuda and "|| python -m pip install" not in cuda  # no quiet fallback
    assert re.search(r"^FROM nvidia/cuda:\$\{CUDA_VERSION\}", cuda, re.MULTILINE)
    assert re.search(r"^ARG CUDA_VERSION=12\.8\.\d+$", cuda, re.MULTILINE)
    assert re.search(r"^ARG TORCH_CUDA=cu128$", cuda, re.MULTILINE)  # the base image's CUDA
    for text in (cpu, cuda):
        assert re.search(r"^HEALTHCHECK .*\n.*127\.0\.0\.1:8000/health", text, re.MULTILINE)
        assert re.search(r"^USER clex$", text, re.MULTILINE)


def test_install_torch_refuses_an_unknown_kind():
    result = subprocess.run(
        [str(ROOT / "scripts" / "install-torch"), "rocm"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2 and "cpu, cuda or auto" in result.stderr


def test_compose_runs_the_server_and_the_demo_once_the_server_is_healthy():
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    server, web = compose["services"]["server"], compose["services"]["web"]
    assert (ROOT / "docker" / ".." / server["build"]["dockerfile"]).is_file()
    assert web["depends_on"]["server"]["condition"] == "service_healthy"
    assert web["command"][:3] == ["web", "--url", "http://server:8000/v1"]


def test_dockerignore_keeps_out_the_environment_but_not_what_the_images_copy():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ".venv" in patterns and ".git" in patterns
    copied = set()
    for dockerfile in DOCKERFILES:
        for sources in re.findall(r"^COPY (.+) \S+$", dockerfile.read_text(), re.MULTILINE):
            copied.update(sources.split())
    assert {"pyproject.toml", "README.md", "clex_serve", "scripts/install-torch"} <= copied
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not any(fnmatch.fnmatch(source, pattern) or source.startswith(pattern + "/") for pattern in patterns)
