"""The ``adamkit`` command itself: help, version, ``python -m adamkit``, every option documented."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

import adamkit
from adamkit.tools import cli


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser([name])
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[name]


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_option_has_help_and_its_default(name):
    parser = _subparser(name)
    text = parser.format_help()
    assert cli.COMMANDS[name].examples[0] in text  # examples at the end of --help
    fmt = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, f"{name} {action.option_strings[0]} has no help"
        if action.default not in (None, False):
            # the value itself is shown: "(default: %(default)s)" or written out
            shown = fmt._expand_help(action)
            assert "default" in shown and str(action.default).strip() in shown, action.option_strings


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"adamkit {adamkit.__version__} (torch ")


def test_python_dash_m_adamkit():
    out = subprocess.run(
        [sys.executable, "-m", "adamkit", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "usage: adamkit" in out and all(name in out for name in cli.COMMANDS)


def test_bench_help_lists_the_implementations():
    text = " ".join(_subparser("bench").format_help().split())
    assert "adamkit fused, 8-bit state" in text and "torch fused" in text


def test_bench_unknown_implementation_is_an_error_not_a_traceback(capsys):
    assert cli.main(["bench", "--impls", "nope", "--scale", "0.01"]) == 2
    assert "unknown implementations" in capsys.readouterr().err
