"""The documentation: its code runs, its API page covers the public API, and the site builds.

- Every ```python block of ``README.md`` and ``docs/*.md`` is executed. The blocks of one file
  run in order in one fresh namespace (later blocks use earlier names), in a temporary working
  directory. A block whose last non-blank preceding line is ``<!-- skip-test: why -->`` is
  skipped; the reason is required, and such blocks are kept for code that truly cannot run
  here (a library that cannot be installed beside the test dependencies, TensorFlow).
- ``docs/api.md`` documents every name in ``functional_ema.__all__`` and nothing else.
- ``sphinx-build -W --keep-going -b html docs <tmp>`` succeeds (offline; warnings are errors).
"""

from __future__ import annotations

import re
import sys
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import functional_ema as fe


ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
MARKDOWN = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
WITH_PYTHON = [path for path in MARKDOWN if "```python" in path.read_text()]
SKIP = re.compile(r"^<!--\s*skip-test\s*:\s*(?P<why>\S.*?)\s*-->$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")


@dataclass
class Block:
    """One fenced code block of a Markdown file."""

    language: str
    line: int  # 1-based line of the first line of code
    code: str
    skip: str | None  # the reason given in a preceding <!-- skip-test: ... --> comment


def code_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown text, in order (nested fences are not needed)."""
    blocks: list[Block] = []
    lines = text.splitlines()
    previous = ""  # last non-blank line outside a block
    index = 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            if lines[index].strip():
                previous = lines[index].strip()
            index += 1
            continue
        indent, fence = match["indent"], match["fence"]
        start = index + 1
        end = start
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        body = [
            line[len(indent) :] if line.startswith(indent) else line for line in lines[start:end]
        ]
        skip = SKIP.match(previous)
        blocks.append(
            Block(match["info"].lower(), start + 1, "\n".join(body) + "\n", skip and skip["why"])
        )
        if previous.startswith("<!--") and "skip-test" in previous and not skip:
            raise AssertionError(
                f"line {start}: malformed skip comment {previous!r}; write "
                "<!-- skip-test: why it cannot run -->"
            )
        previous = ""
        index = end + 1
    return blocks


def test_block_parser() -> None:
    text = textwrap.dedent(
        """\
        # Title

        ```python
        a = 1
        ```

        <!-- skip-test: needs a GPU -->
        ```python
        b = a.cuda()
        ```

        - item

          ```python
          c = a + 1
          ```
        ```text
        not code
        ```
        """
    )
    blocks = code_blocks(text)
    assert [(b.language, b.line, b.code, b.skip) for b in blocks] == [
        ("python", 4, "a = 1\n", None),
        ("python", 9, "b = a.cuda()\n", "needs a GPU"),
        ("python", 15, "c = a + 1\n", None),
        ("text", 18, "not code\n", None),
    ]
    with pytest.raises(AssertionError, match="malformed skip comment"):
        code_blocks("<!-- skip-test -->\n```python\nx = 1\n```\n")


@pytest.mark.parametrize("path", WITH_PYTHON, ids=[str(p.relative_to(ROOT)) for p in WITH_PYTHON])
def test_markdown_python_blocks_run(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocks = [b for b in code_blocks(path.read_text()) if b.language == "python"]
    runnable = [b for b in blocks if b.skip is None]
    assert runnable, f"{path.name}: every python block is skipped"
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"docs_{path.stem}"}
    for block in runnable:
        # Pad with blank lines so tracebacks give the line numbers of the Markdown file.
        source = "\n" * (block.line - 1) + block.code
        code = compile(source, str(path), "exec")
        exec(code, namespace)  # running the documentation is the point


def test_skipped_blocks_are_rare() -> None:
    """Skipping is for code that cannot run here; the reasons are listed in the report."""
    skipped = {
        f"{path.relative_to(ROOT)}:{block.line}": block.skip
        for path in MARKDOWN
        for block in code_blocks(path.read_text())
        if block.skip is not None
    }
    total = sum(
        1 for path in MARKDOWN for b in code_blocks(path.read_text()) if b.language == "python"
    )
    assert len(skipped) <= total // 5, skipped


def _documented_names(api_page: str) -> list[str]:
    return re.findall(r"^\.\. auto\w+:: functional_ema\.(\w+)\s*$", api_page, re.MULTILINE)


def test_api_page_documents_every_public_name_once() -> None:
    documented = _documented_names((DOCS / "api.md").read_text())
    assert sorted(documented) == sorted(set(documented)), "a name is documented twice"
    missing = sorted(set(fe.__all__) - set(documented))
    extra = sorted(set(documented) - set(fe.__all__))
    assert not missing, f"docs/api.md does not document {missing}: add an autodoc entry"
    assert not extra, f"docs/api.md documents names outside functional_ema.__all__: {extra}"


def test_api_page_documents_every_public_member_of_the_adapter() -> None:
    """Every public method and property of ``EMA`` is rendered (``:members:``) and every
    public attribute set in ``__init__`` is in the class docstring's Attributes section."""
    text = (DOCS / "api.md").read_text()
    members = re.search(r"autoclass:: functional_ema\.EMA\n\s+:members: ([^\n]+)", text)
    assert members is not None
    listed = {name.strip() for name in members.group(1).split(",")}
    public = {name for name in vars(fe.EMA) if not name.startswith("_")}
    assert public - listed == set(), f"add to the EMA :members: list: {sorted(public - listed)}"
    ema = fe.EMA(torch.nn.Linear(2, 1), 0.9)
    attributes = {name for name in vars(ema) if not name.startswith("_") and name != "training"}
    attributes |= {"step", "nonfinite_updates"}
    section = fe.EMA.__doc__.split("Attributes:")[1]
    undocumented = {name for name in attributes if f"\n        {name}:" not in section}
    assert not undocumented, f"document in EMA's Attributes section: {sorted(undocumented)}"
    assert fe.EMA.__init__.__doc__ is not torch.nn.Module.__init__.__doc__
    assert "class docstring" in fe.EMA.__init__.__doc__


@pytest.mark.skipif(sys.version_info < (3, 11), reason="Sphinx 9 needs Python 3.11 or later")
def test_sphinx_build_has_no_warnings(tmp_path: Path) -> None:
    from sphinx.cmd.build import build_main

    with warnings.catch_warnings():
        # Third-party deprecation notices inside Sphinx or its extensions are not ours to fix;
        # Sphinx's own warnings are errors through -W.
        warnings.simplefilter("ignore")
        status = build_main(
            ["-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(tmp_path / "html")]
        )
    assert status == 0, "sphinx-build failed: see the warnings above"
    pages = {p.stem for p in (tmp_path / "html").glob("*.html")}
    assert {"index", "semantics", "api", "migration", "changelog"} <= pages
    # The figures are drawn by the build (docs/figures.py) and copied into the site.
    images = tmp_path / "html" / "_images"
    for figure in ("schedules", "demo_accuracy", "vmap_ensemble", "posthoc_ema"):
        found = list(images.glob(f"{figure}*.png"))
        assert found and found[0].stat().st_size > 10_000, f"figure {figure} missing or empty"
    # Math renders offline: MathJax is in the site, and no page loads it from elsewhere.
    assert (tmp_path / "html" / "_static" / "mathjax" / "tex-chtml.js").stat().st_size > 0
    api = (tmp_path / "html" / "api.html").read_text()
    assert "_static/mathjax/tex-chtml.js" in api and "cdn.jsdelivr" not in api
