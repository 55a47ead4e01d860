"""How large a manifest file may be, how deep it may nest, and how far its YAML aliases
may expand it.

Both bound what reading a file costs, and both are checked once it is parsed, before
anything walks it (environment substitution, validation, the config a plugin is sent),
since every walk after the parser's recurses or copies:

* A path that is not a file of text (``/dev/zero``, a log given by mistake) was read
  whole into memory before anything looked at it: ``include: [/dev/zero]`` or
  ``-m /dev/zero`` grew the process until the kernel ended it. A pipe still works
  (``-m <(envsubst < plugins.tmpl.yaml)``): only the size is bounded.
* A document nested hundreds of levels deep (``[[[[…]]]]``) made the parser or a later
  walk raise ``RecursionError``, a traceback where the operator expects to be told which
  file is wrong.
* YAML aliases share one node, so a few hundred bytes of anchors, each listing the one
  before nine times, are a document of 9**9 values once walked: the load ran for hours
  (a reload reads the file on the event loop: every call in flight stalled as long), and
  the copy that substitutes ``${VAR}`` grew its memory without bound. Aliases that repeat a block are
  fine (the usual use: one ``policies`` block for many methods); only the expanded size
  is bounded, far past any manifest written by hand.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MAX_ALIASED_VALUES", "MAX_DEPTH", "MAX_FILE_BYTES", "TOO_DEEP", "shape_problem"]

#: The largest manifest file read: 64 MiB, some 200 times the YAML of 1,000 plugins.
MAX_FILE_BYTES = 64 * 1024 * 1024

#: Levels of maps and lists a manifest file may nest (a plugin's config is the fourth, a
#: method's params_schema the sixth); a registry entry's value is held to it too.
MAX_DEPTH = 64

#: Values a manifest file's aliases may add to what it writes, once expanded. A file
#: without aliases is read at the speed of its size, and never refused by this.
MAX_ALIASED_VALUES = 1_000_000


TOO_DEEP = (
    f"nested deeper than {MAX_DEPTH} levels of maps and lists"
    " (or holding an alias inside the node it names, which nests without end)"
)


def shape_problem(data: Any) -> str | None:
    """Why ``data`` (a parsed file) is refused, or ``None``.

    Level by level, without recursion, each map or list visited once per level however
    many aliases name it (with the number of places it appears), so the walk costs what
    the file wrote, not what its aliases expand to.
    """
    level: dict[int, tuple[Any, int]] = (
        {id(data): (data, 1)} if isinstance(data, dict | list) else {}
    )
    written = expanded = 1
    counted: set[int] = set()  # maps and lists whose values ``written`` holds
    depth = 0
    while level:
        depth += 1
        if depth > MAX_DEPTH:
            return TOO_DEEP
        below: dict[int, tuple[Any, int]] = {}
        for key, (value, times) in level.items():
            children = value.values() if isinstance(value, dict) else value
            expanded += len(children) * times
            if key not in counted:
                counted.add(key)
                written += len(children)
            for child in children:
                if isinstance(child, dict | list):
                    seen = below.get(id(child))
                    below[id(child)] = (child, times if seen is None else seen[1] + times)
        if expanded - written > MAX_ALIASED_VALUES:
            return (
                f"its aliases (*name) add over {MAX_ALIASED_VALUES:,} values to what it"
                " writes once expanded (anchors that each repeat the one before)"
            )
        level = below
    return None
