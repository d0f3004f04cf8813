"""The README's code runs as written (with fewer iterations)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_ten_line_maml_example_runs_and_learns(capsys):
    import torch

    code = python_blocks()[0].replace("range(2000)", "range(500)")
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert torch.isfinite(torch.tensor(float(capsys.readouterr().out.strip())))
    maml, tasks = namespace["maml"], namespace["tasks"]
    fresh = tasks.sample(200, torch.Generator().manual_seed(123))
    curve = maml.adaptation_curve(fresh, 10)
    mse = [((pred - fresh.query_y) ** 2).mean().item() for pred in (curve[0], curve[10])]
    assert mse[1] < 0.75 * mse[0]  # after 500 meta-iterations, 10 steps on 10 points already help


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    blocks = re.findall(r"```bash\n(.*?)\n```", README.read_text(), flags=re.S)
    assert "fewshot train sine-maml" in blocks[0] and "fewshot eval" in blocks[0]
    ci = (README.parent / ".ci" / "run").read_text()
    assert blocks[1].strip() in ci
