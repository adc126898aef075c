"""The README's promises that code can check."""

from __future__ import annotations

from pathlib import Path

from gateway.settings import reference_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_configuration_reference_matches_the_settings_model() -> None:
    text = README.read_text()
    start = text.index("<!-- settings-reference:start -->\n") + len("<!-- settings-reference:start -->\n")
    end = text.index("\n<!-- settings-reference:end -->")
    assert text[start:end] == reference_table(), "regenerate with: python -m gateway.settings"


def test_readme_quickstart_is_two_commands_and_ci_runs_the_second() -> None:
    text = README.read_text()
    block = text.split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2
    assert "gatewatch demo" in commands[0]
    ci = (README.parent / ".ci" / "run").read_text()
    assert commands[1] in ci
