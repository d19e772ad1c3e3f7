"""README's commands run as written, so they cannot go stale: the "Use in a notebook" blocks (from a temporary
directory, as a user's notebook would), the export command line and the CIFAR-10 evaluation command lines."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

try:
    from tests.fakedata import write_fake_cifar
except ImportError:  # pragma: no cover
    from fakedata import write_fake_cifar

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
REPO_LINE = 'REPO = "/path/to/this/repository"'


def _notebook_blocks() -> list:
    section = README.split("## Use in a notebook", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) >= 3 and REPO_LINE in blocks[0]
    return blocks


def _command_lines(prefix: str) -> list:
    """Every line of README's bash blocks that starts with ``prefix``, split as a shell would (comments dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    lines = [line for block in blocks for line in block.splitlines() if line.startswith(prefix)]
    return [shlex.split(line, comments=True) for line in lines]


@pytest.mark.slow
def test_notebook_section_and_export_line_run_from_anywhere(tmp_path):
    script = "\n".join(_notebook_blocks()).replace(REPO_LINE, f"REPO = {str(ROOT)!r}")
    (tmp_path / "notebook.py").write_text(script)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "notebook.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert "319226 147976832" in done.stdout  # the count the README quotes
    rel_diff = float(done.stdout.strip().splitlines()[-1].split()[0])  # print(report["max_rel_diff"], shape)
    assert rel_diff < 1e-4 and (tmp_path / "resnet56_s16u1.pt2").is_file()

    (export,) = _command_lines("python -m models.export")
    (tmp_path / "resnet56_s16u1.pt2").unlink()
    done = subprocess.run(
        [sys.executable, *export[1:]],
        cwd=tmp_path,
        env=env | {"PYTHONPATH": str(ROOT)},  # README: from anywhere with PYTHONPATH=<your clone>
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "check    passed" in done.stdout and (tmp_path / "resnet56_s16u1.pt2").is_file()
    assert "853,018 (0.85M)" in done.stdout and "319,226 (0.32M)" in done.stdout  # README's folded count


@pytest.mark.slow
def test_cifar10_evaluation_lines_run_with_only_the_test_split(tmp_path, monkeypatch, capsys, one_thread):
    """Each README ``eval_cifar10.py`` line, its checkpoint path filled with a file of the model it names, scores a
    dataset folder that holds only test_batch (README: evaluation needs only the test split)."""
    from models import get_model
    from utils import checkpoint as C
    from utils import cli

    batches = write_fake_cifar(tmp_path / "data", "cifar10", n_train=10, n_test=20, seed=0)
    for name in os.listdir(batches):
        if name.startswith("data_batch"):
            os.remove(os.path.join(batches, name))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(os.environ, "CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "0"))
    torch.manual_seed(0)
    model = get_model("ResNet56_DoubleShared", "cifar10", shared_rank=16, unique_rank=1)
    lines = _command_lines("python3 eval_cifar10.py")
    assert len(lines) >= 2
    for argv in lines:
        pretrained = next(a for a in argv if a.startswith("--pretrained="))
        path = pretrained.split("=", 1)[1]
        if path == "paper":  # a download: tests/test_published.py serves those
            continue
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if path.startswith("checkpoint/"):  # a run's file of this project
            C.save_checkpoint(C.make_checkpoint(model, None, epoch=1, acc=10.0), path)
        else:  # an authors' file, downloaded by hand
            torch.save({"net_state_dict": model.state_dict()}, path)
        extra = ["--dataset_path=data", "--device=cpu", "--num_workers=0", "--batch_size=10"]
        assert cli.eval_main("cifar10", argv[2:] + extra) == 0, capsys.readouterr().err
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert result["images"] == 20 and result["model"] == "ResNet56_DoubleShared"
        assert result["model_kwargs"] == {"shared_rank": 16, "unique_rank": 1}
