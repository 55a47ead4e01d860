"""Calling a plugin over the gRPC binding (``proto/plugin.proto``): shared by the ``grpc``
and ``subprocess`` providers, and the only place on the host side that touches grpcio
(imported when a connection opens, not when these modules load).

* ``providers._grpc.connection`` — ``PluginConnection``: one channel to one plugin, its
  calls and its ``Events`` stream;
* ``providers._grpc.status`` — every gRPC status as a dispatcher error (the table is there);
* ``providers._grpc.lifecycle`` — ``Init``/``Start`` after connecting, ``Stop``/``Destroy``
  before closing: the one sequence both providers run.
"""
