"""What a plugin says it serves, as a provider keeps it: bounded, and never a false alarm.

Every binding but Lambda's lets a plugin list its methods (``docs/protocol.md``): gRPC's
``Describe``, HTTP's ``GET /describe``, WebSocket's ``hello``. A provider turns that list
into a set with ``served_names`` and keeps it (``Provider.served_methods``); the
dispatcher compares it with the methods the manifest routes to the target.

The list comes from the plugin, so it is bounded before it is kept, and whatever could
make the dispatcher warn about a method the plugin does serve makes it say nothing
instead (None: "the plugin did not say"):

* an empty list says nothing: a plugin that does not list its methods (a ``Describe``
  that leaves them out, a ``hello`` without ``methods``) is not taken to serve none;
* more than ``MAX_SERVED_METHODS`` names, or one longer than ``MAX_METHOD_NAME``, or
  anything but strings: not believed (cutting the list short would report methods past
  the cut as missing);
* a name no manifest could route (not shaped like ``IDENTIFIER``: spaces, control
  characters) is dropped: it cannot match a routed method, and it never reaches a log.
"""

from __future__ import annotations

import re
from collections.abc import Collection

__all__ = ["MAX_METHOD_NAME", "MAX_SERVED_METHODS", "served_names"]

#: The most method names kept of one plugin's list; a longer list is not believed.
MAX_SERVED_METHODS = 4096
#: The longest method name kept; a list holding a longer one is not believed.
MAX_METHOD_NAME = 256

#: A method name the manifest accepts (``dispatcher.config.manifest.IDENTIFIER``).
_ROUTABLE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")


def served_names(listed: Collection[object]) -> frozenset[str] | None:
    """The routable names of ``listed`` (what a plugin said it serves), or None when the
    list says nothing or is not believed (module docstring)."""
    if not listed or len(listed) > MAX_SERVED_METHODS:
        return None
    names: set[str] = set()
    for name in listed:
        if type(name) is not str or len(name) > MAX_METHOD_NAME:
            return None
        if _ROUTABLE.fullmatch(name):
            names.add(name)
    return frozenset(names)
