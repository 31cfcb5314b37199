"""Lint the Dockerfile and model.env as part of the test command."""
import subprocess

from conftest import ROOT


def lint(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True)


def test_hadolint_finds_nothing():
    """Every ignore in the Dockerfile carries its reason on the line above it."""
    done = lint("hadolint", "Dockerfile")
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_dotenv_linter_finds_nothing():
    done = lint("dotenv-linter", "lint", "model.env")
    assert done.returncode == 0, done.stdout + done.stderr
