"""Subprocess plugins: an executable in any language, launched and owned by the dispatcher.

Modelled on hashicorp/go-plugin (``docs/protocol.md``, "Subprocess plugins"):

1. Before each launch, when the target pins ``sha256`` (the executable's digest, or a
   map of file to digest: a wrapper and its script), every pinned file is checked; a
   mismatch refuses to start anything (``ProviderError``).
2. The child gets a minimal environment (``PATH``, ``HOME``, ``LANG``, ``LANGUAGE``,
   ``TZ``, ``LC_*``; ``inherit_env`` for more), the target's ``env``, and the handshake
   environment (``linchkit_plugin.handshake``): the magic
   cookie, the protocol versions the host speaks, the network (a Unix socket in a fresh
   private folder by default) and, with AutoMTLS, a one-time client certificate made for
   this launch.
3. The child prints one handshake line on stdout within ``handshake_timeout_ms``; the
   host checks the core version, that the chosen protocol version is one it offered, the
   network and the protocol, and (AutoMTLS) takes the plugin's one-time server certificate
   as the only root it trusts (``handshake``). Then it connects (``providers._grpc``), to
   a Unix socket pinned (``handshake.pin_socket``): at every reconnect the very socket it
   checked, never a symlink the plugin put in its place later; and runs ``Init`` (the
   manifest's config) and ``Start`` (``providers._grpc.lifecycle``).
4. The child's stderr goes to the log line by line (logger ``dispatcher.plugin.<id>``), and
   its last 1,000 lines, across restarts, are kept for ``logs`` (``dispatcher logs``).
5. Health pings every ``health_interval_ms``; a child that stops answering is killed.
6. A child that exits is restarted with exponential backoff; more than ``max_restarts``
   exits within ``restart_window_s`` is a crash loop: the plugin is left down and calls
   fail with ``TargetUnavailable``.
7. Stopping: ``Stop``, ``Destroy``, close stdin, SIGTERM, and SIGKILL for anything still
   running once ``stop_grace_ms`` (the bound of the whole stop) is over. Each process is
   its own (``detach_queue``): the dispatcher stops them all at once.

No child outlives the dispatcher: the child's stdin is a pipe whose write end only the
dispatcher holds (end-of-file when it dies, however it dies: plugins exit on it), and on
Linux the child is started with a parent-death signal (``PR_SET_PDEATHSIG``, SIGKILL,
set by util-linux ``setpriv`` where present, else by ``prctl`` between fork and exec).

Modules: ``target`` (the manifest's model), ``handshake`` (the host's side of steps 2-3),
``child`` (one launched process: 1, 4, the parent-death signal, the end of 7), ``output``
(the bounded ring of stderr lines behind ``logs``), ``sandbox`` (the launch of a target
with ``sandbox:``), ``uids`` (the uid of its own a sandboxed plugin runs as, as root),
``supervisor`` (``PluginProcess``: launches, supervision, restarts, health), ``provider``.
"""

from providers.subprocess.handshake import HandshakeError
from providers.subprocess.provider import SubprocessProvider
from providers.subprocess.supervisor import PluginProcess
from providers.subprocess.target import SubprocessTarget

__all__ = ["HandshakeError", "PluginProcess", "SubprocessProvider", "SubprocessTarget"]
