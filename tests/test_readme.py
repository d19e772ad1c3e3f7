"""README's "Use in a notebook" section runs exactly as written, so it cannot go stale."""

import os
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _notebook_blocks() -> list:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use in a notebook", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) >= 3
    return blocks


@pytest.mark.slow
def test_notebook_section_runs_verbatim(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # "from the repository root"
    torch.set_num_threads(1)
    namespace = {"__name__": "__readme__"}
    written = ["resnet56_s16u1.pth", "resnet56_s16u1.pt2"]
    try:
        for block in _notebook_blocks():
            exec(compile(block, "README.md", "exec"), namespace)
    finally:
        for name in written:
            if os.path.exists(ROOT / name):
                os.remove(ROOT / name)
    out = capsys.readouterr().out
    assert "319226 147976832" in out  # the count the README quotes
    assert isinstance(namespace["net"], torch.nn.Module)
    assert namespace["report"]["max_rel_diff"] < 1e-4
