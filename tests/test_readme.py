# SPDX-License-Identifier: Apache-2.0
"""The README's example runs as written, and its commands are the ones CI uses."""

from __future__ import annotations

import doctest
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_pycon_examples_run_as_written() -> None:
    result = doctest.testfile(
        str(ROOT / "README.md"),
        module_relative=False,
        optionflags=doctest.NORMALIZE_WHITESPACE,
    )
    assert result.attempted > 0
    assert result.failed == 0


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one() -> None:
    text = (ROOT / "README.md").read_text()
    commands = re.findall(r"^python3 -m venv \.venv && .*$", text, flags=re.M)
    assert len(commands) == 2
    marked = text.split("<!-- test-command -->", 1)[1].splitlines()[2]
    assert marked == commands[1] and "pytest" in marked
    # The first command runs the demo (DESIGN §1), with the extra that it needs.
    assert commands[0].endswith("secagg demo") and "'.[demo]'" in commands[0]
    assert "<!-- test-command -->" in (ROOT / ".ci" / "run").read_text()
