"""The README's Python example runs as printed, and its CI blocks exist."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _block(tag: str) -> str:
  text = README.read_text()
  match = re.search(rf"<!-- {tag} -->\n```[a-z]*\n(.*?)```", text, re.S)
  assert match, f"README.md has no block after <!-- {tag} -->"
  return match.group(1)


def test_readme_example_runs(capsys):
  exec(compile(_block("readme:example"), "README.md", "exec"), {})
  printed = capsys.readouterr().out.split()
  assert len(printed) >= 3 and float(printed[0]) > 0


def test_ci_blocks_are_the_install_and_test_commands():
  assert "pip install -e '.[test]'" in _block("ci:install")
  assert "pytest" in _block("ci:test")
