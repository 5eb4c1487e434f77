"""Code blocks of docs/*.md pages run as pasted (pages listed here are fully executable)."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXECUTABLE_PAGES = ["numerics.md"]


def _python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "docs" / page).read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("page", EXECUTABLE_PAGES)
def test_doc_blocks_run(page: str) -> None:
    blocks = _python_blocks(page)
    assert blocks, page
    for block in blocks:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, f"docs/{page}", "exec"), {})
        if page == "numerics.md":
            # B = 0: κ(B) is infinite, κ(A) finite, the first step has B's half only.
            line = out.getvalue().strip()
            assert "κ(B)=inf" in line and "κ(A)=" in line, line
