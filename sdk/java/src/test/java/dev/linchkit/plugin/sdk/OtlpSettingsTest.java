package dev.linchkit.plugin.sdk;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Base64;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import org.junit.jupiter.api.Test;

/** Reading the standard OpenTelemetry variables: the endpoint, and what a log line may show of it. */
class OtlpSettingsTest {
  private static final String SECRET = "s3cret-collector-token";

  private final List<String> warnings = new ArrayList<>();

  private OtlpSettings settings(Map<String, String> env) {
    return OtlpSettings.fromEnv(env, "example", warnings::add);
  }

  @Test
  void theTracesEndpointIsTheSignalsUrlOrTheBaseWithV1Traces() {
    assertEquals("http://collector:4318/v1/traces",
        OtlpSettings.tracesEndpoint(Map.of("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")));
    assertEquals("http://collector:4318/v1/traces",
        OtlpSettings.tracesEndpoint(Map.of("OTEL_EXPORTER_OTLP_ENDPOINT", " http://collector:4318 ")));
    assertEquals("http://b:9/traces", OtlpSettings.tracesEndpoint(Map.of(
        "OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4318", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://b:9/traces")));
    assertNull(OtlpSettings.tracesEndpoint(Map.of()));
    assertNull(OtlpSettings.tracesEndpoint(Map.of("OTEL_EXPORTER_OTLP_ENDPOINT", "  ")));
    assertNull(OtlpSettings.tracesEndpoint(Map.of(
        "OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4318", "OTEL_SDK_DISABLED", "TRUE")));
  }

  @Test
  void withoutAnEndpointNothingElseIsRead() {
    assertNull(settings(Map.of("OTEL_BSP_SCHEDULE_DELAY", "soon", "OTEL_EXPORTER_OTLP_HEADERS", "broken")));
    assertEquals(List.of(), warnings);
  }

  @Test
  void theCollectorIsShownBySchemeHostAndPortOnly() {
    assertEquals("http://127.0.0.1:4318",
        OtlpSettings.collectorShown("http://collector:" + SECRET + "@127.0.0.1:4318/v1/traces?token=" + SECRET));
    assertEquals("https://collector.example", OtlpSettings.collectorShown("HTTPS://user@collector.example/v1/traces"));
    assertEquals("http://[::1]:4318", OtlpSettings.collectorShown("http://[::1]:4318/v1/traces"));
    for (String malformed : new String[] {
        "http://collector:" + SECRET + "@ho_st:4318/v1/traces", // no host URI can parse: the authority, password and all
        "http://collector:" + SECRET + " @127.0.0.1/", // not a URI at all
        "collector:" + SECRET, // no host
        "",
    }) {
      String shown = OtlpSettings.collectorShown(malformed);
      assertEquals(OtlpSettings.MALFORMED_URL, shown, malformed);
    }
  }

  @Test
  void theUrlsUserAndPasswordAreSentAsBasicAuthenticationAndGivenToNoExporter() {
    OtlpSettings read = settings(Map.of("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "http://us%3Aer:p%40ss:" + SECRET + "@127.0.0.1:4318/v1/traces?key=k@y"));
    String basic = "Basic " + Base64.getEncoder().encodeToString(
        ("us:er:p@ss:" + SECRET).getBytes(StandardCharsets.UTF_8));
    assertEquals(Map.of("Authorization", basic), read.headers());
    assertEquals("http://127.0.0.1:4318/v1/traces?key=k@y", read.endpoint(), "the query stays as written");
    assertEquals("http://127.0.0.1:4318", read.collectorShown());
    assertFalse(read.toString().contains(SECRET), read.toString());
    assertEquals(List.of(), warnings);
    // A user alone is sent with an empty password, as the other SDKs send it.
    assertEquals(Map.of("Authorization", "Basic " + Base64.getEncoder().encodeToString("user:".getBytes(StandardCharsets.UTF_8))),
        settings(Map.of("OTEL_EXPORTER_OTLP_ENDPOINT", "https://user@collector.example")).headers());
    // The headers variable's authorization wins, whatever its case; the URL is still given without the password.
    OtlpSettings own = settings(Map.of(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://collector:" + SECRET + "@127.0.0.1:4318/v1/traces",
        "OTEL_EXPORTER_OTLP_HEADERS", "AUTHORIZATION=Bearer%20mine"));
    assertEquals(Map.of("AUTHORIZATION", "Bearer mine"), own.headers());
    assertEquals("http://127.0.0.1:4318/v1/traces", own.endpoint());
    // None, or an empty one: nothing is sent, the URL is as written but for the '@'.
    assertEquals(Map.of(), settings(Map.of("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")).headers());
    assertEquals(Map.of(), settings(Map.of("OTEL_EXPORTER_OTLP_ENDPOINT", "http://@127.0.0.1:4318")).headers());
    assertEquals("http://127.0.0.1:4318/v1/traces?to=a@b",
        settings(Map.of("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:4318/v1/traces?to=a@b")).endpoint());
    // A password that decodes to no UTF-8 text is not sent, and not given to the exporter either.
    OtlpSettings broken = settings(Map.of("OTEL_EXPORTER_OTLP_ENDPOINT", "http://user:%ff" + SECRET + "@127.0.0.1:4318"));
    assertEquals(Map.of(), broken.headers());
    assertEquals("http://127.0.0.1:4318/v1/traces", broken.endpoint());
  }

  @Test
  void headersArePercentDecodedAndABrokenEntryIsLeftOutWithoutItsValue() {
    OtlpSettings read = settings(Map.of(
        "OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318",
        "OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer%20" + SECRET + ", x-tenant = a+b%2Cc ,"
            + SECRET + ",=nokey,x-broken=%zz" + SECRET + ",x-cut=%2"));
    assertEquals(Map.of("authorization", "Bearer " + SECRET, "x-tenant", "a+b,c"), read.headers());
    assertEquals(1, warnings.size(), warnings.toString());
    assertTrue(warnings.get(0).startsWith("OTEL_EXPORTER_OTLP_HEADERS: 4 entries are not key=value"), warnings.get(0));
    assertFalse(warnings.get(0).contains(SECRET), warnings.get(0));
    assertFalse(read.toString().contains(SECRET), read.toString());
  }

  @Test
  void aHeaderThatDecodesToAControlCharacterIsLeftOutWithoutItsValue() {
    // Before, the exporter was given it, and the JDK's client refused every request: no span sent.
    OtlpSettings read = settings(Map.of(
        "OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318",
        "OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer%20" + SECRET + "%0D%0AX-Injected:%201,"
            + "x-nul=a%00" + SECRET + ",x-ok=fine%09tabbed,bad name=" + SECRET));
    assertEquals(Map.of("x-ok", "fine\ttabbed"), read.headers());
    assertEquals(1, warnings.size(), warnings.toString());
    assertTrue(warnings.get(0).startsWith("OTEL_EXPORTER_OTLP_HEADERS: 3 headers have a name that is no token"),
        warnings.get(0));
    assertFalse(warnings.get(0).contains(SECRET), warnings.get(0));
  }

  @Test
  void theTracesVariablesWinOverTheGeneralOnes() {
    Map<String, String> env = new HashMap<>(Map.of(
        "OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318",
        "OTEL_EXPORTER_OTLP_HEADERS", "a=general",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS", "b=traces",
        "OTEL_EXPORTER_OTLP_TIMEOUT", "1000",
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "2500",
        "OTEL_EXPORTER_OTLP_COMPRESSION", "gzip",
        "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "NONE"));
    OtlpSettings read = settings(env);
    assertEquals(Map.of("b", "traces"), read.headers());
    assertEquals(2500L, read.timeoutMs());
    assertEquals("none", read.compression());
    assertEquals(List.of(), warnings);
  }

  @Test
  void aMalformedNumberKeepsTheDefaultWithAWarningNamingTheVariable() {
    OtlpSettings read = settings(Map.of(
        "OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318",
        "OTEL_BSP_SCHEDULE_DELAY", "50",
        "OTEL_BSP_EXPORT_TIMEOUT", "5s",
        "OTEL_BSP_MAX_QUEUE_SIZE", "0",
        "OTEL_EXPORTER_OTLP_COMPRESSION", "brotli"));
    assertEquals(50L, read.scheduleDelayMs());
    assertNull(read.exportTimeoutMs());
    assertNull(read.maxQueueSize());
    assertNull(read.compression());
    assertEquals(3, warnings.size(), warnings.toString());
    assertTrue(warnings.stream().anyMatch(line -> line.startsWith("OTEL_BSP_EXPORT_TIMEOUT must be")), warnings.toString());
    assertTrue(warnings.stream().anyMatch(line -> line.startsWith("OTEL_BSP_MAX_QUEUE_SIZE must be")), warnings.toString());
    assertTrue(warnings.stream().anyMatch(line -> line.startsWith("OTEL_EXPORTER_OTLP_COMPRESSION must be")), warnings.toString());
  }

  @Test
  void theServiceNameIsTheVariablesThenTheResourcesThenThePluginId() {
    String endpoint = "http://collector:4318";
    assertEquals("example", settings(Map.of("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)).serviceName());
    assertEquals("from-resource", settings(Map.of("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint,
        "OTEL_RESOURCE_ATTRIBUTES", "service.name=from-resource,deployment.environment=test")).serviceName());
    assertEquals("named", settings(Map.of("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint, "OTEL_SERVICE_NAME", "named",
        "OTEL_RESOURCE_ATTRIBUTES", "service.name=from-resource")).serviceName());
  }

  private OtlpSettings.Sampling sampling(String sampler, String arg) {
    Map<String, String> env = new HashMap<>(Map.of("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"));
    if (sampler != null) env.put("OTEL_TRACES_SAMPLER", sampler);
    if (arg != null) env.put("OTEL_TRACES_SAMPLER_ARG", arg);
    return settings(env).sampling();
  }

  @Test
  void theSamplerIsReadAsOpenTelemetryReadsIt() {
    OtlpSettings.Sampling.Root on = OtlpSettings.Sampling.Root.ALWAYS_ON;
    OtlpSettings.Sampling.Root off = OtlpSettings.Sampling.Root.ALWAYS_OFF;
    OtlpSettings.Sampling.Root ratio = OtlpSettings.Sampling.Root.TRACE_ID_RATIO;
    assertEquals(OtlpSettings.Sampling.DEFAULT, sampling(null, "0.5"));
    assertEquals(new OtlpSettings.Sampling(true, on, 1.0), OtlpSettings.Sampling.DEFAULT);
    assertEquals(new OtlpSettings.Sampling(false, on, 1.0), sampling("always_on", null));
    assertEquals(new OtlpSettings.Sampling(false, off, 1.0), sampling(" ALWAYS_OFF ", null));
    assertEquals(new OtlpSettings.Sampling(false, ratio, 0.0), sampling("traceidratio", "0"));
    assertEquals(new OtlpSettings.Sampling(false, ratio, 1.0), sampling("traceidratio", null));
    assertEquals(new OtlpSettings.Sampling(false, ratio, 0.25), sampling("traceidratio", " 2.5e-1 "));
    assertEquals(new OtlpSettings.Sampling(true, on, 1.0), sampling("parentbased_always_on", null));
    assertEquals(new OtlpSettings.Sampling(true, off, 1.0), sampling("parentbased_always_off", null));
    assertEquals(new OtlpSettings.Sampling(true, ratio, 0.5), sampling("parentbased_traceidratio", ".5"));
    assertEquals(List.of(), warnings);
  }

  @Test
  void anUnknownSamplerIsParentBasedAlwaysOnWithAWarning() {
    assertEquals(OtlpSettings.Sampling.DEFAULT, sampling("sometimes\n", null));
    assertEquals(List.of("OTEL_TRACES_SAMPLER must be always_on, always_off, traceidratio, parentbased_always_on,"
        + " parentbased_always_off or parentbased_traceidratio, not 'sometimes'; using parentbased_always_on"), warnings);
  }

  @Test
  void anArgumentThatIsNoRatioIsOneWithAWarning() {
    for (String arg : new String[] {"lots", "1.5", "-0.1", "NaN", "Infinity", "1d", "0x1p-1"}) {
      warnings.clear();
      assertEquals(new OtlpSettings.Sampling(true, OtlpSettings.Sampling.Root.TRACE_ID_RATIO, 1.0),
          sampling("parentbased_traceidratio", arg), arg);
      assertEquals(List.of("OTEL_TRACES_SAMPLER_ARG must be a ratio from 0 to 1, not '" + arg + "'; using 1.0"),
          warnings, arg);
    }
    warnings.clear();
    sampling("always_off", "lots");
    assertEquals(List.of(), warnings, "only a ratio sampler reads the argument");
  }

  @Test
  void aProtocolOtherThanHttpProtobufIsSaidOnceAndSpansGoAsHttpProtobuf() {
    String endpoint = "http://collector:" + SECRET + "@127.0.0.1:4318";
    assertTrue(settings(Map.of("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")) != null);
    assertEquals(List.of(), warnings);
    settings(Map.of("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"));
    assertEquals(List.of("OTEL_EXPORTER_OTLP_PROTOCOL is 'grpc', but this SDK sends spans as http/protobuf only"
        + " (OTLP over HTTP); sending them so to http://127.0.0.1:4318"), warnings);
    warnings.clear();
    settings(Map.of("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"));
    assertEquals(1, warnings.size(), warnings.toString());
    assertTrue(warnings.get(0).startsWith("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL is 'http/json'"), warnings.get(0));
    assertFalse(warnings.get(0).contains(SECRET), warnings.get(0));
  }

  @Test
  void percentDecodingTakesUtf8AndRefusesWhatIsNot() {
    assertEquals("é x", OtlpSettings.percentDecoded("%C3%A9%20x"));
    assertEquals("a+b", OtlpSettings.percentDecoded("a+b"));
    assertNull(OtlpSettings.percentDecoded("%C3"), "half a character");
    assertNull(OtlpSettings.percentDecoded("%"), "an escape cut short");
    assertNull(OtlpSettings.percentDecoded("%\uff10\uff10"), "fullwidth digits are not hex digits");
  }
}
