"""etcd's v3 JSON gateway as a registering plugin reaches it (``linchkit_plugin.registry``):
over http:// or https://, with a client certificate, as one of etcd's users.

How a plugin proves itself is ``EtcdAccess``, read from flags or the environment and
checked whole before the plugin serves (``EtcdAccess.tls_context``): TLS files only with
an https:// etcd, a client certificate with its key, a user with a password, and a
password over plain http:// only to a loopback etcd, where it crosses no network.

A user authenticates (``/v3/auth/authenticate``) and sends its token with every request.
etcd forgets a simple token left unused for its ``--auth-token-ttl`` and every token when
it restarts; a request it refuses for that (HTTP 401, gRPC code 16) is sent once more
with a new token. An etcd whose authentication is off is used without a token, as
etcd's own clients do (said once); should it turn authentication on, the first request
it refuses is sent once more with a token. Whatever else goes wrong is raised, the
password never in a message:

    EtcdUnavailable     etcd did not answer, or not with its gateway's JSON: refused,
     │                  reset or timed out, or a connection closed before etcd had its
     │                  say, in the TLS handshake too (a flaky etcd or load balancer)
     └── EtcdRefused    etcd answered and turned this plugin away: a TLS alert (etcd does
                        not trust its certificate), a certificate of etcd's this plugin
                        does not trust, a port that does not speak TLS, or the user's
                        name or password is wrong, or the user may not write the prefix

Which of the two a TLS failure is decides how soon the plugin tries again
(``registry.Registration``), so it is read with care. With TLS 1.3 the client's side of
the handshake is over before etcd has checked its certificate: etcd's alert and its close
may then meet the request being written, which fails with an EOF; the alert is waiting on
the socket all the same, and is read from there before the failure is called an outage.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson

from linchkit_plugin._masked_url import masked_url
from linchkit_plugin._setting_files import PEM_FILE_BYTES, check_setting_file

__all__ = [
    "ENVIRONMENT_NAMES",
    "REGISTER_ETCD_CA_FILE_ENV",
    "REGISTER_ETCD_CERT_FILE_ENV",
    "REGISTER_ETCD_KEY_FILE_ENV",
    "REGISTER_ETCD_PASSWORD_ENV",
    "REGISTER_ETCD_USER_ENV",
    "EtcdAccess",
    "EtcdRefused",
    "EtcdUnavailable",
    "Gateway",
    "why",
]

REGISTER_ETCD_CA_FILE_ENV = "LINCHKIT_REGISTER_ETCD_CA_FILE"
REGISTER_ETCD_CERT_FILE_ENV = "LINCHKIT_REGISTER_ETCD_CERT_FILE"
REGISTER_ETCD_KEY_FILE_ENV = "LINCHKIT_REGISTER_ETCD_KEY_FILE"
REGISTER_ETCD_USER_ENV = "LINCHKIT_REGISTER_ETCD_USER"
#: The password has a variable and no flag: a command line shows in the process list.
REGISTER_ETCD_PASSWORD_ENV = "LINCHKIT_REGISTER_ETCD_PASSWORD"

#: How messages name each setting when it comes from the environment.
ENVIRONMENT_NAMES: Mapping[str, str] = {
    "ca_file": REGISTER_ETCD_CA_FILE_ENV,
    "cert_file": REGISTER_ETCD_CERT_FILE_ENV,
    "key_file": REGISTER_ETCD_KEY_FILE_ENV,
    "user": REGISTER_ETCD_USER_ENV,
    "password": REGISTER_ETCD_PASSWORD_ENV,
}

#: etcd's answers are a few hundred bytes; a larger one is cut here.
_MAX_ANSWER = 1024 * 1024
#: Seconds to wait for the TLS alert that may follow a request etcd cut off (it is
#: normally there already, having come before the close).
_ALERT_WAIT = 1.0
#: TLS failures that are a connection closed under the plugin, not something etcd said.
_CUT = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)
#: gRPC status codes etcd's gateway reports (``code``; ``error.grpc_code`` on a stream).
_INVALID_ARGUMENT = 3  # authentication failed: wrong user name or password
_PERMISSION_DENIED = 7
_FAILED_PRECONDITION = 9  # authentication is not enabled
_UNAUTHENTICATED = 16  # invalid auth token: expired, or etcd restarted


class EtcdUnavailable(Exception):
    """etcd did not answer, or answered something that is not its gateway's JSON."""


class EtcdRefused(EtcdUnavailable):
    """etcd answered and turned this plugin away: its TLS handshake, its user's name or
    password, or its user's permission. Retried as an outage is: an operator may mend
    etcd's side while the plugin serves."""


@dataclass(frozen=True)
class EtcdAccess:
    """How a plugin checks etcd and proves itself to it; every field optional.

    ``ca_file``: PEM roots that verify etcd (default: the system's); ``cert_file`` and
    ``key_file``: the client certificate to present; ``user`` and ``password``: one of
    etcd's users. ``names`` says how messages name each setting (a flag or a variable);
    ``etcd``, the URL's, when the caller knows it.
    """

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    names: Mapping[str, str] = field(
        default_factory=lambda: ENVIRONMENT_NAMES, repr=False, compare=False
    )

    @classmethod
    def from_environment(cls, environment: Mapping[str, str] | None = None) -> EtcdAccess:
        """The ``LINCHKIT_REGISTER_ETCD_*`` variables; an empty one counts as unset."""
        source = os.environ if environment is None else environment
        return cls(
            ca_file=source.get(REGISTER_ETCD_CA_FILE_ENV) or None,
            cert_file=source.get(REGISTER_ETCD_CERT_FILE_ENV) or None,
            key_file=source.get(REGISTER_ETCD_KEY_FILE_ENV) or None,
            user=source.get(REGISTER_ETCD_USER_ENV) or None,
            password=source.get(REGISTER_ETCD_PASSWORD_ENV) or None,
        )

    def tls_context(self, etcd: str) -> ssl.SSLContext | None:
        """The TLS context for reaching ``etcd`` (None over http://), every setting checked
        first; ValueError names the setting that is wrong, never the password."""
        parts = urlsplit(etcd)
        names = self.names
        if bool(self.user) != bool(self.password):
            given, missing = ("user", "password") if self.user else ("password", "user")
            raise ValueError(
                f"{names[given]} needs {names[missing]} too: etcd takes both or neither"
            )
        if bool(self.cert_file) != bool(self.key_file):
            given, missing = (
                ("cert_file", "key_file") if self.cert_file else ("key_file", "cert_file")
            )
            raise ValueError(
                f"{names[given]} needs {names[missing]} too: a client certificate and its key"
            )
        if parts.scheme != "https":
            for setting in ("ca_file", "cert_file", "key_file"):
                if getattr(self, setting):
                    raise ValueError(
                        f"{names[setting]} is for an https:// etcd, and {masked_url(etcd)} is"
                        " not: use"
                        " https:// or leave it unset"
                    )
            if self.password and not _loopback(parts.hostname or ""):
                raise ValueError(
                    f"{names['password']} would cross the network in clear to"
                    f" {masked_url(etcd)}:"
                    " reach etcd over https://, or on a loopback address"
                )
            return None
        self._check_files()
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as error:
            raise ValueError(
                f"{names['ca_file']}: cannot read {_shown_path(self.ca_file or '')} as PEM"
                f" roots ({_reason(error)})"
            ) from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file and self.key_file:
            try:
                # No password prompt on a terminal for an encrypted key: it fails instead.
                context.load_cert_chain(self.cert_file, self.key_file, password=lambda: b"")
            except (OSError, ssl.SSLError) as error:
                raise ValueError(
                    f"{names['cert_file']} and {names['key_file']}: cannot read"
                    f" {_shown_path(self.cert_file)} and {_shown_path(self.key_file)} as a PEM"
                    " certificate and its"
                    f" unencrypted key ({_reason(error)})"
                ) from None
        return context

    def _check_files(self) -> None:
        """Refuse a TLS file that is not a regular file of PEM size (``_setting_files``),
        naming its setting: OpenSSL reads them by their paths, whole, and a FIFO held the
        start for ever, a device or a huge file read on and on."""
        for setting in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, setting)
            if not path:
                continue
            try:
                check_setting_file(path, limit=PEM_FILE_BYTES)
            except OSError as error:
                raise ValueError(
                    f"{self.names[setting]}: cannot read {_shown_path(path)}:"
                    f" {_reason(error).lower()}"
                ) from None


def _shown_path(path: str) -> str:
    """``path`` as a message may show it: never a value that is no path (a key's PEM text
    pasted where its path goes), nor one that would write control characters."""
    return path if path.isprintable() and "-----BEGIN" not in path else "its file"


def _loopback(host: str) -> bool:
    """127.0.0.0/8, ::1, localhost: a host this machine's own traffic never leaves."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    # ::ffff:127.0.0.1 is 127.0.0.1 reached over a dual-stack socket.
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def _reason(error: BaseException | str) -> str:
    return str(getattr(error, "strerror", None) or getattr(error, "reason", None) or error)


class Gateway:
    """etcd's v3 JSON gateway over http.client: one POST on a connection of its own, one
    JSON object back. Not thread-safe: one registration thread uses it."""

    def __init__(
        self,
        etcd: str,
        timeout: float,
        access: EtcdAccess | None = None,
        *,
        say: Callable[[str], None] = lambda _message: None,
    ) -> None:
        self.access = access or EtcdAccess()
        # The setting as it was given (``--register-etcd`` or its variable), when known.
        setting = f"{self.access.names['etcd']}: " if "etcd" in self.access.names else ""
        parts = urlsplit(etcd)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            # Masked: the credentials refused below may be in it (before, they were quoted).
            raise ValueError(
                f"{setting}the etcd to register in must be an http(s):// URL: {masked_url(etcd)!r}"
            )
        if parts.username or parts.password:
            raise ValueError(f"{setting}etcd authentication by URL credentials is not supported")
        mistake = (
            f"{setting}the etcd to register in must have a valid host name and a port in 1-65535"
        )
        try:
            port = parts.port
            parts.hostname.encode("idna")  # as the socket layer will: an empty label fails
        except ValueError:  # UnicodeError too
            raise ValueError(mistake) from None
        if port == 0:  # a port nothing can be dialled at (Go's SDK refuses it too)
            raise ValueError(mistake)
        self._context = self.access.tls_context(etcd)
        self.base = masked_url(etcd).rstrip("/")  # as lines show it; requests use the parts
        # No proxy: a registry is reached directly, as the dispatcher reaches it.
        self._host, self._port, self._path = parts.hostname, port, parts.path.rstrip("/")
        self.timeout = timeout
        self._say = say
        self._token: str | None = None
        #: etcd answered that its authentication is off: requests go without a token.
        self._authentication_off = False

    def post(self, path: str, body: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """``body`` to ``path`` as the configured user; etcd's answer (its error answers
        are JSON too, and returned), or EtcdRefused when etcd turns the user away."""
        wait = timeout or self.timeout
        user = self.access.user
        if user and self._token is None and not self._authentication_off:
            self._token = self._authenticate(wait)
        status, document = self._exchange(path, body, wait, self._token)
        code = _code(document)
        # A token that expired unused or that a restarted etcd forgot; or none, and etcd
        # has turned its authentication on since: a new token, and one more try.
        stale = status == 401 and code == _UNAUTHENTICATED
        tokenless = status == 403 and code == _PERMISSION_DENIED and self._token is None
        if user and (stale or tokenless):
            self._authentication_off = False
            self._token = self._authenticate(wait)
            status, document = self._exchange(path, body, wait, self._token)
            code = _code(document)
        if status in (401, 403) and code in (_UNAUTHENTICATED, _PERMISSION_DENIED):
            raise EtcdRefused(self._refusal(path, code, document))
        return document

    def _authenticate(self, timeout: float) -> str | None:
        """A token for the user; None when etcd's authentication is off."""
        body = {"name": self.access.user, "password": self.access.password}
        status, document = self._exchange("/v3/auth/authenticate", body, timeout, None)
        token = document.get("token")
        if status == 200 and isinstance(token, str) and token:
            return token
        user, code = self.access.user, _code(document)
        if code == _INVALID_ARGUMENT:
            raise EtcdRefused(
                f"etcd at {self.base} refused user '{user}': authentication failed (a wrong"
                f" user name or {self.access.names['password']})"
            )
        if code == _FAILED_PRECONDITION:  # "authentication is not enabled"
            self._authentication_off = True
            self._say(
                f"warning: etcd at {self.base} has authentication off: registering without user"
                f" '{user}' ({self.access.names['user']} can be unset)"
            )
            return None
        raise EtcdUnavailable(
            f"etcd at {self.base} did not authenticate user '{user}'{why(document)}"
        )

    def _refusal(self, path: str, code: int, document: dict[str, Any]) -> str:
        names = self.access.names
        if not self.access.user:
            return (
                f"etcd at {self.base} requires a user ({_message(document)}): set"
                f" {names['user']} and {names['password']}"
            )
        if code == _PERMISSION_DENIED:
            return (
                f"etcd at {self.base} denies user '{self.access.user}' {path} (permission"
                " denied): grant the user's role READWRITE on the registry prefix"
            )
        return (
            f"etcd at {self.base} refused the token it just gave user"
            f" '{self.access.user}' ({_message(document)})"
        )

    def _exchange(
        self, path: str, body: dict[str, Any], timeout: float, token: str | None
    ) -> tuple[int, dict[str, Any]]:
        headers = {"content-type": "application/json"}
        if token is not None:
            headers["authorization"] = token
        connection = self._connection(timeout)
        try:
            try:
                connection.connect()  # TCP, and the TLS handshake over https://
            except (OSError, ValueError) as error:  # refused, timed out, reset; TLS; a name
                raise self._failure(error) from None
            try:
                connection.request("POST", self._path + path, orjson.dumps(body), headers)
                answer = connection.getresponse()
                status, raw = answer.status, answer.read(_MAX_ANSWER)
            except (OSError, ValueError, http.client.HTTPException) as error:
                cut = isinstance(error, (*_CUT, ConnectionError))
                alert = _pending_alert(connection) if cut else None
                raise self._failure(alert or error) from None
        finally:
            connection.close()
        try:
            document = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise EtcdUnavailable(f"{self.base} answered something that is not JSON") from None
        if not isinstance(document, dict):
            raise EtcdUnavailable(f"{self.base} answered something that is not a JSON object")
        return status, document

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._context is None:
            return http.client.HTTPConnection(self._host, self._port, timeout=timeout)
        return http.client.HTTPSConnection(
            self._host, self._port, timeout=timeout, context=self._context
        )

    def _failure(self, cause: BaseException) -> EtcdUnavailable:
        """What ``cause`` says of etcd: an outage, or a refusal (``EtcdRefused``), which the
        plugin waits longer to try again after."""
        names = self.access.names
        if isinstance(cause, ssl.SSLCertVerificationError):
            hint = (
                f"is {names['ca_file']} the CA that issued it?"
                if self.access.ca_file
                else f"name the CA that issued it with {names['ca_file']}"
            )
            return EtcdRefused(
                f"cannot verify etcd's certificate at {self.base} ({cause.verify_message}): {hint}"
            )
        if isinstance(cause, ssl.SSLError) and not isinstance(cause, _CUT):
            if "ALERT" in str(cause.reason):
                # etcd's word: it does not trust this plugin's certificate (or got none).
                hint = (
                    f"does etcd trust the certificate of {names['cert_file']}?"
                    if self.access.cert_file
                    else f"etcd may require a client certificate ({names['cert_file']})"
                )
            else:  # e.g. WRONG_VERSION_NUMBER: what answered does not speak TLS
                hint = f"is {self.base} etcd's TLS port, speaking TLS 1.2 or later?"
            return EtcdRefused(
                f"the TLS handshake with etcd at {self.base} failed"
                f" ({cause.reason or _reason(cause)}): {hint}"
            )
        if isinstance(cause, _CUT):
            # A connection closed before etcd had its say: a flaky etcd or load balancer,
            # an etcd starting or stopping; tried again as one that is down (so is a reset).
            return EtcdUnavailable(
                f"{self.base} does not answer (it closed the connection during TLS:"
                f" {cause.reason or _reason(cause)})"
            )
        return EtcdUnavailable(f"{self.base} does not answer ({_reason(cause)})")

    def __repr__(self) -> str:
        who = f" as '{self.access.user}'" if self.access.user else ""
        return f"<Gateway {self.base}{who} token={'yes' if self._token else 'no'}>"


def _pending_alert(connection: http.client.HTTPConnection) -> ssl.SSLError | None:
    """The TLS alert etcd sent before it closed ``connection``, if one is waiting there:
    with TLS 1.3 etcd checks a client's certificate after the client's side of the
    handshake is over, so its verdict may reach the socket only as the request being
    written fails (an EOF), and is read here rather than taken for an outage."""
    sock = connection.sock
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        sock.settimeout(_ALERT_WAIT)
        sock.recv(1)
    except ssl.SSLError as error:
        return None if isinstance(error, _CUT) else error
    except OSError:
        return None
    return None


def _code(document: dict[str, Any]) -> int | None:
    """The gRPC status code of an error answer: ``code`` (a unary call) or
    ``error.grpc_code`` (a stream's, such as the lease keepalive's)."""
    code = document.get("code")
    error = document.get("error")
    if code is None and isinstance(error, dict):
        code = error.get("grpc_code")
    with contextlib.suppress(TypeError, ValueError):
        return int(code) if code is not None else None
    return None


def why(answer: dict[str, Any]) -> str:
    """etcd's message in an error answer, as ``: <message>`` to append (or nothing)."""
    message = _message(answer)
    return f": {message}" if message else ""


def _message(answer: dict[str, Any]) -> str:
    """etcd's message in an error answer (a stream's is inside ``error``), on one line."""
    message = answer.get("message") or answer.get("error")
    if isinstance(message, dict):
        message = message.get("message")
    return " ".join(str(message).split())[:200] if message else ""
