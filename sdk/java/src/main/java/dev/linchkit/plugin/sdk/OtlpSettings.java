package dev.linchkit.plugin.sdk;

import java.io.ByteArrayOutputStream;
import java.net.URI;
import java.net.URISyntaxException;
import java.nio.ByteBuffer;
import java.nio.charset.CharacterCodingException;
import java.nio.charset.CodingErrorAction;
import java.nio.charset.StandardCharsets;
import java.util.Base64;
import java.util.HexFormat;
import java.util.LinkedHashMap;
import java.util.Locale;
import java.util.Map;
import java.util.function.Consumer;
import java.util.regex.Pattern;

/**
 * Where and how a plugin sends its spans, from the standard OpenTelemetry variables
 * (docs/observability.md, "Java plugins"). Only reading and checking: {@link Tracing} makes the
 * exporter from it, so nothing here loads OpenTelemetry.
 *
 * <p>Tracing is on when {@code OTEL_EXPORTER_OTLP_TRACES_ENDPOINT} (the full URL) or
 * {@code OTEL_EXPORTER_OTLP_ENDPOINT} (a base, {@code /v1/traces} appended) is set, unless
 * {@code OTEL_SDK_DISABLED} is {@code true}. The rest is read as the OpenTelemetry specification
 * says, the signal-specific {@code _TRACES_} variable over the general one: headers
 * ({@code key=value,...}, values percent-decoded), timeout (ms), compression ({@code gzip} or
 * {@code none}), the collector's CA certificate and a client key and certificate (PEM files),
 * {@code OTEL_SERVICE_NAME} and {@code OTEL_RESOURCE_ATTRIBUTES}, the batch processor's
 * {@code OTEL_BSP_*}, and the sampler, {@code OTEL_TRACES_SAMPLER} and {@code _ARG}
 * ({@link Sampling}). A malformed value is ignored with one warning naming the variable (never
 * the value of a header, which holds credentials); the library's default stands for it.
 *
 * <p>{@code OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL} is read only to say so when it asks for what
 * the SDK does not send: spans go as {@code http/protobuf} whatever it says, as in the
 * other SDKs (OpenTelemetry Java's exporter without autoconfigure knows no other), with one
 * warning for another value ({@code grpc}, {@code http/json}).
 *
 * <p>A user and password in the collector's URL ({@code http://user:pass@host:4318/v1/traces})
 * are sent as HTTP basic authentication, as the Python, Go, Rust and TypeScript SDKs send them,
 * unless the headers variable sets {@code authorization} itself: OpenTelemetry Java's exporter
 * drops them without a word. The exporter is given the URL without them, so no message of its
 * quotes them.
 *
 * @param endpoint the OTLP/HTTP traces URL, as given but for its user and password (in
 *     {@code headers} instead); its query may hold a token: never logged
 * @param collectorShown the collector as a log line may name it ({@link #collectorShown(String)})
 * @param headers the exporter's request headers, the URL's user and password as
 *     {@code Authorization: Basic} among them (credentials: never logged)
 * @param timeoutMs the exporter's timeout per request, null for the library's (10 s)
 * @param compression {@code gzip} or {@code none}, null for the library's (none)
 * @param certificateFile a PEM file of the CA certificates to trust, or null
 * @param clientKeyFile a PEM file of the client's private key (mutual TLS), or null
 * @param clientCertificateFile a PEM file of the client's certificate chain, or null
 * @param serviceName {@code service.name}: {@code OTEL_SERVICE_NAME}, else the one in
 *     {@code OTEL_RESOURCE_ATTRIBUTES}, else the plugin's id
 * @param resourceAttributes {@code OTEL_RESOURCE_ATTRIBUTES}, decoded
 * @param scheduleDelayMs {@code OTEL_BSP_SCHEDULE_DELAY}, null for the library's (5 s)
 * @param exportTimeoutMs {@code OTEL_BSP_EXPORT_TIMEOUT}, null for the library's (30 s)
 * @param maxQueueSize {@code OTEL_BSP_MAX_QUEUE_SIZE}, null for the library's (2048)
 * @param maxExportBatchSize {@code OTEL_BSP_MAX_EXPORT_BATCH_SIZE}, null for the library's (512)
 * @param sampling which calls record a span: {@code OTEL_TRACES_SAMPLER} and {@code _ARG}
 */
record OtlpSettings(
    String endpoint,
    String collectorShown,
    Map<String, String> headers,
    Long timeoutMs,
    String compression,
    String certificateFile,
    String clientKeyFile,
    String clientCertificateFile,
    String serviceName,
    Map<String, String> resourceAttributes,
    Long scheduleDelayMs,
    Long exportTimeoutMs,
    Integer maxQueueSize,
    Integer maxExportBatchSize,
    Sampling sampling) {

  static final String OTLP_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT";
  static final String OTLP_TRACES_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
  static final String SERVICE_NAME_ENV = "OTEL_SERVICE_NAME";
  static final String RESOURCE_ATTRIBUTES_ENV = "OTEL_RESOURCE_ATTRIBUTES";
  static final String SDK_DISABLED_ENV = "OTEL_SDK_DISABLED";
  static final String SAMPLER_ENV = "OTEL_TRACES_SAMPLER";
  static final String SAMPLER_ARG_ENV = "OTEL_TRACES_SAMPLER_ARG";
  /** The one {@code OTEL_EXPORTER_OTLP_PROTOCOL} the SDK sends. */
  static final String HTTP_PROTOBUF = "http/protobuf";

  /**
   * A sampler as {@code OTEL_TRACES_SAMPLER} names it, read as OpenTelemetry's SDKs read it (the
   * Go, TypeScript and Python plugin SDKs use theirs); {@link Tracing} makes OpenTelemetry's
   * sampler of it. {@code always_on}, {@code always_off} and {@code traceidratio} decide every
   * call alike; {@code parentbased_always_on} (the default), {@code parentbased_always_off} and
   * {@code parentbased_traceidratio} follow the sampled flag of the call's {@code traceparent}
   * and ask {@code root} only for a call without a valid one.
   *
   * @param parentBased whether a call with a parent follows its flag
   * @param root what decides the other calls
   * @param ratio {@code traceidratio}'s share of traces, from 0 to 1 ({@code OTEL_TRACES_SAMPLER_ARG})
   */
  record Sampling(boolean parentBased, Root root, double ratio) {
    enum Root { ALWAYS_ON, ALWAYS_OFF, TRACE_ID_RATIO }

    /** {@code parentbased_always_on}: OpenTelemetry's default. */
    static final Sampling DEFAULT = new Sampling(true, Root.ALWAYS_ON, 1.0);
  }

  /** What a log line says for a collector URL it cannot take apart. */
  static final String MALFORMED_URL = "(its URL is malformed)";

  /** The OTLP/HTTP traces URL {@code env} names, or null: tracing is off. */
  static String tracesEndpoint(Map<String, String> env) {
    if ("true".equals(env.getOrDefault(SDK_DISABLED_ENV, "").strip().toLowerCase(Locale.ROOT))) return null;
    String traces = env.getOrDefault(OTLP_TRACES_ENDPOINT_ENV, "").strip();
    if (!traces.isEmpty()) return traces; // the signal-specific variable is the full URL (OTel spec)
    String base = env.getOrDefault(OTLP_ENDPOINT_ENV, "").strip();
    if (base.isEmpty()) return null;
    return base.replaceFirst("/+$", "") + "/v1/traces";
  }

  /**
   * The settings {@code env} asks for, or null when it names no endpoint (tracing off: nothing
   * else is read). {@code warn} gets one line per value ignored.
   */
  static OtlpSettings fromEnv(Map<String, String> env, String pluginId, Consumer<String> warn) {
    String endpoint = tracesEndpoint(env);
    if (endpoint == null) return null;
    Map<String, String> resource = pairs(env, RESOURCE_ATTRIBUTES_ENV, warn);
    String service = env.getOrDefault(SERVICE_NAME_ENV, "").strip();
    if (service.isEmpty()) service = resource.getOrDefault("service.name", "");
    if (service.isEmpty()) service = pluginId;
    checkProtocol(env, collectorShown(endpoint), warn);
    String compression = traces(env, "COMPRESSION");
    if (compression != null) {
      compression = compression.strip().toLowerCase(Locale.ROOT);
      if (!compression.equals("gzip") && !compression.equals("none")) {
        warn.accept(tracesName(env, "COMPRESSION") + " must be gzip or none; sending uncompressed");
        compression = null;
      }
    }
    Map<String, String> headers = headers(env, warn);
    String basic = basicAuthorization(endpoint);
    if (basic != null && headers.keySet().stream().noneMatch("authorization"::equalsIgnoreCase)) {
      Map<String, String> withBasic = new LinkedHashMap<>(headers);
      withBasic.put("Authorization", basic);
      headers = Map.copyOf(withBasic);
    }
    return new OtlpSettings(
        withoutUserinfo(endpoint),
        collectorShown(endpoint),
        headers,
        whole(env, tracesName(env, "TIMEOUT"), 0, Long.MAX_VALUE, warn),
        compression,
        file(env, "CERTIFICATE"),
        file(env, "CLIENT_KEY"),
        file(env, "CLIENT_CERTIFICATE"),
        service,
        resource,
        whole(env, "OTEL_BSP_SCHEDULE_DELAY", 0, Long.MAX_VALUE, warn),
        whole(env, "OTEL_BSP_EXPORT_TIMEOUT", 0, Long.MAX_VALUE, warn),
        intOrNull(whole(env, "OTEL_BSP_MAX_QUEUE_SIZE", 1, Integer.MAX_VALUE, warn)),
        intOrNull(whole(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 1, Integer.MAX_VALUE, warn)),
        sampling(env, warn));
  }

  /** Says so when {@code OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL} asks for another than http/protobuf. */
  private static void checkProtocol(Map<String, String> env, String collectorShown, Consumer<String> warn) {
    String protocol = traces(env, "PROTOCOL");
    if (protocol == null || protocol.strip().equals(HTTP_PROTOBUF)) return;
    warn.accept(tracesName(env, "PROTOCOL") + " is " + quoted(protocol.strip()) + ", but this SDK sends spans as "
        + HTTP_PROTOBUF + " only (OTLP over HTTP); sending them so to " + collectorShown);
  }

  /**
   * The sampler {@code OTEL_TRACES_SAMPLER} and {@code _ARG} name: an unknown one is
   * {@code parentbased_always_on} and an argument that is no ratio from 0 to 1 is 1.0, each with
   * a warning, as OpenTelemetry's Go and Python SDKs take them. An unset argument is 1.0.
   */
  static Sampling sampling(Map<String, String> env, Consumer<String> warn) {
    String name = env.getOrDefault(SAMPLER_ENV, "").strip().toLowerCase(Locale.ROOT);
    Sampling.Root root;
    boolean parentBased = name.startsWith("parentbased_");
    switch (name) {
      case "", "parentbased_always_on", "always_on" -> root = Sampling.Root.ALWAYS_ON;
      case "always_off", "parentbased_always_off" -> root = Sampling.Root.ALWAYS_OFF;
      case "traceidratio", "parentbased_traceidratio" -> root = Sampling.Root.TRACE_ID_RATIO;
      default -> {
        warn.accept(SAMPLER_ENV + " must be always_on, always_off, traceidratio, parentbased_always_on,"
            + " parentbased_always_off or parentbased_traceidratio, not " + quoted(name)
            + "; using parentbased_always_on");
        return Sampling.DEFAULT;
      }
    }
    if (name.isEmpty()) return Sampling.DEFAULT;
    double ratio = 1.0;
    if (root == Sampling.Root.TRACE_ID_RATIO) {
      String arg = env.getOrDefault(SAMPLER_ARG_ENV, "").strip();
      if (!arg.isEmpty()) {
        // A decimal number as the other SDKs parse one: not Java's "1d", "0x1p-1" or "NaN".
        ratio = DECIMAL.matcher(arg).matches() ? Double.parseDouble(arg) : Double.NaN;
        if (!(ratio >= 0.0 && ratio <= 1.0)) { // NaN too
          warn.accept(SAMPLER_ARG_ENV + " must be a ratio from 0 to 1, not " + quoted(arg) + "; using 1.0");
          ratio = 1.0;
        }
      }
    }
    return new Sampling(parentBased, root, ratio);
  }

  private static final Pattern DECIMAL = Pattern.compile("[+-]?(\\d+\\.?\\d*|\\.\\d+)([eE][+-]?\\d+)?");

  /** {@code text} as a warning quotes a value that is no secret: cut to 40, control characters as {@code ?}. */
  private static String quoted(String text) {
    String shown = text.length() > 40 ? text.substring(0, 40) + "…" : text;
    return "'" + shown.replaceAll("\\p{Cntrl}", "?") + "'";
  }

  /** Neither the URL nor the headers: they may hold credentials. */
  @Override
  public String toString() {
    return "OtlpSettings[collector=" + collectorShown + ", headers=" + headers.size() + ", service=" + serviceName
        + ", sampling=" + sampling + "]";
  }

  /**
   * {@code url} as a log line may name it: {@code scheme://host:port}. A password in it, its path
   * and its query stay out ({@link #MALFORMED_URL} when it has no host to show).
   */
  static String collectorShown(String url) {
    URI uri;
    try {
      uri = new URI(url.strip());
    } catch (URISyntaxException malformed) {
      return MALFORMED_URL;
    }
    // A host URI cannot parse (an underscore, say) leaves the whole authority, userinfo and
    // all, to getAuthority(): nothing of it is shown then.
    if (uri.getScheme() == null || uri.getHost() == null) return MALFORMED_URL;
    return uri.getScheme().toLowerCase(Locale.ROOT) + "://" + uri.getHost() + (uri.getPort() >= 0 ? ":" + uri.getPort() : "");
  }

  /** Where {@code url}'s authority ends: at its path, query or fragment, or the end. */
  private static int authorityEnd(String url, int start) {
    int end = url.length();
    for (char c : new char[] {'/', '?', '#'}) {
      int at = url.indexOf(c, start);
      if (at >= 0 && at < end) end = at;
    }
    return end;
  }

  /**
   * {@code url} without the user and password of its authority (up to its last {@code @}), as
   * written otherwise; {@code url} when it has none.
   */
  static String withoutUserinfo(String url) {
    int start = url.indexOf("://");
    if (start < 0) return url;
    start += 3;
    int at = url.lastIndexOf('@', authorityEnd(url, start) - 1);
    return at < start ? url : url.substring(0, start) + url.substring(at + 1);
  }

  /**
   * {@code url}'s user and password (percent-decoded) as an {@code Authorization: Basic} value,
   * as the other SDKs send them; null when it has none, or when one decodes to no UTF-8 text.
   */
  static String basicAuthorization(String url) {
    int start = url.indexOf("://");
    if (start < 0) return null;
    start += 3;
    int at = url.lastIndexOf('@', authorityEnd(url, start) - 1);
    if (at <= start) return null; // none, or an empty one
    String userinfo = url.substring(start, at);
    int colon = userinfo.indexOf(':');
    String user = percentDecoded(colon < 0 ? userinfo : userinfo.substring(0, colon));
    String password = percentDecoded(colon < 0 ? "" : userinfo.substring(colon + 1));
    if (user == null || password == null) return null;
    return "Basic " + Base64.getEncoder().encodeToString((user + ":" + password).getBytes(StandardCharsets.UTF_8));
  }

  /** The variable of {@code suffix} the exporter goes by: {@code _TRACES_} when set, else the general one. */
  private static String tracesName(Map<String, String> env, String suffix) {
    String traces = "OTEL_EXPORTER_OTLP_TRACES_" + suffix;
    return env.getOrDefault(traces, "").isBlank() ? "OTEL_EXPORTER_OTLP_" + suffix : traces;
  }

  /** The value of {@link #tracesName}, or null when neither is set. */
  private static String traces(Map<String, String> env, String suffix) {
    String value = env.getOrDefault(tracesName(env, suffix), "");
    return value.isBlank() ? null : value;
  }

  private static String file(Map<String, String> env, String suffix) {
    String path = traces(env, suffix);
    return path == null ? null : path.strip();
  }

  /** An HTTP header's name: a token. */
  private static final Pattern HEADER_NAME = Pattern.compile("[!#$%&'*+\\-.^_`|~0-9A-Za-z]+");
  /** What a header's value may hold once decoded: printable ASCII and tabs, as every SDK takes it. */
  private static final Pattern HEADER_VALUE = Pattern.compile("[\\x20-\\x7e\\t]*");

  /**
   * The exporter's headers: {@code OTEL_EXPORTER_OTLP_TRACES_HEADERS} when set, else the general one.
   * An entry whose name is no token, or whose value decodes to a control character (a CR LF that
   * would end the header), is left out with one warning naming the variable: given to the
   * exporter, the JDK's client refused every request with it, and no span was sent.
   */
  private static Map<String, String> headers(Map<String, String> env, Consumer<String> warn) {
    String name = tracesName(env, "HEADERS");
    Map<String, String> headers = new LinkedHashMap<>(pairs(env, name, warn));
    int before = headers.size();
    headers.entrySet().removeIf(header ->
        !HEADER_NAME.matcher(header.getKey()).matches() || !HEADER_VALUE.matcher(header.getValue()).matches());
    int unusable = before - headers.size();
    if (unusable > 0) {
      warn.accept(name + ": " + unusable + (unusable == 1 ? " header has" : " headers have")
          + " a name that is no token or a value holding a control character (CR, LF, NUL...) once decoded;"
          + " left out");
    }
    return Map.copyOf(headers);
  }

  /**
   * {@code key=value} pairs separated by commas (headers, resource attributes), keys trimmed,
   * values trimmed and percent-decoded ({@code %20}; a {@code +} stays a plus). An entry without
   * {@code =} or a key, or with a broken escape, is left out, with one warning for the variable
   * that names neither the entry nor its value.
   */
  static Map<String, String> pairs(Map<String, String> env, String name, Consumer<String> warn) {
    Map<String, String> found = new LinkedHashMap<>();
    String text = env.getOrDefault(name, "");
    int skipped = 0;
    for (String entry : text.split(",", -1)) {
      if (entry.isBlank()) continue;
      int equals = entry.indexOf('=');
      String key = equals < 0 ? "" : entry.substring(0, equals).strip();
      String value = equals < 0 ? null : percentDecoded(entry.substring(equals + 1).strip());
      if (key.isEmpty() || value == null) {
        skipped++;
        continue;
      }
      found.put(key, value);
    }
    if (skipped > 0) {
      warn.accept(name + ": " + skipped + (skipped == 1 ? " entry is" : " entries are")
          + " not key=value with a valid percent-encoding; left out");
    }
    return Map.copyOf(found);
  }

  /** {@code text} with its {@code %XX} escapes decoded as UTF-8; null when one is broken. */
  static String percentDecoded(String text) {
    if (text.indexOf('%') < 0) return text;
    ByteArrayOutputStream bytes = new ByteArrayOutputStream(text.length());
    for (int i = 0; i < text.length(); ) {
      char c = text.charAt(i);
      if (c != '%') {
        int end = text.offsetByCodePoints(i, 1);
        bytes.writeBytes(text.substring(i, end).getBytes(StandardCharsets.UTF_8));
        i = end;
        continue;
      }
      if (i + 2 >= text.length()) return null; // a '%' without two digits after it
      char high = text.charAt(i + 1);
      char low = text.charAt(i + 2);
      if (!HexFormat.isHexDigit(high) || !HexFormat.isHexDigit(low)) return null;
      bytes.write(HexFormat.fromHexDigit(high) * 16 + HexFormat.fromHexDigit(low));
      i += 3;
    }
    try {
      return StandardCharsets.UTF_8.newDecoder()
          .onMalformedInput(CodingErrorAction.REPORT)
          .onUnmappableCharacter(CodingErrorAction.REPORT)
          .decode(ByteBuffer.wrap(bytes.toByteArray()))
          .toString();
    } catch (CharacterCodingException notUtf8) {
      return null;
    }
  }

  /**
   * The whole number {@code name} holds, from {@code min} to {@code max}; null when unset, or
   * when malformed (with a warning: these hold numbers, never credentials, so it quotes them).
   */
  private static Long whole(Map<String, String> env, String name, long min, long max, Consumer<String> warn) {
    String text = env.getOrDefault(name, "").strip();
    if (text.isEmpty()) return null;
    if (text.chars().allMatch(c -> c >= '0' && c <= '9') && text.length() <= 18) {
      long value = Long.parseLong(text);
      if (value >= min && value <= max) return value;
    }
    String rule = max == Long.MAX_VALUE ? " of milliseconds, " + min + " or more" : " from " + min + " to " + max;
    warn.accept(name + " must be a whole number" + rule + ", not " + quoted(text) + "; using the default");
    return null;
  }

  private static Integer intOrNull(Long value) {
    return value == null ? null : Math.toIntExact(value);
  }
}
