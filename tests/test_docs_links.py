"""Every relative link in the repository's Markdown points at a file in the repository (a clone
has no ../shared/DESIGN.md)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)\s]+)\)")


def markdown_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    files += [p for p in (ROOT / "deploy" / "README.md", ROOT / "convert" / "README.md") if p.exists()]
    return files


def test_relative_links_resolve_inside_the_repository() -> None:
    bad: list[str] = []
    for md in markdown_files():
        for target in LINK.findall(md.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue  # http(s):, mailto:, in-page anchors
            path = (md.parent / target.split("#", 1)[0]).resolve()
            if not path.is_relative_to(ROOT) or not path.exists():
                bad.append(f"{md.relative_to(ROOT)}: {target}")
    assert not bad, bad


def test_architecture_notes_and_folder_readmes_exist() -> None:
    for p in ("docs/architecture.md", "deploy/README.md", "convert/README.md"):
        assert (ROOT / p).is_file(), p
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "docs/architecture.md" in readme and "../shared" not in readme
