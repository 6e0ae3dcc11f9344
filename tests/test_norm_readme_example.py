"""Runs exactly the "Writing your own normalization" example, so it cannot rot.

The text lives in README.md under the heading "## Writing your own
normalization".  Every ```python block of the section
is executed in order in one namespace; the blocks assert their own checks.
"""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TITLE = "## Writing your own normalization"


def section(text, title=TITLE):
    """The lines from ``title`` up to the next heading of the same or higher level."""
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == title)
    except StopIteration:
        return None
    out = []
    in_code = False
    for line in lines[start + 1:]:
        if line.startswith("```"):
            in_code = not in_code
        if not in_code and re.match(r"#{1,2} ", line):
            break
        out.append(line)
    return "\n".join(out)


def python_blocks(text):
    return re.findall(r"^```python[^\n]*\n(.*?)^```", text, flags=re.S | re.M)


def example_source():
    sec = section((ROOT / "README.md").read_text())
    assert sec is not None, f"README.md has no section titled {TITLE!r}"
    return "README.md", sec


def test_section_extraction_helpers():
    text = "# t\n## Writing your own normalization\nA\n```python\nx = 1\n# c\n```\n## Next\n```python\ny\n```"
    sec = section(text)
    assert python_blocks(sec) == ["x = 1\n# c\n"]
    assert section("# nothing here") is None


def test_readme_example_runs(capsys):
    where, text = example_source()
    blocks = python_blocks(text)
    assert len(blocks) >= 4, f"{where}: expected the op, check, layer and model blocks"
    namespace = {"__name__": "readme_example"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{where} python block {i + 1}", "exec"), namespace)
        except Exception as err:  # name the block that failed
            pytest.fail(f"{where}: python block {i + 1} failed: {err!r}")
    out = capsys.readouterr().out
    assert "pass" in out and "loss" in out
    # the example's own checks ran: the layer, the results and the losses exist
    assert namespace["losses"][-1] < namespace["losses"][0]
    assert all(r.passed for r in namespace["results"])
    # the norm's own option was a flag, a configuration key and a unit option
    assert namespace["run"]["config"]["rms_eps"] == 1e-4
