"""argparse that refuses a command line without repeating what it refused: the parser
of every executable of the SDK, and what the dispatcher's CLI says of an argument it
does not expect (``refused_arguments``), public for any command line that must not
repeat a secret.

A command line can carry a secret where an operator slipped: a mistyped
``--register-etcd-pasword=hunter2``, a gateway URL with its token given to an option that
does not exist, a token pasted as a stray argument. argparse quotes what it refuses
(``unrecognized arguments: --foo=secret``, ``ambiguous option: --re=secret could match
…``, ``ignored explicit argument 'secret'``, ``invalid choice: 'secret'`` for a
positional), and that line goes to stderr and on to the logs.

``RedactingArgumentParser`` names what is wrong instead, as every SDK's executable does
(tests/conformance/test_command_line_refusals_show_no_value.py):

* an option it does not know, given with two dashes: its name, never its value
  (``unknown option --foo (its value is not shown)``);
* one given with a single dash: where it stands, not its text (``unknown option
  (argument #3, its text is not shown)``). What follows one dash may be anything pasted
  after it (a token may itself begin with one); the names of the options an executable
  takes begin with two, ``-h`` aside;
* a positional argument it does not expect: that there is one and where, counted as the
  shell counts ``$1``, ``$2``… (``unexpected argument #3 (its text is not shown)``);
* an option that takes no value given one, or an abbreviation that matches several: the
  option's name, without the value (a known short option's too: ``-hVALUE`` is
  ``argument -h/--help: takes no value``).

A value refused by its own option (a port that is no number, a mode not among the
choices) is still quoted: it cannot be a credential, and it is what the operator must
correct. The exit status stays argparse's, 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

__all__ = ["RedactingArgumentParser", "refused_arguments"]

#: argparse's messages that quote what they refused, and how each is said without it. The
#: option part is greedy: a value may hold the words that follow it, an option name never.
_AMBIGUOUS = re.compile(r"ambiguous option: (?P<given>.*) could match (?P<matches>[^ ].*)", re.S)
_VALUE_IGNORED = re.compile(r"argument (?P<option>-\S*): ignored explicit argument .*", re.S)
_POSITIONAL_CHOICE = re.compile(
    r"argument (?P<name>[^-][^:]*): invalid choice: .* \(choose from (?P<choices>[^()]*)\)", re.S
)


def option_name(argument: str) -> str:
    """``--name`` of ``--name=value``: what a message may show of an option."""
    return argument.split("=", 1)[0]


def refused_arguments(given: Sequence[str], refused: Sequence[str], first: int = 1) -> str:
    """What is wrong with ``refused`` (arguments of ``given``, in order), without a value:
    ``unknown option --name (its value is not shown)``, ``unknown option (argument #N, its
    text is not shown)`` for one given with a single dash, ``unexpected argument #N (its
    text is not shown)``. ``first``: the position of ``given[0]`` on the command line."""
    # Each at its own place, found from the end: ``given`` may hold the same text earlier,
    # as an option's value.
    places: list[int] = []
    end = len(given)
    for argument in reversed(refused):
        end = next((i for i in range(end - 1, -1, -1) if given[i] == argument), 0)
        places.insert(0, end)
    said: list[str] = []
    for argument, place in zip(refused, places, strict=True):
        if argument.startswith("--"):
            hidden = " (its value is not shown)" if "=" in argument else ""
            said.append(f"unknown option {option_name(argument)}{hidden}")
        elif argument.startswith("-") and argument != "-":  # one dash: by its place only
            said.append(f"unknown option (argument #{first + place}, its text is not shown)")
        else:
            said.append(f"unexpected argument #{first + place} (its text is not shown)")
    return "; ".join(said)


class RedactingArgumentParser(argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` whose refusals never quote a value (module docstring).

    ``first_position``: where the first argument it parses stands on the program's command
    line (2 for the arguments after a ``serve`` it was not given), so that a message's
    ``#N`` is the shell's ``$N``. Its subparsers are of its class and report through it."""

    def __init__(self, *args: Any, first_position: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.first_position = first_position

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        given = list(sys.argv[1:] if args is None else args)
        parsed, refused = self.parse_known_args(given, namespace)
        if refused:
            self.error(refused_arguments(given, refused, self.first_position))
        return parsed

    def error(self, message: str) -> NoReturn:
        super().error(_without_values(message))


def _without_values(message: str) -> str:
    """``message`` of argparse, with what it quoted of a refused argument left out."""
    if found := _AMBIGUOUS.fullmatch(message):
        given = option_name(found["given"])
        hidden = " (its value is not shown)" if "=" in found["given"] else ""
        return f"ambiguous option: {given}{hidden} could match {found['matches']}"
    if found := _VALUE_IGNORED.fullmatch(message):
        return f"argument {found['option']}: takes no value (its value is not shown)"
    if found := _POSITIONAL_CHOICE.fullmatch(message):
        return (
            f"argument {found['name']}: invalid choice (its text is not shown;"
            f" choose from {found['choices']})"
        )
    return message
