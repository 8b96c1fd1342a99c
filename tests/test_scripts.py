"""Every script under scripts/ is the record of a documented measurement or a thin name for a
command (docs/layout.md says which): each must still start after the package changes under it.
``--help`` imports everything a script imports and parses its flags, without any work."""
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "scripts").glob("*.py"))


def test_there_are_scripts():
    assert len(SCRIPTS) >= 10


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_script_starts(script):
    run = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=300,
                         cwd=script.parents[1])
    assert run.returncode == 0, run.stderr[-2000:]
    assert "usage" in run.stdout.lower(), run.stdout[-500:]


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_script_is_cited_in_the_docs(script):
    docs = Path(__file__).resolve().parents[1] / "docs" / "layout.md"
    assert f"`{script.name}`" in docs.read_text(), f"docs/layout.md does not say what {script.name} is for"
