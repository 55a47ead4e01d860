"""Helpers for testing code that uses the dispatcher: local stand-ins for what cannot run here.

Each stand-in is an emulation of a platform's documented behaviour and says so; see its
module for the documents it follows and what it leaves out.

``dispatcher.testing.lambda_kit`` is a pytest plugin you opt into
(``pytest_plugins = ["dispatcher.testing.lambda_kit"]``): a local AWS Lambda made of
moto's server and the real Lambda runtime in Docker, and a ``lambda_dispatcher`` fixture
that deploys your manifest's Lambda plugins to it (see the README's "Lambda" section).
``local_lambda`` has the Invoke API front it uses and ``LocalLambdaServer``, the whole
local Lambda that ``dispatcher local-lambda`` runs; ``knative`` the Knative stand-in.
"""
