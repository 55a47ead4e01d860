package dev.linchkit.plugin.sdk;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.gson.JsonParser;
import com.google.protobuf.ByteString;
import java.nio.charset.StandardCharsets;
import org.junit.jupiter.api.Test;

class WireJsonTest {
  private static String deep(int n) {
    return "[".repeat(n) + "]".repeat(n);
  }

  private static String refusal(byte[] raw) {
    PluginException error = assertThrows(PluginException.class, () -> WireJson.decode(ByteString.copyFrom(raw), "params"));
    assertEquals("invalid_params", error.type());
    return error.getMessage();
  }

  private static String refusal(String text) {
    return refusal(text.getBytes(StandardCharsets.UTF_8));
  }

  @Test
  void valuesEverySdkHoldsAreRead() throws Exception {
    for (String text : new String[] {
        "{\"a\": [1, 2.5e3, -0.0, \"\\ud83d\\ude00\", \"\\\"[{\"]}", deep(WireJson.MAX_DEPTH), "1.7976931348623157e308"}) {
      assertEquals(JsonParser.parseString(text), WireJson.decode(ByteString.copyFromUtf8(text), "params"));
    }
  }

  @Test
  void whatOtherSdksCannotHoldIsInvalidParams() {
    assertTrue(refusal(deep(WireJson.MAX_DEPTH + 1)).contains("nested deeper than 250"));
    assertTrue(refusal(deep(100_000)).contains("nested deeper than 250"));
    assertTrue(refusal("1e400").contains("beyond the range of a double"));
    assertTrue(refusal("9".repeat(5000)).contains("beyond the range of a double"));
    assertTrue(refusal("\"\\ud800\"").contains("lone surrogate"));
    assertTrue(refusal("[\"\\udc00\"]").contains("lone surrogate"));
    assertTrue(refusal(new byte[] {'"', (byte) 0xff, '"'}).contains("not UTF-8"));
    assertTrue(refusal("{nope").contains("not valid JSON"));
    assertTrue(refusal("1 2").contains("not valid JSON"));
  }

  @Test
  void aLongMethodNameIsCutAndEscaped() {
    assertTrue(WireJson.shownName("x".repeat(10_000)).length() < 80);
    assertEquals("\"a\\u0000\\nb\"", WireJson.shownName("a\u0000\nb"));
  }

  @Test
  void aBareNameIsTheShownOneWithoutItsQuotes() {
    assertEquals("config", WireJson.bareName("config"));
    assertEquals("a\\u0000\\nb", WireJson.bareName("a\u0000\nb"));
    assertEquals("x".repeat(64) + "…", WireJson.bareName("x".repeat(10_000)));
  }
}
