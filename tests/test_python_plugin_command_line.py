"""The Python SDK's command lines refuse without repeating what they refused
(``linchkit_plugin.argument_parser``): each shape of argparse's refusal that quoted an
argument, in process. tests/conformance/test_command_line_refusals_show_no_value.py runs
the executables of every SDK."""

from __future__ import annotations

import argparse
import ast

import pytest

import linchkit_plugin.argument_parser as public_home
from linchkit_plugin._etcd_gateway import Gateway
from linchkit_plugin.argument_parser import RedactingArgumentParser, refused_arguments
from tests.conftest import ROOT

SECRET = "hunter2-5f1d"


def _parser(first_position: int = 1) -> RedactingArgumentParser:
    parser = RedactingArgumentParser(prog="plugin", first_position=first_position)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve")
    serve.add_argument("entrypoint")
    serve.add_argument("--websocket", action="store_true")
    serve.add_argument("--port", type=int, default=0)
    serve.add_argument("--http", choices=["auto", "h11"], default="auto")
    serve.add_argument("--register-etcd")
    serve.add_argument("--register-etcd-user")
    return parser


def _refusal(argv: list[str], capsys: pytest.CaptureFixture[str], first: int = 1) -> str:
    with pytest.raises(SystemExit) as exited:
        _parser(first).parse_args(argv)
    assert exited.value.code == 2  # argparse's usage error, as before
    said = capsys.readouterr()
    assert said.out == ""
    return said.err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        pytest.param(
            ["serve", "e:P", f"--register-etcd-pasword={SECRET}"],
            "plugin: error: unknown option --register-etcd-pasword (its value is not shown)",
            id="unknown option with a value",
        ),
        pytest.param(
            ["serve", "e:P", "--no-such-flag", SECRET],
            "plugin: error: unknown option --no-such-flag;"
            " unexpected argument #4 (its text is not shown)",
            id="unknown option then its value",
        ),
        pytest.param(
            ["serve", "e:P", SECRET],
            "plugin: error: unexpected argument #3 (its text is not shown)",
            id="stray argument",
        ),
        # Before, named as an option: a token pasted after a dash was shown whole.
        pytest.param(
            ["serve", "e:P", f"-x{SECRET}"],
            "plugin: error: unknown option (argument #3, its text is not shown)",
            id="single dash",
        ),
        pytest.param(
            ["serve", f"-x{SECRET}=1", "e:P", "--no-such-flag"],
            "plugin: error: unknown option (argument #2, its text is not shown);"
            " unknown option --no-such-flag",
            id="single dash with a value, then two dashes",
        ),
        pytest.param(
            ["serve", "e:P", f"-h{SECRET}"],
            "plugin serve: error: argument -h/--help: takes no value (its value is not shown)",
            id="a known short option given a value",
        ),
        pytest.param(
            [SECRET, "e:P"],
            "plugin: error: argument COMMAND: invalid choice (its text is not shown;"
            " choose from 'serve')",
            id="unknown command",
        ),
        pytest.param(
            ["serve", "e:P", f"--reg={SECRET}"],
            "plugin serve: error: ambiguous option: --reg (its value is not shown)"
            " could match --register-etcd, --register-etcd-user",
            id="ambiguous abbreviation",
        ),
        pytest.param(
            ["serve", "e:P", f"--reg={SECRET} could match x"],
            "plugin serve: error: ambiguous option: --reg (its value is not shown)"
            " could match --register-etcd, --register-etcd-user",
            id="ambiguous abbreviation whose value says could match",
        ),
        pytest.param(
            ["serve", "e:P", f"--websocket={SECRET}"],
            "plugin serve: error: argument --websocket: takes no value (its value is not shown)",
            id="switch given a value",
        ),
    ],
)
def test_a_refusal_names_the_option_or_the_place_never_the_text(
    argv: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _refusal(argv, capsys)
    assert line == said
    assert SECRET not in line


def test_positions_count_from_where_the_parser_s_arguments_stand(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A parser given what follows ``serve`` counts as the shell does: ``serve`` is $1."""
    parser = RedactingArgumentParser(prog="plugin serve", first_position=2)
    parser.add_argument("--address")
    parser.add_argument("--config")
    with pytest.raises(SystemExit):
        parser.parse_args(["--config", SECRET, "--address", "x", SECRET])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    # The stray one, not the same text earlier as --config's value.
    assert line == "plugin serve: error: unexpected argument #6 (its text is not shown)"


def test_a_value_refused_by_its_own_option_is_still_quoted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A number or a mode cannot be a credential, and it is what the operator corrects."""
    assert _refusal(["serve", "e:P", "--port", "eighty"], capsys).endswith(
        "argument --port: invalid int value: 'eighty'"
    )
    assert _refusal(["serve", "e:P", "--http", "h3"], capsys).endswith(
        "argument --http: invalid choice: 'h3' (choose from 'auto', 'h11')"
    )


def test_a_command_line_it_takes_is_read_as_argparse_reads_it() -> None:
    options = _parser().parse_args(["serve", "e:P", "--websocket", "--port=7", "--http", "h11"])
    assert options == argparse.Namespace(
        command="serve",
        entrypoint="e:P",
        websocket=True,
        port=7,
        http="h11",
        register_etcd=None,
        register_etcd_user=None,
    )


def test_refused_arguments_finds_each_at_its_own_place() -> None:
    given = ["a", "--x=1", "a", "b", "a"]
    assert refused_arguments(given, ["--x=1", "a"], first=2) == (
        "unknown option --x (its value is not shown); unexpected argument #6 (its text is not shown)"
    )


@pytest.mark.parametrize(
    "etcd", [f"ftp://me:{SECRET}@127.0.0.1:1", f"http://me:{SECRET}@127.0.0.1:1"]
)
def test_an_etcd_url_refused_is_shown_masked(etcd: str) -> None:
    """Before, a URL whose scheme was refused was quoted whole, credentials and all."""
    with pytest.raises(ValueError, match="etcd") as refused:
        Gateway(etcd, 1.0)
    assert SECRET not in str(refused.value)


def test_the_parser_is_public_and_the_host_imports_it_from_there() -> None:
    """The dispatcher's CLI says what it refuses with ``refused_arguments``: the SDK is its
    dependency, so that is a public module of the SDK, each name documented."""
    assert public_home.__doc__
    assert set(public_home.__all__) == {"RedactingArgumentParser", "refused_arguments"}
    for name in public_home.__all__:
        assert getattr(public_home, name).__doc__, name
    private = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for folder in ("dispatcher", "providers")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if "linchkit_plugin._argument_parser" in _imported(node)
    ]
    assert private == [], "the host imports the parser from its former private module"


def _imported(node: ast.AST) -> list[str]:
    """The modules an import statement names (none for any other node)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.module is not None:
        return [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return []
