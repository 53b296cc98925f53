"""The repository stands alone: a clone holds everything its tests and docs refer to."""

from __future__ import annotations

import re
from pathlib import Path

from harness import FIXTURES_DIR, fixtures

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".git", ".venv", "build", "__pycache__", ".pytest_cache", "results"}
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def tracked(pattern: str) -> list[Path]:
    return sorted(path for path in ROOT.rglob(pattern)
                  if path.is_file() and not SKIP.intersection(path.relative_to(ROOT).parts)
                  and not any(part.endswith(".egg-info") for part in path.parts))


def test_the_firmware_fixtures_live_inside_the_repository():
    assert FIXTURES_DIR.is_relative_to(ROOT)
    found = fixtures()
    assert found.messages and found.raw


def test_no_file_points_outside_the_checkout():
    # Spelled in pieces so that this file does not find itself.
    outside = ["..", "/shared"], ["/work", "/"]
    needles = ["".join(parts) for parts in outside]
    offenders = []
    for pattern in ("*.py", "*.md", "*.toml", "*.conf", "*.service", "*.sql"):
        for path in tracked(pattern):
            text = path.read_text(encoding="utf-8")
            offenders += [f"{path.relative_to(ROOT)}: {needle}" for needle in needles if needle in text]
    for path in [*tracked("scripts/*"), ROOT / ".ci" / "run"]:
        text = path.read_text(encoding="utf-8")
        offenders += [f"{path.relative_to(ROOT)}: {needle}" for needle in needles if needle in text]
    assert offenders == []


def test_every_relative_link_in_the_docs_names_a_file_in_the_repository():
    broken = []
    for doc in tracked("*.md"):
        for target in LINK.findall(doc.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            path = (doc.parent / target.split("#", 1)[0]).resolve()
            if not path.is_relative_to(ROOT) or not path.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert broken == []
