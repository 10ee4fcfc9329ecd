"""The documentation cannot drift from the code: the config reference is the generated one, every config key
says what it does, every link and anchor resolves, every page is in the site's nav, the README stays a
short front page. (``make docs`` builds the site with ``mkdocs build --strict`` on top of this.)"""

from __future__ import annotations

import importlib.util
import re
import typing
import unicodedata
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = sorted(DOCS.glob("*.md"))


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_config", DOCS / "gen_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_reference_is_generated_from_the_models():
    generator = load_generator()
    assert (DOCS / "config.md").read_text(encoding="utf-8") == generator.render(), (
        "docs/config.md is stale: run python docs/gen_config.py")


def test_every_config_key_says_what_it_does():
    generator = load_generator()
    missing, seen = [], set()

    def walk(model: type[BaseModel], prefix: str) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, info in model.model_fields.items():
            if not (info.description or "").strip():
                missing.append(f"{model.__name__}.{name}")
            nested = generator.section_model(info.annotation)
            if nested is not None:
                walk(nested, f"{prefix}{name}.")

    for _, model, _ in generator.SECTIONS:
        walk(model, "")
    assert len(seen) >= 15  # every section model was reached
    assert not missing, f"config fields without Field(description=...): {missing}"


def test_generated_table_shows_types_defaults_and_bounds():
    text = (DOCS / "config.md").read_text(encoding="utf-8")
    # a bound from Field(ge=, lt=), one from an Annotated type of list items, a required key, a section link
    assert re.search(r"\| `val_fraction` \| float \\\| null \| `null` \| >= 0, < 1 \|", text)
    assert "| `patch_size` | list[int] \\| null | `null` | each >= 1, <= 8192 |" in text
    assert "| `checkpoints` | path | **required** |" in text
    assert "| `data` | [DataConfig](#dataconfig) |" in text


def test_readme_is_a_short_front_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; the manual belongs in docs/"
    text = "\n".join(lines)
    assert "make demo" in text and "make test" in text


def slug(heading: str) -> str:
    """Python-Markdown's toc slug of a heading (what mkdocs anchors are)."""
    explicit = re.search(r"\{#([\w-]+)\}\s*$", heading)
    if explicit:
        return explicit.group(1)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    found = {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*?)\s*$", text, flags=re.M)}
    return found | set(re.findall(r'<a id="([\w-]+)"', text))


def links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.name)
def test_links_and_anchors_resolve(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no such anchor)")
    assert not broken, f"{page.name}: broken links: {broken}"


def test_every_page_is_in_the_nav_and_every_nav_entry_exists():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    entries: list[str] = []

    def walk(node: typing.Any) -> None:
        if isinstance(node, str):
            entries.append(node)
        elif isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)

    walk(config["nav"])
    assert sorted(entries) == sorted(p.name for p in PAGES)
