package dev.linchkit.plugin.sdk;

import com.google.gson.JsonElement;
import com.google.gson.JsonNull;
import com.google.gson.JsonParseException;
import com.google.gson.JsonParser;
import com.google.gson.JsonPrimitive;
import com.google.gson.Strictness;
import com.google.gson.stream.JsonReader;
import com.google.protobuf.ByteString;
import java.io.StringReader;

/**
 * JSON from the wire (params, config, event data), read so that every SDK holds the same
 * values (docs/protocol.md, "gRPC binding").
 *
 * <p>{@code JsonParser.parseString} is lenient and {@code toStringUtf8} replaces what is not
 * UTF-8: bytes that were not JSON, or not UTF-8, became U+FFFD strings and the call ran; a lone
 * surrogate escape ({@code "\ud800"}) came back as {@code "?"}; an integer of 5,000 digits
 * came back as a string. Now each of those, a number beyond a double (1e400) and nesting
 * deeper than {@link #MAX_DEPTH} are {@code invalid_params}, and the message never quotes
 * the value.
 */
final class WireJson {
  /** Deeper params are invalid_params in every SDK; the dispatcher writes at most 254. */
  static final int MAX_DEPTH = 250;

  private WireJson() {}

  /** JSON bytes to a value; empty bytes are JSON null. */
  static JsonElement decode(ByteString bytes, String what) throws PluginException {
    if (bytes.isEmpty()) return JsonNull.INSTANCE;
    if (!bytes.isValidUtf8()) throw PluginException.invalidParams(what + " is not UTF-8");
    String text = bytes.toStringUtf8();
    String why = unusable(text);
    if (why != null) throw PluginException.invalidParams(what + " " + why);
    JsonReader reader = new JsonReader(new StringReader(text));
    reader.setStrictness(Strictness.STRICT);
    reader.setNestingLimit(MAX_DEPTH);
    try {
      JsonElement value = JsonParser.parseReader(reader);
      if (reader.peek() != com.google.gson.stream.JsonToken.END_DOCUMENT) {
        throw new JsonParseException("more than one JSON value");
      }
      return value;
    } catch (JsonParseException | java.io.IOException | IllegalStateException error) {
      throw PluginException.invalidParams(what + " is not valid JSON");
    }
  }

  /**
   * Why {@code text} holds what JSON parsers of other languages cannot (nesting past the
   * limit, a number beyond a double, a lone surrogate escape), or null. One pass, no
   * recursion, before Gson sees it.
   */
  static String unusable(String text) {
    return unusable(text, MAX_DEPTH);
  }

  /** {@link #unusable(String)} with nesting past {@code maxDepth} refused. */
  static String unusable(String text, int maxDepth) {
    int depth = 0;
    int n = text.length();
    for (int i = 0; i < n; i++) {
      char c = text.charAt(i);
      if (c == '"') {
        for (i++; i < n && text.charAt(i) != '"'; i++) {
          if (text.charAt(i) != '\\') continue;
          if (i + 5 < n && text.charAt(i + 1) == 'u') {
            int unit = hex4(text, i + 2);
            if (unit >= 0xDC00 && unit <= 0xDFFF) return LONE;
            if (unit >= 0xD800 && unit <= 0xDBFF) {
              boolean paired = i + 11 < n && text.charAt(i + 6) == '\\' && text.charAt(i + 7) == 'u'
                  && hex4(text, i + 8) >= 0xDC00 && hex4(text, i + 8) <= 0xDFFF;
              if (!paired) return LONE;
              i += 6;
            }
            i += 5;
          } else {
            i++;
          }
        }
      } else if (c == '[' || c == '{') {
        if (++depth > maxDepth) return "is nested deeper than " + maxDepth + " levels";
      } else if (c == ']' || c == '}') {
        depth--;
      } else if (c == '-' || (c >= '0' && c <= '9')) {
        int end = i + 1;
        while (end < n && "0123456789+-.eE".indexOf(text.charAt(end)) >= 0) end++;
        String number = text.substring(i, end);
        // Only an exponent or over 300 digits can pass a double's range.
        if (number.length() > 300 || number.indexOf('e') >= 0 || number.indexOf('E') >= 0) {
          try {
            if (Double.isInfinite(Double.parseDouble(number))) return "holds a number beyond the range of a double";
          } catch (NumberFormatException notANumber) {
            // Gson says so
          }
        }
        i = end - 1;
      }
    }
    return null;
  }

  private static final String LONE = "holds a lone surrogate escape (\\ud800-\\udfff), which names no character";

  private static int hex4(String text, int i) {
    if (i + 4 > text.length()) return -1;
    try {
      return Integer.parseInt(text.substring(i, i + 4), 16);
    } catch (NumberFormatException notHex) {
      return -1;
    }
  }

  /**
   * A caller's method name as an error message shows it: JSON-quoted (a NUL or a newline
   * escaped) and cut to 64 characters, so a 10,000-character name is not sent back whole.
   */
  static String shownName(String name) {
    if (name.length() <= 64) return new JsonPrimitive(name).toString();
    int cut = Character.isHighSurrogate(name.charAt(63)) ? 63 : 64;
    return new JsonPrimitive(name.substring(0, cut)).toString() + "…";
  }

  /**
   * {@link #shownName} without its quotes, escaped and cut alike: how the WebSocket binding's
   * refusals of a message over the host's cap name a method or an event ({@code the result of
   * config is …}), as every SDK's do.
   */
  static String bareName(String name) {
    String shown = shownName(name);
    return shown.endsWith("…")
        ? shown.substring(1, shown.length() - 2) + "…"
        : shown.substring(1, shown.length() - 1);
  }
}
