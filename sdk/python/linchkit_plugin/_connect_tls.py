"""The TLS files of ``connect`` (reverse mode over ``wss://``): the roots that verify the
gateway and the client certificate the plugin logs in with (mutual TLS), the same
options and words in every SDK's ``connect``:

==================  ================================  =====================================
option              variable                          what
==================  ================================  =====================================
``--ca-file``       ``LINCHKIT_PLUGIN_GATEWAY_CA``    PEM roots that verify the gateway,
                                                      instead of the system's
``--cert-file``     ``LINCHKIT_PLUGIN_CLIENT_CERT``   the client certificate (chain), PEM
``--key-file``      ``LINCHKIT_PLUGIN_CLIENT_KEY``    its unencrypted private key, PEM
==================  ================================  =====================================

A flag wins over its variable; an empty variable counts as unset. Every file is read and
checked before the plugin dials: ``ConnectTlsError`` says in one line which option (or
variable, as given) and which file, and why (missing, unreadable, no certificate, no
unencrypted key, the key of another certificate, PEM text where a path goes), and never
quotes what a file or a value holds: a key's bytes are not for a log.

``refusal_of`` puts a TLS alert of the gateway's in those words: a gateway that requires
a client certificate refuses the handshake without one (``certificate required``), with
one of a CA it does not trust (``unknown ca``) or an expired one (``certificate
expired``).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from linchkit_plugin._setting_files import PEM_FILE_BYTES, read_setting_file

__all__ = [
    "CLIENT_CERT_FILE_ENV",
    "CLIENT_KEY_FILE_ENV",
    "GATEWAY_CA_FILE_ENV",
    "ConnectTls",
    "ConnectTlsError",
    "refusal_of",
]

GATEWAY_CA_FILE_ENV = "LINCHKIT_PLUGIN_GATEWAY_CA"
#: ``connect``'s own: a path. A subprocess plugin's AutoMTLS reads the same name (the host's
#: certificate itself, ``linchkit_plugin.handshake``), which ``connect`` never runs under.
CLIENT_CERT_FILE_ENV = "LINCHKIT_PLUGIN_CLIENT_CERT"
CLIENT_KEY_FILE_ENV = "LINCHKIT_PLUGIN_CLIENT_KEY"

_FLAGS = {"ca_file": "--ca-file", "cert_file": "--cert-file", "key_file": "--key-file"}
_VARIABLES = {
    "ca_file": GATEWAY_CA_FILE_ENV,
    "cert_file": CLIENT_CERT_FILE_ENV,
    "key_file": CLIENT_KEY_FILE_ENV,
}
_CERTIFICATE = "-----BEGIN CERTIFICATE-----"


class ConnectTlsError(ValueError):
    """A TLS file of ``connect`` cannot be used; the message names the option (or the
    variable) and the file, never what it holds."""


@dataclass(frozen=True)
class ConnectTls:
    """The three settings as given; ``names`` says how messages name each (its flag, or
    its variable when the value came from there)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    names: Mapping[str, str] = field(default_factory=lambda: _FLAGS, compare=False)

    @classmethod
    def configured(
        cls,
        ca_file: str | None,
        cert_file: str | None,
        key_file: str | None,
        environment: Mapping[str, str] | None = None,
    ) -> ConnectTls:
        """The flags' values (None: not given), else the variables' in ``environment``
        (default: the process's)."""
        source = os.environ if environment is None else environment
        flags = {"ca_file": ca_file, "cert_file": cert_file, "key_file": key_file}
        values: dict[str, str | None] = {}
        names: dict[str, str] = {}
        for setting, flag in _FLAGS.items():
            given = flags[setting]
            if given:
                values[setting], names[setting] = given, flag
            else:
                values[setting] = source.get(_VARIABLES[setting]) or None
                names[setting] = _VARIABLES[setting] if values[setting] else flag
        return cls(values["ca_file"], values["cert_file"], values["key_file"], names)

    def context(self, url: str) -> ssl.SSLContext | bool:
        """What the dial verifies the gateway at ``url`` with and presents to it: the
        system's roots (``True``) when no file is given, else a context of the files,
        each checked. Raises ``ConnectTlsError``."""
        if (self.cert_file is None) != (self.key_file is None):
            raise ConnectTlsError("--cert-file and --key-file go together")
        if self.ca_file is None and self.cert_file is None:
            return True
        if urlsplit(url).scheme.lower() not in ("wss", "https"):  # https: dialled as wss
            raise ConnectTlsError("--ca-file, --cert-file and --key-file need a wss:// --url")
        for setting in ("ca_file", "cert_file", "key_file"):
            _check_path(self.names[setting], getattr(self, setting))
        roots = self._certificates("ca_file") if self.ca_file is not None else None
        context = ssl.create_default_context(cadata=roots)
        if self.cert_file is not None and self.key_file is not None:
            self._certificates("cert_file")
            self._check_key()
            try:
                # No password prompt on a terminal for an encrypted key: it fails instead.
                context.load_cert_chain(self.cert_file, self.key_file, password=lambda: b"")
            except ssl.SSLError as error:
                name, cert = self.names["key_file"], self.names["cert_file"]
                if error.reason == "KEY_VALUES_MISMATCH":
                    raise ConnectTlsError(
                        f"{name}: {self.key_file} is not the private key of the certificate"
                        f" in {cert}"
                    ) from None
                raise ConnectTlsError(
                    f"{name}: {self.key_file} holds no unencrypted PEM private key"
                ) from None
            except OSError as error:  # the file changed since it was read
                raise ConnectTlsError(
                    f"{self.names['key_file']}: cannot read {self.key_file}: {_reason(error)}"
                ) from None
        return context

    def _read(self, setting: str) -> str:
        path: str = getattr(self, setting)
        try:
            # Capped, and never a FIFO or a device: /dev/zero grew the process without end.
            blob = read_setting_file(path, limit=PEM_FILE_BYTES)
        except OSError as error:
            raise ConnectTlsError(
                f"{self.names[setting]}: cannot read {path}: {_reason(error)}"
            ) from None
        return blob.decode("ascii", errors="replace")

    def _certificates(self, setting: str) -> str:
        """The file's PEM text, if it holds a certificate OpenSSL reads."""
        text = self._read(setting)
        try:
            if _CERTIFICATE not in text:
                raise ssl.SSLError("no certificate")
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=text)
        except ssl.SSLError:
            raise ConnectTlsError(
                f"{self.names[setting]}: {getattr(self, setting)} holds no PEM certificate"
            ) from None
        return text

    def _check_key(self) -> None:
        """The key file holds a PEM private key that is not encrypted (OpenSSL reads it
        at ``load_cert_chain``)."""
        text = self._read("key_file")
        begins = [line for line in text.splitlines() if line.startswith("-----BEGIN ")]
        keys = [line for line in begins if line.rstrip().endswith("PRIVATE KEY-----")]
        if not keys or "ENCRYPTED" in keys[0] or "Proc-Type: 4,ENCRYPTED" in text:
            raise ConnectTlsError(
                f"{self.names['key_file']}: {self.key_file} holds no unencrypted PEM private key"
            )


def _check_path(name: str, value: str | None) -> None:
    """A value that cannot be a path is refused without quoting it: the PEM text of a key
    pasted into ``LINCHKIT_PLUGIN_CLIENT_KEY`` would otherwise be printed in full."""
    if value is None:
        return
    if "-----BEGIN" in value:
        raise ConnectTlsError(
            f"{name}: the value is PEM text, not a file's path: write it to a file and give"
            " that file's path"
        )
    if not value.isprintable():
        raise ConnectTlsError(f"{name}: the value holds a line break or a control character")


def _reason(error: OSError) -> str:
    return (error.strerror or type(error).__name__).lower()


#: A TLS alert of the gateway's (OpenSSL's reason, after ``ALERT_``), in the words every
#: SDK says it.
_ALERTS = {
    "CERTIFICATE_REQUIRED": (
        "the gateway requires a client certificate and got none (--cert-file and --key-file)"
    ),
    "UNKNOWN_CA": (
        "the gateway does not trust this plugin's client certificate: no CA it trusts signed it"
    ),
    "CERTIFICATE_EXPIRED": "this plugin's client certificate has expired: the gateway refused it",
}


def refusal_of(error: BaseException) -> str | None:
    """The words of the TLS alert with which the gateway refused the handshake, if
    ``error`` (or what it was raised from) is one; else None."""
    for each in (error, error.__cause__, error.__context__):
        reason = getattr(each, "reason", None) if isinstance(each, ssl.SSLError) else None
        if isinstance(reason, str) and "_ALERT_" in reason:
            alert = reason.split("_ALERT_", 1)[1]
            words = _ALERTS.get(alert)
            if words is None:
                words = f"the gateway refused the handshake ({alert.lower().replace('_', ' ')})"
            return f"TLS: {words}"
    return None
