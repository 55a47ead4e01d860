"""``ManifestError``: not a call failure, but a manifest that cannot be loaded."""

from __future__ import annotations

from dataclasses import dataclass

from providers._log_lines import printable

__all__ = ["ENVIRONMENT", "ManifestError", "ManifestProblem", "render_path"]

#: The ``source`` of a problem in an environment variable the manifest leaves a setting
#: to (``OTEL_*``): its ``path`` is the variable's name.
ENVIRONMENT = "<environment>"


@dataclass(frozen=True, slots=True)
class ManifestProblem:
    """One thing wrong with a manifest, located as precisely as the format allows."""

    path: str
    message: str
    line: int | None = None
    #: The file it is in when not the manifest's own (a file it includes), or
    #: ``ENVIRONMENT``.
    source: str | None = None

    def render(self, source: str) -> str:
        # A file's name is the user's, or a glob's match: shown escaped, as values are (a
        # name holding an escape sequence set the terminal's title).
        source = printable(self.source or source)
        where = f"{source}:{self.line}" if self.line is not None else source
        return f"{where}: {self.path or '<root>'}: {self.message}"


class ManifestError(Exception):
    """The manifest could not be loaded. ``problems`` lists every problem found.

    ``complete`` is False when the checks that look across entries (a method's target,
    fallbacks, rollouts, egress) have not run yet: they need every entry valid first, so
    fixing these problems may reveal more, and the message says so.
    """

    def __init__(
        self, source: str, problems: list[ManifestProblem], *, complete: bool = True
    ) -> None:
        self.source = source
        self.problems = problems
        self.complete = complete
        lines = [p.render(source) for p in problems]
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        if not complete:
            count += "; more checks run once these are fixed"
        shown = printable(source)
        super().__init__(f"invalid manifest {shown} ({count}):\n  " + "\n  ".join(lines))


def render_path(location: tuple[str | int, ...]) -> str:
    """Where in a document, as a problem names it: ``plugins[0].methods.say.target``."""
    rendered = ""
    for part in location:
        rendered += (
            f"[{part}]" if isinstance(part, int) else (f".{part}" if rendered else str(part))
        )
    return rendered
