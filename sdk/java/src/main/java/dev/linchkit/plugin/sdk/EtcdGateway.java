package dev.linchkit.plugin.sdk;

import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParseException;
import com.google.gson.JsonParser;
import java.io.ByteArrayInputStream;
import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.StringReader;
import java.net.ConnectException;
import java.net.InetAddress;
import java.net.URI;
import java.net.UnknownHostException;
import java.net.http.HttpClient;
import java.net.http.HttpConnectTimeoutException;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.net.http.HttpTimeoutException;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.nio.file.AccessDeniedException;
import java.nio.file.Files;
import java.nio.file.NoSuchFileException;
import java.nio.file.Path;
import java.security.GeneralSecurityException;
import java.security.KeyStore;
import java.security.PrivateKey;
import java.security.cert.CertPathBuilderException;
import java.security.cert.CertPathValidatorException;
import java.security.cert.Certificate;
import java.security.cert.CertificateException;
import java.security.cert.CertificateFactory;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Collection;
import java.util.List;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.CompletionStage;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.Flow;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;
import java.util.function.Consumer;
import java.util.regex.Pattern;
import javax.net.ssl.KeyManagerFactory;
import javax.net.ssl.SSLContext;
import javax.net.ssl.SSLHandshakeException;
import javax.net.ssl.SSLParameters;
import javax.net.ssl.TrustManagerFactory;
import org.bouncycastle.asn1.pkcs.PrivateKeyInfo;
import org.bouncycastle.openssl.PEMKeyPair;
import org.bouncycastle.openssl.PEMParser;
import org.bouncycastle.openssl.jcajce.JcaPEMKeyConverter;

/**
 * etcd's v3 JSON gateway as a registering plugin reaches it ({@link Registration}): over http://
 * or https://, with a client certificate, as one of etcd's users, the same contract as the Go and
 * Python SDKs' (docs/registry.md, "A plugin registers itself"), through the JDK's
 * {@link HttpClient}, so the SDK carries no etcd client library.
 *
 * <p>Every setting is checked before the plugin serves: TLS files only with an https:// etcd, a
 * client certificate with its key, a user with a password, and a password over plain http:// only
 * to a loopback etcd, where it crosses no network. A user authenticates
 * ({@code /v3/auth/authenticate}) and sends its token with every request; etcd forgets a simple
 * token left unused for its {@code --auth-token-ttl}, and every token when it restarts, so a
 * request it refuses for that (HTTP 401, gRPC code 16) is sent once more with a new token. An etcd
 * whose authentication is off is used without a token, as etcd's own clients do (said once);
 * should it turn authentication on, the first request it refuses is sent once more with a token.
 *
 * <p>A request that gets no answer throws {@link Unavailable}; one that etcd answers by turning
 * the plugin away (the TLS handshake, the user's password or permission) throws {@link Refused},
 * after which the plugin waits longer before it tries again. Messages never hold the password.
 * Not safe for concurrent use: the registration's thread alone uses it.
 */
final class EtcdGateway {
  private static final String PASSWORD_ENV = Registration.PASSWORD_ENV;

  /**
   * gRPC status codes etcd's gateway reports: "code" in a unary answer, "error.grpc_code" in a
   * stream's (the lease keepalive's).
   */
  static final long CODE_INVALID_ARGUMENT = 3; // authentication failed: a wrong user name or password
  static final long CODE_PERMISSION_DENIED = 7; // the user may not do this
  static final long CODE_FAILED_PRECONDITION = 9; // authentication is not enabled
  static final long CODE_UNAUTHENTICATED = 16; // invalid auth token: expired unused, or etcd restarted

  /** The TLS versions spoken to an https:// etcd. */
  private static final String[] TLS_PROTOCOLS = {"TLSv1.3", "TLSv1.2"};

  /** The largest answer read from etcd: its answers here are a few hundred bytes. */
  static final int MAX_ANSWER_BYTES = 1 << 20;

  /** etcd gave no answer: tried again about every second. */
  static class Unavailable extends Exception {
    Unavailable(String message) {
      super(message, null, false, false);
    }
  }

  /** etcd answered and turned the plugin away: retried after waits that grow, as an operator may mend it. */
  static final class Refused extends Unavailable {
    Refused(String message) {
      super(message);
    }
  }

  final String base;
  final Duration timeout;
  private final HttpClient client;
  /** The client's TLS context for an https:// etcd, null for http://: the alert probe's too. */
  private final SSLContext tls;
  private final URI url;
  private final String user;
  private final String password;
  private final String certFile;
  private final String caFile;
  private final String userName;
  private final String caFileName;
  private final String certFileName;
  private final Consumer<String> say;
  private String token = "";
  /** etcd answered that its authentication is off, so requests go without a token. */
  private boolean authenticationOff;

  private EtcdGateway(String base, URI url, Duration timeout, HttpClient client, SSLContext tls, String user,
      String password, String certFile, String caFile, RegistrySettings settings, Consumer<String> say) {
    this.base = base;
    this.url = url;
    this.timeout = timeout;
    this.client = client;
    this.tls = tls;
    this.user = user;
    this.password = password;
    this.certFile = certFile;
    this.caFile = caFile;
    this.userName = settings.name(RegistrySettings.Setting.USER);
    this.caFileName = settings.name(RegistrySettings.Setting.CA_FILE);
    this.certFileName = settings.name(RegistrySettings.Setting.CERT_FILE);
    this.say = say;
  }

  /**
   * How etcd at {@code base} ({@code url}, an http(s) URL already checked) is reached, as
   * {@code settings} say, each request bounded by {@code timeout}; {@code say} tells what is worth
   * knowing but not a failure. A mistake is refused naming each setting as it was given.
   */
  static EtcdGateway from(String base, URI url, RegistrySettings settings, Duration timeout, Consumer<String> say)
      throws Handshake.HandshakeException {
    String caFile = settings.value(RegistrySettings.Setting.CA_FILE);
    String certFile = settings.value(RegistrySettings.Setting.CERT_FILE);
    String keyFile = settings.value(RegistrySettings.Setting.KEY_FILE);
    String user = settings.value(RegistrySettings.Setting.USER);
    String password = settings.password();
    String caName = settings.name(RegistrySettings.Setting.CA_FILE);
    String certName = settings.name(RegistrySettings.Setting.CERT_FILE);
    String keyName = settings.name(RegistrySettings.Setting.KEY_FILE);
    String userName = settings.name(RegistrySettings.Setting.USER);
    if (user.isEmpty() != password.isEmpty()) {
      String given = user.isEmpty() ? PASSWORD_ENV : userName;
      String missing = user.isEmpty() ? userName : PASSWORD_ENV;
      throw new Handshake.HandshakeException(given + " needs " + missing + " too: etcd takes both or neither");
    }
    if (certFile.isEmpty() != keyFile.isEmpty()) {
      String given = certFile.isEmpty() ? keyName : certName;
      String missing = certFile.isEmpty() ? certName : keyName;
      throw new Handshake.HandshakeException(given + " needs " + missing + " too: a client certificate and its key");
    }
    // No proxy: a registry is reached directly, as the dispatcher reaches it. HTTP/1.1: etcd's
    // gateway shares its port with gRPC, and an h2c upgrade is not what it expects.
    HttpClient.Builder client = HttpClient.newBuilder()
        .proxy(HttpClient.Builder.NO_PROXY)
        .version(HttpClient.Version.HTTP_1_1)
        .followRedirects(HttpClient.Redirect.NEVER)
        .connectTimeout(timeout);
    SSLContext tls = null;
    if (!url.getScheme().equals("https")) {
      String[][] files = {{caName, caFile}, {certName, certFile}, {keyName, keyFile}};
      for (String[] file : files) {
        if (!file[1].isEmpty()) {
          throw new Handshake.HandshakeException(file[0] + " is for an https:// etcd, and " + base
              + " is not: use https:// or leave it unset");
        }
      }
      if (!password.isEmpty() && !isLoopback(url.getHost())) {
        throw new Handshake.HandshakeException(PASSWORD_ENV + " would cross the network in clear to " + base
            + ": reach etcd over https://, or on a loopback address");
      }
    } else {
      tls = tlsContext(caFile, caName, certFile, certName, keyFile, keyName);
      client.sslContext(tls);
      SSLParameters parameters = new SSLParameters();
      parameters.setProtocols(TLS_PROTOCOLS.clone());
      client.sslParameters(parameters);
    }
    return new EtcdGateway(base, url, timeout, client.build(), tls, user, password, certFile, caFile, settings, say);
  }

  private static final Pattern IPV4 = Pattern.compile("\\d{1,3}(\\.\\d{1,3}){3}");

  /**
   * 127.0.0.0/8, ::1, localhost: hosts this machine's own traffic never leaves. {@code host} as
   * {@link URI#getHost} gives it (an IPv6 address in brackets); an address is read as one, a name
   * is never looked up.
   */
  static boolean isLoopback(String host) {
    if (host == null) return false;
    if (host.equals("localhost")) return true;
    boolean ipv6 = host.startsWith("[") && host.endsWith("]");
    if (!ipv6 && !IPV4.matcher(host).matches()) return false;
    try {
      // An address literal: InetAddress reads it without a lookup.
      return InetAddress.getByName(ipv6 ? host.substring(1, host.length() - 1) : host).isLoopbackAddress();
    } catch (UnknownHostException malformed) {
      return false;
    }
  }

  private static SSLContext tlsContext(String caFile, String caName, String certFile, String certName,
      String keyFile, String keyName) throws Handshake.HandshakeException {
    try {
      TrustManagerFactory trust = null;
      if (!caFile.isEmpty()) {
        byte[] pem = read(caFile, caName);
        Collection<? extends Certificate> roots;
        try {
          roots = CertificateFactory.getInstance("X.509").generateCertificates(new ByteArrayInputStream(pem));
        } catch (CertificateException notPem) {
          roots = List.of();
        }
        if (roots.isEmpty()) throw new Handshake.HandshakeException(caName + ": " + caFile + " holds no PEM certificate");
        KeyStore store = KeyStore.getInstance(KeyStore.getDefaultType());
        store.load(null, null);
        int index = 0;
        for (Certificate root : roots) store.setCertificateEntry("ca-" + index++, root);
        trust = TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
        trust.init(store);
      }
      KeyManagerFactory keys = null;
      if (!certFile.isEmpty()) {
        char[] secret = "linchkit".toCharArray(); // of this in-memory store only
        KeyStore store = KeyStore.getInstance(KeyStore.getDefaultType());
        store.load(null, null);
        try {
          byte[] certPem = read(certFile, certName);
          byte[] keyPem = read(keyFile, keyName);
          Collection<? extends Certificate> chain =
              CertificateFactory.getInstance("X.509").generateCertificates(new ByteArrayInputStream(certPem));
          if (chain.isEmpty()) throw new IOException("no certificate");
          store.setKeyEntry("client", privateKey(keyPem), secret, chain.toArray(new Certificate[0]));
        } catch (IOException | GeneralSecurityException | RuntimeException unreadable) {
          String reason = unreadable.getMessage() == null ? unreadable.getClass().getSimpleName() : unreadable.getMessage();
          throw new Handshake.HandshakeException(certName + " and " + keyName + ": cannot read " + certFile + " and "
              + keyFile + " as a PEM certificate and its unencrypted key (" + oneLine(reason) + ")");
        }
        keys = KeyManagerFactory.getInstance(KeyManagerFactory.getDefaultAlgorithm());
        keys.init(store, secret);
      }
      SSLContext context = SSLContext.getInstance("TLS");
      context.init(keys == null ? null : keys.getKeyManagers(), trust == null ? null : trust.getTrustManagers(), null);
      return context;
    } catch (GeneralSecurityException | IOException broken) {
      throw new Handshake.HandshakeException("cannot set up TLS for etcd: " + oneLine(String.valueOf(broken.getMessage())));
    }
  }

  /** The file's bytes, or a refusal naming the setting ({@code name}) and why it cannot be read. */
  private static byte[] read(String file, String name) throws Handshake.HandshakeException {
    try {
      return Files.readAllBytes(Path.of(file));
    } catch (NoSuchFileException missing) {
      throw new Handshake.HandshakeException(name + ": cannot read " + file + " (no such file or directory)");
    } catch (AccessDeniedException denied) {
      throw new Handshake.HandshakeException(name + ": cannot read " + file + " (permission denied)");
    } catch (IOException | RuntimeException other) {
      throw new Handshake.HandshakeException(name + ": cannot read " + file + " (" + other.getMessage() + ")");
    }
  }

  /** The unencrypted private key in {@code pem}: PKCS#8, or PKCS#1 (RSA) or SEC 1 (EC) as OpenSSL writes them. */
  static PrivateKey privateKey(byte[] pem) throws IOException {
    try (PEMParser parser = new PEMParser(new StringReader(new String(pem, StandardCharsets.US_ASCII)))) {
      JcaPEMKeyConverter converter = new JcaPEMKeyConverter();
      for (Object item = parser.readObject(); item != null; item = parser.readObject()) {
        if (item instanceof PEMKeyPair pair) return converter.getKeyPair(pair).getPrivate();
        if (item instanceof PrivateKeyInfo info) return converter.getPrivateKey(info);
      }
    }
    throw new IOException("no unencrypted private key");
  }

  /**
   * Posts {@code body} to {@code path} as the configured user and returns etcd's answer (its error
   * answers are JSON too); {@link Refused} when etcd turns the user away.
   */
  JsonObject post(String path, JsonObject body) throws Unavailable {
    if (!user.isEmpty() && token.isEmpty() && !authenticationOff) authenticate();
    Answer answer = exchange(path, body, token);
    long code = grpcCode(answer.body);
    // A token that expired unused or that a restarted etcd forgot; or none, and etcd has turned
    // its authentication on since: a new token, and one more try.
    boolean stale = answer.status == 401 && code == CODE_UNAUTHENTICATED;
    boolean tokenless = answer.status == 403 && code == CODE_PERMISSION_DENIED && token.isEmpty();
    if (!user.isEmpty() && (stale || tokenless)) {
      token = "";
      authenticationOff = false;
      authenticate();
      answer = exchange(path, body, token);
      code = grpcCode(answer.body);
    }
    if ((answer.status == 401 || answer.status == 403)
        && (code == CODE_UNAUTHENTICATED || code == CODE_PERMISSION_DENIED)) {
      throw refusal(path, code, answer.body);
    }
    return answer.body;
  }

  /** Sets the user's token, or notes that etcd's authentication is off. */
  private void authenticate() throws Unavailable {
    JsonObject credentials = new JsonObject();
    credentials.addProperty("name", user);
    credentials.addProperty("password", password);
    Answer answer = exchange("/v3/auth/authenticate", credentials, "");
    JsonElement given = answer.body.get("token");
    if (answer.status == 200 && given != null && given.isJsonPrimitive() && !given.getAsString().isEmpty()) {
      token = given.getAsString();
      return;
    }
    long code = grpcCode(answer.body);
    if (code == CODE_INVALID_ARGUMENT) {
      throw new Refused("etcd at " + base + " refused user '" + user + "': authentication failed (a wrong user name or "
          + PASSWORD_ENV + ")");
    }
    if (code == CODE_FAILED_PRECONDITION) { // "authentication is not enabled"
      authenticationOff = true;
      say.accept("etcd at " + base + " has authentication off: registering without user '" + user + "' (" + userName
          + " can be unset)");
      return;
    }
    throw new Unavailable("etcd at " + base + " did not authenticate user '" + user + "'" + why(answer.body));
  }

  private Refused refusal(String path, long code, JsonObject answer) {
    if (user.isEmpty()) {
      return new Refused("etcd at " + base + " requires a user (" + message(answer) + "): set " + userName + " and "
          + PASSWORD_ENV);
    }
    if (code == CODE_PERMISSION_DENIED) {
      return new Refused("etcd at " + base + " denies user '" + user + "' " + path + " (permission denied): grant the"
          + " user's role READWRITE on the registry prefix");
    }
    return new Refused("etcd at " + base + " refused the token it just gave user '" + user + "' (" + message(answer) + ")");
  }

  /** An HTTP status and etcd's JSON answer. */
  private record Answer(int status, JsonObject body) {}

  /** One POST, with {@code token} unless it is empty. */
  private Answer exchange(String path, JsonObject body, String token) throws Unavailable {
    HttpRequest.Builder request = HttpRequest.newBuilder(URI.create(base + path))
        .timeout(timeout)
        .header("Content-Type", "application/json")
        .POST(HttpRequest.BodyPublishers.ofString(body.toString(), StandardCharsets.UTF_8));
    if (!token.isEmpty()) request.header("Authorization", token);
    CompletableFuture<HttpResponse<byte[]>> sent =
        client.sendAsync(request.build(), ignored -> new BoundedBody(MAX_ANSWER_BYTES));
    HttpResponse<byte[]> response;
    try {
      // The whole exchange, the answer's body too, within the timeout (the request's own bounds
      // only the wait for the answer's headers).
      response = sent.get(timeout.toMillis(), TimeUnit.MILLISECONDS);
    } catch (TimeoutException slow) {
      sent.cancel(true);
      throw doesNotAnswerInTime();
    } catch (InterruptedException interrupted) {
      sent.cancel(true);
      Thread.currentThread().interrupt();
      throw new Unavailable(base + ": interrupted");
    } catch (ExecutionException failed) {
      throw failure(failed.getCause() == null ? failed : failed.getCause());
    }
    JsonElement answer;
    try {
      answer = JsonParser.parseString(new String(response.body(), StandardCharsets.UTF_8));
    } catch (JsonParseException | IllegalStateException notJson) {
      answer = null;
    }
    if (answer == null || !answer.isJsonObject()) {
      throw new Unavailable(base + " answered something that is not a JSON object");
    }
    return new Answer(response.statusCode(), answer.getAsJsonObject());
  }

  private Unavailable doesNotAnswerInTime() {
    return new Unavailable(base + " does not answer within " + timeout.toSeconds() + " s");
  }

  /**
   * Why a request got no answer: etcd turned the plugin away ({@link Refused}, after which it waits
   * longer to try again), or it does not answer. An https:// request cut once its handshake was
   * over is asked about on a connection of the gateway's own ({@link AlertProbe}), bounded by the
   * timeout: the alert of an etcd that refuses the client's certificate may have been lost with it.
   */
  Unavailable failure(Throwable error) {
    List<Throwable> chain = new ArrayList<>();
    for (Throwable each = error; each != null && !chain.contains(each); each = each.getCause()) chain.add(each);
    for (Throwable each : chain) {
      if (each instanceof HttpTimeoutException || each instanceof HttpConnectTimeoutException) return doesNotAnswerInTime();
      if (each instanceof BoundedBody.TooLarge) return new Unavailable(base + " answered something that is not a JSON object");
    }
    for (Throwable each : chain) {
      if (each instanceof CertificateException || each instanceof CertPathValidatorException
          || each instanceof CertPathBuilderException) {
        String hint = caFile.isEmpty() ? "name the CA that issued it with " + caFileName
            : "is " + caFileName + " the CA that issued it?";
        return new Refused("cannot verify etcd's certificate at " + base + " (" + rootMessage(each) + "): " + hint);
      }
    }
    for (Throwable each : chain) {
      String text = each.getMessage() == null ? "" : each.getMessage();
      // etcd's word, a TLS alert: it does not trust the client's certificate, or got none. With
      // TLS 1.3 it comes after the client's side of the handshake is over, as the request is
      // written or its answer read; the JDK reports it there, unless the write met the connection
      // etcd closed first (a broken pipe, a reset), for which see cutAfterHandshake below.
      int alert = text.indexOf("Received fatal alert");
      if (alert >= 0) {
        String hint = certFile.isEmpty() ? "etcd may require a client certificate (" + certFileName + ")"
            : "does etcd trust the certificate of " + certFileName + "?";
        return new Refused("the TLS handshake with etcd at " + base + " failed (" + oneLine(text.substring(alert))
            + "): " + hint);
      }
      // What answered does not speak TLS (an http:// etcd, another service).
      if (text.contains("Unsupported or unrecognized SSL message") || text.contains("plaintext connection")) {
        return new Refused("the TLS handshake with etcd at " + base + " failed (" + oneLine(text) + "): is it etcd's"
            + " TLS port, speaking TLS 1.2 or later?");
      }
    }
    if (cutAfterHandshake(chain)) {
      // Asked again, an etcd that refuses the certificate refuses it again, and is waited for
      // longer; one that cut the request for another reason takes it, silent: an outage.
      IOException alert = AlertProbe.alert(tls, TLS_PROTOCOLS.clone(), url.getHost(), port(), timeout);
      if (alert != null) return failure(alert);
    }
    // Anything else is an etcd that does not answer: a connection refused or reset, or closed
    // mid-handshake by a flaky etcd or load balancer, tried again soon. The JDK's client says of a
    // refused connection only "ConnectException" over "ClosedChannelException".
    for (Throwable each : chain) {
      if (each instanceof ConnectException && (each.getMessage() == null || each.getMessage().isBlank())) {
        return new Unavailable(base + " does not answer (connection refused)");
      }
    }
    return new Unavailable(base + " does not answer (" + rootMessage(error) + ")");
  }

  /**
   * Whether {@code chain} tells of a TLS connection that failed once its handshake was over, as one
   * does when etcd turns away the client's certificate under TLS 1.3. Not a connection refused, nor
   * a handshake cut off (which the JDK reports as such): those are outages, and a probe would only
   * knock on a door already shut, a connection more for a struggling etcd or load balancer.
   */
  private boolean cutAfterHandshake(List<Throwable> chain) {
    if (tls == null) return false;
    boolean connectionFailed = false;
    for (Throwable each : chain) {
      if (each instanceof ConnectException || each instanceof SSLHandshakeException) return false;
      if (each instanceof IOException) connectionFailed = true;
    }
    return connectionFailed;
  }

  /** etcd's port, as its URL gives it or the https:// default. */
  private int port() {
    return url.getPort() == -1 ? 443 : url.getPort();
  }

  /** The innermost message in {@code error}'s causes, on one line, or its class's name. */
  private static String rootMessage(Throwable error) {
    String found = null;
    for (Throwable each = error; each != null; each = each.getCause() == each ? null : each.getCause()) {
      if (each.getMessage() != null && !each.getMessage().isBlank()) found = each.getMessage();
      if (each.getCause() == null && found == null) found = each.getClass().getSimpleName();
    }
    return oneLine(found == null ? error.getClass().getSimpleName() : found);
  }

  /** The gRPC status code of an error answer, 0 in any other. */
  static long grpcCode(JsonObject answer) {
    if (answer.has("code")) return number(answer.get("code"));
    JsonElement stream = answer.get("error");
    if (stream != null && stream.isJsonObject()) return number(stream.getAsJsonObject().get("grpc_code"));
    return 0;
  }

  /** etcd's message in an error answer (a stream's is inside "error"), on one line and at most 200 characters. */
  static String message(JsonObject answer) {
    String text = string(answer.get("message"));
    JsonElement stream = answer.get("error");
    if (text.isEmpty() && stream != null && stream.isJsonObject()) text = string(stream.getAsJsonObject().get("message"));
    if (text.length() > 200) text = text.substring(0, 200);
    return oneLine(text);
  }

  /** etcd's message as ": <message>" to append, or "". */
  static String why(JsonObject answer) {
    String text = message(answer);
    return text.isEmpty() ? "" : ": " + text;
  }

  /** The gateway's int64s, which it writes as strings; 0 for anything else. */
  static long number(JsonElement value) {
    if (value == null || !value.isJsonPrimitive()) return 0;
    try {
      return value.getAsJsonPrimitive().isNumber() ? value.getAsLong() : Long.parseLong(value.getAsString());
    } catch (NumberFormatException notANumber) {
      return 0;
    }
  }

  private static String string(JsonElement value) {
    return value != null && value.isJsonPrimitive() && value.getAsJsonPrimitive().isString() ? value.getAsString() : "";
  }

  private static String oneLine(String text) {
    return String.join(" ", text.strip().split("\\s+"));
  }

  /** An answer's body of at most {@code limit} bytes; a larger one fails with {@link TooLarge}. */
  private static final class BoundedBody implements HttpResponse.BodySubscriber<byte[]> {
    static final class TooLarge extends IOException {
      TooLarge() {
        super("an answer over " + MAX_ANSWER_BYTES + " bytes", null);
      }
    }

    private final int limit;
    private final CompletableFuture<byte[]> result = new CompletableFuture<>();
    private final ByteArrayOutputStream bytes = new ByteArrayOutputStream();
    private Flow.Subscription subscription;

    BoundedBody(int limit) {
      this.limit = limit;
    }

    @Override
    public CompletionStage<byte[]> getBody() {
      return result;
    }

    @Override
    public void onSubscribe(Flow.Subscription subscription) {
      this.subscription = subscription;
      subscription.request(Long.MAX_VALUE);
    }

    @Override
    public void onNext(List<ByteBuffer> buffers) {
      if (result.isDone()) return;
      for (ByteBuffer buffer : buffers) {
        if (bytes.size() + buffer.remaining() > limit) {
          subscription.cancel();
          result.completeExceptionally(new TooLarge());
          return;
        }
        byte[] chunk = new byte[buffer.remaining()];
        buffer.get(chunk);
        bytes.write(chunk, 0, chunk.length);
      }
    }

    @Override
    public void onError(Throwable error) {
      result.completeExceptionally(error);
    }

    @Override
    public void onComplete() {
      result.complete(bytes.toByteArray());
    }
  }
}
