"""The ``deepemd`` parsers: one clear line for a bad flag, honest ``--help``, YAML fixes that fit.

Every test runs the real parser (``deepemd.cli.main`` or ``build_parser``) and checks what a user
sees: the exit code and the text on stderr / stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import subprocess
import sys
import warnings

import pytest

from deepemd.cli import Parser, build_parser, main
from deepemd.config import read_yaml
from deepemd.errors import DeepEMDError


def _run(argv: list[str]) -> tuple[int, str, str]:
    """Exit code, stderr and stdout of ``deepemd argv``, argparse's exits included."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, err.getvalue(), out.getvalue()


def _help(*command: str) -> str:
    """``deepemd COMMAND --help`` with its lines joined, so wrapping does not split a phrase."""
    code, _, out = _run([*command, "--help"])
    assert code == 0
    return " ".join(out.split())


@pytest.mark.parametrize(
    "argv,flag,suggestion",
    [
        (["retrieval", "eval", "--rerank", "5"], "--rerank", "--rerank-k"),  # no prefix expansion
        (["retrieval", "search", "--top=5", "--topp", "3"], "--topp", "--top"),
        (["fewshot", "test", "--episdoes=3"], "--episdoes", "--episodes"),
        (["bench", "pipeline", "--thread", "2"], "--thread", "--threads"),
        (["--debg", "demo"], "--debg", "--debug"),
        (["retrieval", "search", "--bogus"], "--bogus", None),  # not "close" to --out by its dashes
    ],
)
def test_unknown_flag_is_one_line_with_a_suggestion(argv, flag, suggestion):
    code, err, _ = _run(argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "usage:" not in err
    assert err.startswith(f"deepemd: error: unknown option '{flag}'")
    if suggestion:
        assert f"did you mean '{suggestion}'?" in err
    else:
        assert "did you mean" not in err and "--help" in err


def test_a_stray_value_is_named():
    code, err, _ = _run(["retrieval", "search", "--top", "5", "6"])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "unexpected argument '6'" in err and "deepemd retrieval search" in err


def test_append_options_still_take_several_values():
    parser = Parser(prog="deepemd x")
    parser.add_argument("--tag", action="append")
    parser.add_argument("-v", action="count", default=0)
    args = parser.parse_args(["--tag", "a", "--tag", "b", "-v", "-v"])
    assert args.tag == ["a", "b"] and args.v == 2


def test_every_parser_refuses_prefixes():
    def walk(parser: argparse.ArgumentParser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from walk(sub)

    parsers = list(walk(build_parser()))
    assert len(parsers) > 10 and all(not p.allow_abbrev for p in parsers)


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """Every command path below ``parser`` (``("retrieval", "eval")``, ...), the parser's own first."""
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*prefix, name))


def test_help_is_plain_text_with_each_default_once():
    for command in _commands(build_parser()):
        text = _help(*command)
        assert "(default: None)" not in text and "``" not in text and ":class:" not in text, command
        for option in text.split("  --")[1:]:  # one option's help: its default shown at most once
            assert option.count("(default:") <= 1, (command, option)


def test_every_option_has_help():
    for command in _commands(build_parser()):
        parser = build_parser()
        for name in command:
            parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
        bare = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
        assert not bare, (command, bare)


def test_an_option_without_a_default_in_its_help_gets_one():
    text = _help("bench", "pipeline")
    assert "--rerank-k RERANK_K shortlist length each query reranks (default: 100)" in text
    assert "--fcn224 FCN + pyramid at 224 px top-100 rerank section --fcn224-images" in text  # a flag: no default


def test_yaml_duplicate_key_keeps_its_own_fix(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("way: 5\nway: 10\n")
    with pytest.raises(DeepEMDError, match="(?s)key 'way' is given twice.*fix: write each option once"):
        read_yaml(path)


def test_yaml_that_is_not_text_is_one_clear_error(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_bytes(b"way: \xff\xfe\n")
    code, err, _ = _run(["fewshot", "test", "--config", str(path)])
    assert code == 2 and "Traceback" not in err and "not valid YAML" in err and str(path) in err


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("way: 5\nshot: [1\n")
    with pytest.raises(DeepEMDError) as err:
        read_yaml(path)
    message = str(err.value)
    assert "not valid YAML at line 3, column 1" in message and str(path) in message
    assert "given twice" not in message and "write each option once" not in message


WARNING_COMMAND = """
import sys, warnings
import deepemd.cli as cli

def warning_command(args):
    warnings.warn("skipped unreadable image a.png:\\n  truncated", UserWarning, stacklevel=1)
    return 0

def parser():
    top = cli.Parser(prog="deepemd")
    top.set_defaults(func=warning_command)
    return top

cli.build_parser = parser
before = warnings.formatwarning
code = cli.main([])
assert warnings.formatwarning is before  # Python's format is back after the command
warnings.warn("after the command", UserWarning, stacklevel=1)
sys.exit(code)
"""


def test_a_warning_during_a_command_is_one_line():
    """What ``--skip-bad`` and the other warnings look like on the command line (a fresh process:
    pytest records warnings itself); after the command, Python's own format is back."""
    done = subprocess.run([sys.executable, "-c", WARNING_COMMAND], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0] == "deepemd: warning: skipped unreadable image a.png: truncated"
    assert "UserWarning: after the command" in lines[1]


def test_a_command_run_inside_pytest_warns_still_records_its_warning(monkeypatch):
    def warning_command(args: argparse.Namespace) -> int:
        warnings.warn("skipped unreadable image b.png", UserWarning, stacklevel=1)
        return 0

    def parser() -> Parser:
        top = Parser(prog="deepemd")
        top.set_defaults(func=warning_command)
        return top

    monkeypatch.setattr("deepemd.cli.build_parser", parser)
    with pytest.warns(UserWarning, match="b.png"):
        assert main([]) == 0
