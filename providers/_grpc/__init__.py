"""Calling a plugin over the gRPC binding (``proto/plugin.proto``): shared by the ``grpc``
and ``subprocess`` providers, and the only place on the host side that touches grpcio
(imported when a connection opens, not when these modules load).

* ``providers._grpc.connection`` — ``PluginConnection``: one channel to one plugin, its
  calls, batches, streams and health, from open to close;
* ``providers._grpc.channel`` — how that channel is made: its options and TLS
  (``ChannelSecurity``);
* ``providers._grpc.events`` — ``EventsStream``: the plugin's ``Events`` stream, kept open
  in a task of the connection's;
* ``providers._grpc.release`` — what lets a closed connection, and its errors, hold nothing
  of grpc.aio's (the closed stub, the calls of open streams, tracebacks cut);
* ``providers._grpc.replies`` — a plugin's answers read back: JSON, and its wire errors;
* ``providers._grpc.status`` — every gRPC status as a dispatcher error (the table is there);
* ``providers._grpc.lifecycle`` — ``Init``/``Start`` after connecting, ``Stop``/``Destroy``
  before closing: the one sequence both providers run.
"""
