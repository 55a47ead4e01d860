package dev.linchkit.plugin.example;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.gson.Gson;
import com.google.gson.JsonParser;
import dev.linchkit.plugin.sdk.Params;
import dev.linchkit.plugin.sdk.Plugin;
import dev.linchkit.plugin.sdk.PluginException;
import java.util.List;
import java.util.Map;
import org.junit.jupiter.api.Test;

class ExamplePluginTest {
  @Test
  void digestHashesThePreviousDigestEachRound() throws Exception {
    assertEquals("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", ExamplePlugin.digest("abc", 1));
    assertEquals("4f8b42c22dd3729b519ba6f68d2da7cc5b2d606d05daed5ad5128cc03e6c6358", ExamplePlugin.digest("abc", 2));
  }

  @Test
  void padIsThatManyLettersXAndNoneWhenAbsent() throws Exception {
    assertEquals("", ExamplePlugin.pad(new Params(JsonParser.parseString("{\"n\":1}"), "count")));
    assertEquals("", ExamplePlugin.pad(new Params(JsonParser.parseString("{\"pad\":0}"), "count")));
    assertEquals("xxx", ExamplePlugin.pad(new Params(JsonParser.parseString("{\"pad\":3}"), "count")));
    assertEquals("{\"i\":7,\"pad\":\"xxx\"}", new Gson().toJson(ExamplePlugin.chunk(7, "xxx")));
  }

  @Test
  void padPast64MibIsInvalidParamsNamingTheBound() {
    for (long pad : new long[] {(64L << 20) + 1, 1L << 40}) {
      PluginException refused = assertThrows(PluginException.class,
          () -> ExamplePlugin.pad(params("{\"pad\":" + pad + "}")), "pad " + pad);
      assertEquals("invalid_params", refused.type());
      assertEquals("pad must be at most 67108864 (64 MiB), got " + pad, refused.getMessage());
    }
  }

  @Test
  void countOfAMillionIsTakenAndPastItIsInvalidParamsNamingTheBound() throws Exception {
    assertEquals(1_000_000, ExamplePlugin.count(params("{\"n\":1000000}")));
    for (long n : new long[] {1_000_001, 1L << 40}) {
      PluginException refused = assertThrows(PluginException.class,
          () -> ExamplePlugin.count(params("{\"n\":" + n + "}")), "n " + n);
      assertEquals("invalid_params", refused.type());
      assertEquals("n must be at most 1000000, got " + n, refused.getMessage());
    }
  }

  private static Params params(String json) throws PluginException {
    return new Params(JsonParser.parseString(json), "count");
  }

  @Test
  void nonFiniteNamesNanOrAnInfinityAndAnythingElseIsInvalidParamsNamingValue() throws Exception {
    assertTrue(Double.isNaN(ExamplePlugin.nonFinite(new Params(JsonParser.parseString("{\"value\":\"nan\"}"), "non_finite"))));
    assertEquals(Double.POSITIVE_INFINITY,
        ExamplePlugin.nonFinite(new Params(JsonParser.parseString("{\"value\":\"inf\"}"), "non_finite")));
    assertEquals(Double.NEGATIVE_INFINITY,
        ExamplePlugin.nonFinite(new Params(JsonParser.parseString("{\"value\":\"-inf\"}"), "non_finite")));
    for (String params : new String[] {"{}", "{\"value\":\"NaN\"}", "{\"value\":1}", "{\"value\":null}"}) {
      PluginException refused = assertThrows(PluginException.class,
          () -> ExamplePlugin.nonFinite(new Params(JsonParser.parseString(params), "non_finite")), params);
      assertEquals("invalid_params", refused.type(), params);
      assertTrue(refused.getMessage().contains("'value'"), refused.getMessage());
    }
  }

  @Test
  void notUnicodeReturnsHalfAnEmojiALoneSurrogate() {
    String text = ExamplePlugin.notUnicode().get("text");
    assertEquals("smile \uD83D", text);
    assertTrue(Character.isHighSurrogate(text.charAt(text.length() - 1)));
    assertEquals(Map.of("text", "smile \uD83D"), ExamplePlugin.notUnicode());
  }

  @Test
  void theExampleDescribesEveryMethodOfDocsProtocol() {
    List<String> methods = ExamplePlugin.plugin().describe().stream().map(Plugin.MethodInfo::name).toList();
    assertEquals(List.of("echo", "digest", "fail", "sleep", "count", "emit", "non_finite", "not_unicode", "config", "hooks"),
        methods);
  }

  @Test
  void padThatIsNoNonNegativeIntegerIsInvalidParams() {
    for (String pad : new String[] {"-1", "1.5", "\"3\"", "null", "true", "[3]"}) {
      PluginException refused = assertThrows(PluginException.class,
          () -> ExamplePlugin.pad(new Params(JsonParser.parseString("{\"pad\":" + pad + "}"), "emit")), pad);
      assertEquals("invalid_params", refused.type(), pad);
    }
  }
}
