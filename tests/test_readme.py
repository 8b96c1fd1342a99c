"""The front door: the README's set-up commands are what CI runs, and every link and figure exists."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _setup_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, re.S)


def test_readme_setup_commands_are_what_ci_runs():
    install, tests = _setup_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    pins = re.search(r"pip install (torch==\S+ torchvision==\S+)", install).group(1)
    assert pins in ci  # the same torch pair
    assert "-e '.[test" in install and "-e '.[test" in ci
    assert install.endswith(".venv/bin/tokenslim demo")
    assert tests.strip() in ci  # exactly the README's test command


def test_readme_stays_a_front_page_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 260
    pages = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
    assert len(pages) >= 10
    for page in pages:
        for target in re.findall(r"\]\(([^)#]+?)(?:#[^)]*)?\)", page.read_text()):
            if target.startswith("http"):
                continue
            assert (page.parent / target).exists(), f"{page.name} links to a missing {target}"
