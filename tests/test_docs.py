"""The documentation cannot drift from the code: the config reference is the generated one, every config key
says what it does, every link and anchor resolves, every page is in the site's nav, the README stays a
short front page. (``make docs`` builds the site with ``mkdocs build --strict`` on top of this.)"""

from __future__ import annotations

import importlib.util
import itertools
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


# --- Figures quoted in the docs come from the files the benchmarks and the demo write -----------------------
# The convention (docs/contributing.md): a marker `<!-- from FILE: PATH -->` right after a number says which
# value of which JSON file it quotes (optionally `<!-- from FILE: PATH * 100 -->` for a percentage); a marker
# alone on a line before a fenced block or a table quotes a whole text value. PATH is dotted keys with list
# items as `[3]` or `[key=value]` / `[key^=prefix]` (the one item whose key equals / starts with it; `[^=prefix]`
# for a list of strings; `[k1=v1,k2=v2]` for several keys).

MARKER = re.compile(r"<!--\s*from\s+(?P<file>[^\s:]+):\s*(?P<path>.+?)(?:\s*\*\s*(?P<scale>[\d.]+))?\s*-->")
NUMBER_BEFORE = re.compile(r"(?P<number>(?:(?<![\w.])[-+])?(?<![\d.])\d[\d,]*(?:\.\d+)?)(?:\s?(?:x|%|s|ms|MB|GB))?\s*$")


def path_parts(path: str) -> list[str]:
    """`rows[what^=unet 256x256].ratio` -> ['rows', '[what^=unet 256x256]', 'ratio'] (dots inside [] kept)."""
    parts, token, depth = [], "", 0
    for char in path:
        if char == "[" and depth == 0:
            if token:
                parts.append(token)
            token, depth = "[", 1
        elif char == "]" and depth == 1:
            parts.append(token + "]")
            token, depth = "", 0
        elif char in "[]":  # brackets inside a selector's value (`[rule=learned gain [in-sample]]`)
            token += char
            depth += 1 if char == "[" else -1
        elif char == "." and depth == 0:
            if token:
                parts.append(token)
            token = ""
        else:
            token += char
    if token:
        parts.append(token)
    return parts


def resolve(data: typing.Any, path: str) -> typing.Any:
    for part in path_parts(path):
        if part.startswith("["):
            selector = part[1:-1]
            if selector.lstrip("-").isdigit():
                data = data[int(selector)]
                continue
            conditions = [re.match(r"(.*?)(\^=|=)(.*)", condition).groups()
                          for condition in re.split(r",(?=\w+\^?=)", selector)]

            def fits(item: typing.Any) -> bool:
                for key, op, value in conditions:
                    if not (isinstance(item, dict) if key else isinstance(item, str)):
                        return False
                    text = str(item.get(key, "")) if key else item
                    if not (text == value or op == "^=" and text.startswith(value)):
                        return False
                return True

            matches = [item for item in data if fits(item)]
            assert len(matches) == 1, f"[{selector}] matches {len(matches)} items, not one"
            data = matches[0]
        else:
            data = data[part]
    return data


def quoted_figures(page: Path) -> list[tuple[int, str, typing.Any, str | None]]:
    """(line, what the page says, the file's value, scale) for every marker of a page."""
    import json

    lines = page.read_text(encoding="utf-8").splitlines()
    found = []
    for index, line in enumerate(lines):
        for marker in MARKER.finditer(line):
            file = ROOT / marker["file"]
            assert file.is_file(), f"{page.name}:{index + 1}: {marker['file']} does not exist"
            value = resolve(json.loads(file.read_text(encoding="utf-8")), marker["path"])
            before = line[:marker.start()]
            if before.strip() == "" and line[marker.end():].strip() == "":  # a block: a fence or a table
                block, rest = [], lines[index + 1:]
                if rest and rest[0].startswith("```"):
                    block = list(itertools.takewhile(lambda text: not text.startswith("```"), rest[1:]))
                else:
                    block = list(itertools.takewhile(lambda text: text.strip() != "", rest))
                found.append((index + 1, "\n".join(block), value, None))
            else:
                number = NUMBER_BEFORE.search(before)
                assert number, f"{page.name}:{index + 1}: no number right before {marker.group(0)}"
                found.append((index + 1, number["number"], value, marker["scale"]))
    return found


def agrees(said: str, value: typing.Any, scale: str | None) -> bool:
    if "\n" in said or isinstance(value, str) and not re.fullmatch(r"[-+]?[\d,]+(\.\d+)?", said):
        text = value if isinstance(value, str) else str(value)
        return ([line.rstrip() for line in said.strip("\n").splitlines()]
                == [line.rstrip() for line in text.strip("\n").splitlines()])
    if isinstance(value, str):  # a number quoted from a printed text: it must appear there as written
        return re.search(rf"(?<![\d.]){re.escape(said)}(?!\d)", value) is not None
    decimals = len(said.split(".")[1]) if "." in said else 0
    number = float(said.replace(",", ""))
    return abs(float(value) * float(scale or 1) - number) <= 0.5 * 10 ** -decimals + 1e-9


FIGURE_PAGES = [README, *PAGES]


@pytest.mark.parametrize("page", FIGURE_PAGES, ids=lambda p: p.name)
def test_quoted_figures_match_their_files(page):
    wrong = [f"line {line}: the page says {said!r}, the file {value!r}" + (f" (x {scale})" if scale else "")
             for line, said, value, scale in quoted_figures(page) if not agrees(said, value, scale)]
    assert not wrong, f"{page.name}: figures that differ from their results files: {wrong}"


@pytest.mark.parametrize("page", FIGURE_PAGES, ids=lambda p: p.name)
def test_measured_ratios_name_their_file(page):
    """In a table with a `ratio` column (measured ratios), every number of that column carries a marker."""
    unmarked = []
    lines = page.read_text(encoding="utf-8").splitlines()
    column = None
    for number, line in enumerate(lines, 1):
        if not line.startswith("|"):
            column = None
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if column is None:
            column = next((i for i, cell in enumerate(cells) if cell.lower().startswith("ratio")), -1)
            continue
        if column < 0 or set(line) <= set("|-: ") or column >= len(cells):
            continue
        text = MARKER.sub("<marked>", cells[column])
        for figure in re.finditer(r"(?<![\w.])\d+(?:\.\d+)?(?:x|%)?(?![\w.%])", text):
            if not text[figure.end():].startswith("<marked>"):
                unmarked.append(f"line {number}: {figure.group(0)}")
    assert not unmarked, f"{page.name}: measured ratios without a results file: {unmarked}"


def test_the_figure_checks_catch_a_wrong_figure(tmp_path):
    """The checker itself: a right figure passes, a wrong one, a wrong block and a missing marker do not."""
    data = {"rows": [{"what": "a step", "ratio": 1.234}, {"what": "b step", "ratio": 0.5}], "printed": "x 0.25\ny",
            "notes": ["a: 3 s", "b: 4 s"]}
    assert resolve(data, "rows[what^=a st].ratio") == 1.234 and resolve(data, "rows[1].ratio") == 0.5
    assert resolve(data, "notes[^=b:]") == "b: 4 s" and resolve(data, "rows[what^=b,ratio=0.5].ratio") == 0.5
    assert agrees("1.23", 1.234, None) and not agrees("1.25", 1.234, None) and agrees("50", 0.5, "100")
    assert agrees("0.25", data["printed"], None) and not agrees("0.26", data["printed"], None)
    assert agrees("x 0.25\ny", data["printed"], None) and not agrees("x 0.25", data["printed"], None)
    with pytest.raises(AssertionError):
        resolve(data, "rows[what^=].ratio")  # ambiguous: matches both rows


def test_troubleshooting_quotes_messages_medxfer_still_prints():
    """Each error text in the first column of the troubleshooting table is in medxfer's sources (parts split
    by `...` may be apart), so the page cannot describe a message that no longer exists."""
    sources = "\n".join(path.read_text(encoding="utf-8") for path in (ROOT / "src" / "medxfer").rglob("*.py"))
    sources = re.sub(r'"\s*\n\s*f?"', "", sources)  # implicitly joined string literals read as one
    table = [line for line in (DOCS / "troubleshooting.md").read_text(encoding="utf-8").splitlines()
             if line.startswith("| `")]
    assert len(table) >= 20
    missing = []
    for line in table:
        cell = line.split("|")[1]
        for part in re.findall(r"`([^`]+)`", cell):
            if part not in sources:
                missing.append(part)
    assert not missing, f"troubleshooting.md quotes messages medxfer does not print: {missing}"


@pytest.mark.slow  # the whole analysis with its learned rules: ~15 s on 2 idle cores
def test_reference_study_script_writes_what_the_analyze_page_quotes(tmp_path, monkeypatch):
    """benchmarks/reference_study.py on small planted tables (the published ones are not shipped)."""
    import json
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import common
    import reference_study

    spec = importlib.util.spec_from_file_location("analyze_tests", ROOT / "tests" / "test_analyze.py")
    analyze_tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(analyze_tests)
    downstream, robustness, _ = analyze_tests._planted_tables()
    downstream.to_csv(tmp_path / "down.csv", index=False)
    robustness.to_csv(tmp_path / "rob.csv", index=False)
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    assert reference_study.main([str(tmp_path / "down.csv"), str(tmp_path / "rob.csv")]) == 0
    data = json.loads((tmp_path / "reference_study.json").read_text())
    assert data["inputs"]["downstream"]["rows"] == len(downstream)
    assert data["n_groups"] == 6 and data["recommended"]
    table = data["table"].splitlines()
    assert len(table) == 2 + len(data["rules"]) and all(line.count(" | ") == 5 for line in table[2:])
    assert sum("(recommended)**" in line for line in table) == 1
    assert resolve(data, "rules[rule=always longest].regret_mean") >= 0
    assert [row["tolerance"] for row in data["score_settled"]["by_tolerance"]] == [0.05, 0.1, 0.2]
    assert all(row["n_groups"] == 6 for row in data["score_settled"]["by_tolerance"])
    correlation = data["correlation_table"].splitlines()  # header, rule, 2 predictors x 3 models
    assert len(correlation) == 2 + 6 and correlation[0].endswith("| ACDC | COVIDQUDataset | mean |")
