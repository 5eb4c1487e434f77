"""Every ``python`` block of README.md's companions in docs/ runs as pasted, in a fresh process.

Each block runs in its own interpreter (so a block that asks for 8 CPU devices gets them
before JAX starts), with the repository on the path; its printed output is checked where
the page states a result.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _blocks() -> list[tuple[str, int, str]]:
    out = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        text = page.read_text()
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)):
            out.append((page.name, i, block))
    return out


# What a block must print (a regex on its stdout), where the page states a result.
EXPECTED = {
    ("numerics.md", 0): r"κ\(B\)=inf",  # B = 0 at init
    ("flax.md", 0): r"loss .* -> .*\nLinear True",  # merged NNX model == adapted
    ("flax.md", 1): r"loss .* True",  # merged Linen params == adapted
    ("flax.md", 2): r"\['bias', 'kernel'\]",  # qwix factors folded away
    ("sharding.md", 0): r"\[\('all-reduce', False\)\]",  # one all-reduce per step
    ("sharding.md", 1): r"^1 \d+",  # the appendix: 1 all-reduce outside loops
}


@pytest.mark.parametrize(("page", "index", "block"), _blocks(), ids=lambda v: str(v)[:20])
def test_doc_block_runs_as_pasted(page: str, index: int, block: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", block],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"},
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, f"docs/{page} block {index}:\n{out.stderr[-3000:]}"
    expected = EXPECTED.get((page, index))
    assert expected is not None, f"docs/{page} block {index}: add its expected output to EXPECTED"
    assert re.search(expected, out.stdout, flags=re.MULTILINE), out.stdout
