"""Every ``python`` block of README.md's companions in docs/ runs as pasted, in a fresh process.

Each block runs in its own interpreter (so a block that asks for 8 CPU devices gets them
before JAX starts), with the repository on the path; its printed output is checked where
the page states a result.
"""

from __future__ import annotations

import json
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
    # finetune.md runs in a clone-like directory holding a tiny checkpoint (below)
    ("finetune.md", 0): r"train loss \d\.\d+, held-out \d\.\d+\n"
    r"reloaded adapter gives the same logits: True",
    ("finetune.md", 1): r"tunix: 10 steps, loss",
    ("finetune.md", 2): r"restored step 0",
    ("finetune.md", 3): r"^/tmp/jax_cache$",
}


def _workdir(page: str, tmp: pathlib.Path) -> pathlib.Path:
    """finetune.md's blocks read MODEL_DIR (what the README's main job pretrains: here a tiny
    random Llama saved by ``transformers``) and ``../shared/data``; the others run in the repo."""
    if page != "finetune.md":
        return ROOT
    from tests import hf_fixtures as fx

    return fx.clone_after_main_job(tmp)


def _run(args: list[str], cwd: pathlib.Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        cwd=cwd,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"},
        timeout=600,
        check=False,
    )


@pytest.mark.parametrize(("page", "index", "block"), _blocks(), ids=lambda v: str(v)[:20])
def test_doc_block_runs_as_pasted(
    page: str, index: int, block: str, tmp_path: pathlib.Path
) -> None:
    out = _run([sys.executable, "-c", block], _workdir(page, tmp_path))
    assert out.returncode == 0, f"docs/{page} block {index}:\n{out.stderr[-3000:]}"
    expected = EXPECTED.get((page, index))
    assert expected is not None, f"docs/{page} block {index}: add its expected output to EXPECTED"
    assert re.search(expected, out.stdout, flags=re.MULTILINE), out.stdout


def test_finetune_page_command_line_runs_as_pasted(tmp_path: pathlib.Path) -> None:
    text = (ROOT / "docs" / "finetune.md").read_text()
    (block,) = re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)
    args = block.replace("\\\n", " ").split()
    assert args[:3] == ["python", "-m", "lora_muon_jax.finetune"], args
    work = _workdir("finetune.md", tmp_path)
    out = _run([sys.executable, *args[1:]], work)
    assert out.returncode == 0, out.stderr[-3000:]
    out_dir = pathlib.Path(args[args.index("--out") + 1])
    assert (out_dir / "adapter" / "adapter_model.safetensors").exists()
    assert (out_dir / "merged" / "config.json").exists()
    steps = [
        json.loads(line)["step"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps[-1] == int(args[args.index("--steps") + 1]), steps
