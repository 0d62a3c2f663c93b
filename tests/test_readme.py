"""The README's Python blocks run as written.

Every ```python block of README.md runs, in order, in one shared namespace: the
README reads as one session, where later sections use the `x`, `config` and
`params` that earlier ones made (as a reader pasting them into one interpreter
would), so no block repeats another's set-up. Blocks run on CPU with the 8 fake
devices of conftest.py (the expert-parallel block builds a 2 x 4 mesh), in a
scratch working directory (the Hugging Face block writes a checkpoint). Each block
is one test, named by its first line in README.md; tracebacks point at README
lines. A block that imports transformers skips where it is not installed (the `hf`
extra); a block after a failed one skips.
"""

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "README.md")


def _python_blocks(text: str) -> list[tuple[int, str]]:
  """(first code line, code) of each ```python fenced block."""
  blocks = []
  for m in re.finditer(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, re.M | re.S):
    blocks.append((text.count("\n", 0, m.start(1)) + 1, m.group(1)))
  return blocks


with open(README) as f:
  _TEXT = f.read()
BLOCKS = _python_blocks(_TEXT)
_SESSION: dict = {"__name__": "readme"}
_FAILED: list[int] = []


def test_blocks_are_found():
  # Every fence that opens a Python block is one of BLOCKS (a "```py" or an
  # indented fence would be silently skipped).
  opening = re.findall(r"^\s*```(\S*)", _TEXT, re.M)
  langs = opening[0::2]  # fences alternate: opening, closing
  assert all(lang in ("python", "bash") for lang in langs), langs
  assert langs.count("python") == len(BLOCKS) >= 8


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return tmp_path_factory.mktemp("readme")


@pytest.mark.parametrize("line,code", BLOCKS,
                         ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_block_runs(line, code, workdir, monkeypatch):
  if _FAILED:
    pytest.skip(f"the block at README.md:{_FAILED[0]} failed")
  if re.search(r"^import .*\btransformers\b", code, re.M):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
  monkeypatch.chdir(workdir)
  # Padded so that line numbers in a traceback are README.md's.
  compiled = compile("\n" * (line - 1) + code, README, "exec")
  try:
    exec(compiled, _SESSION)  # noqa: S102
  except BaseException:
    _FAILED.append(line)
    raise


def test_quickstart_is_two_commands_and_ci_runs_the_second():
  # The Quickstart's bash block: one command that installs jmoe and runs the
  # examples end to end (train_lm.py with no flags), one that
  # installs the test extras and runs the suite; `.ci/run` runs that second
  # command verbatim.
  section = _TEXT.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
  block = re.search(r"^```bash\n(.*?)^```", section, re.M | re.S).group(1)
  commands = [line for line in block.splitlines() if line.strip()]
  assert len(commands) == 2, commands
  setup, test = commands
  assert setup.startswith("pip install -e ") and setup.endswith(
      "&& python examples/train_lm.py"), setup
  assert test.startswith('pip install -e ".[test]" && python -m pytest'), test
  root = os.path.dirname(README)
  with open(os.path.join(root, ".ci", "run")) as f:
    ci = [line.strip() for line in f if line.strip() and not line.startswith("#")]
  assert ci[-1] == test, (ci[-1], test)
