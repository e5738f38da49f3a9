"""The documentation: the methods page is the registry's, and the README stays a short front page."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_methods_page_is_what_the_registry_generates():
    generated = subprocess.run([sys.executable, "-m", "bench.methods_page"], capture_output=True, text=True,
                               check=True, cwd=REPO).stdout
    assert (REPO / "docs" / "methods.md").read_text() == generated, (
        "docs/methods.md is stale: run python -m bench.methods_page > docs/methods.md")


def test_the_readme_is_short_and_links_every_page_of_the_site():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    nav = [line.split(": ", 1)[1].strip() for line in (REPO / "mkdocs.yml").read_text().splitlines()
           if line.startswith("  - ") and line.strip().endswith(".md")]
    assert nav and all((REPO / "docs" / page).is_file() for page in nav)
    assert all(f"docs/{page}" in readme for page in nav if page != "index.md")
