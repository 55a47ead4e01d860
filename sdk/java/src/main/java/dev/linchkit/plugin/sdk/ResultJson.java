package dev.linchkit.plugin.sdk;

import com.google.gson.Gson;
import com.google.gson.JsonElement;
import com.google.gson.JsonNull;
import com.google.gson.Strictness;
import com.google.gson.TypeAdapter;
import com.google.gson.stream.JsonWriter;
import java.io.IOException;
import java.io.UncheckedIOException;
import java.io.Writer;
import java.util.Set;
import java.util.function.Supplier;

/**
 * JSON to the wire: what a plugin's method returned (a result, a chunk), the data it emitted, an
 * error's details, as text JSON can carry, or else {@code provider_error} "WHAT is not JSON:
 * REASON" (docs/protocol.md).
 *
 * <p>JSON has no NaN or infinity. {@code JsonElement.toString()} writes them as bare tokens
 * ({@code {"x":NaN}}), which no host parses; until 2026-12-07 a result, a chunk, an event or a
 * WebSocket frame went out so. Here the same writer runs strict: it writes what {@code
 * toString()} writes, byte for byte and at the same cost, and refuses a non-finite number
 * instead, so the usual path checks nothing more.
 *
 * <p>JSON text is UTF-8, and a string holding a lone UTF-16 surrogate (half an emoji, cut at a
 * char index: {@code "smile 😀".substring(0, 7)}) has no UTF-8 form. Gson writes it raw, and
 * every encoding to UTF-8 on the way ({@code String.getBytes}, protobuf's string fields,
 * Netty's text frame) writes {@code '?'} for it: until 2026-12-08 the host got {@code "smile ?"}
 * as a good result, and nobody was told. Now such a text is refused as a NaN is: one scan of the
 * text Gson wrote, for a surrogate code unit not in a pair (Gson escapes no surrogate, so a
 * pair in a string is a pair in the text, and one alone stays alone). An error's message and
 * type get {@link #wellFormed} instead: refusing them would hide the error.
 */
final class ResultJson {
  /** What a method's result or chunk is called in the refusal. */
  static final String RESULT = "the plugin's result";

  /** The numbers Gson's writer names when it refuses them: short, and never the plugin's value. */
  private static final Set<String> NON_FINITE = Set.of("NaN", "Infinity", "-Infinity");

  private static final String REFUSED_PREFIX = "Numeric values must be finite, but was ";

  /** Why a text holding a lone surrogate is refused (docs/protocol.md, the same in every SDK). */
  static final String NOT_UNICODE = "a string is not valid Unicode (a lone surrogate)";

  /** Gson's own writer of a tree, the one {@code JsonElement.toString()} runs. */
  private static final TypeAdapter<JsonElement> TREES = new Gson().getAdapter(JsonElement.class);

  private ResultJson() {}

  /**
   * {@code value} (null: JSON null) as JSON text; {@code provider_error} "{@code what} is not
   * JSON: NaN is not a JSON number" (or Infinity, -Infinity) when it holds a number JSON has no
   * form for, "{@code what} is not JSON: a string is not valid Unicode (a lone surrogate)" when a
   * string (a value, an object's key, anywhere) holds a surrogate code unit not in a pair.
   */
  static String text(JsonElement value, String what) throws PluginException {
    return text(value, () -> what);
  }

  /** {@link #text(JsonElement, String)}, {@code what} named only when refused (an event's name, escaped). */
  static String text(JsonElement value, Supplier<String> what) throws PluginException {
    TextWriter text = new TextWriter();
    JsonWriter writer = new JsonWriter(text);
    writer.setStrictness(Strictness.STRICT);
    try {
      TREES.write(writer, value == null ? JsonNull.INSTANCE : value);
    } catch (IllegalArgumentException notJson) {
      throw PluginException.providerError(what.get() + " is not JSON: " + reason(notJson));
    } catch (IOException impossible) { // a TextWriter throws none
      throw new UncheckedIOException(impossible);
    }
    String written = text.toString();
    if (loneSurrogate(written) >= 0) throw PluginException.providerError(what.get() + " is not JSON: " + NOT_UNICODE);
    return written;
  }

  /**
   * Where the first surrogate code unit not in a pair (a high one followed by a low one) is in
   * {@code text}, or -1. One pass; the usual character costs one comparison, and only a
   * surrogate is looked at further. On Latin-1 text (the JDK stores it a byte a char, and no
   * char there is a surrogate) C2 drops the loop altogether; on other text it costs about 0.7
   * ns a char (0.7 ms for a 1 MB result, a sixth of its encoding), under C1 alone about 2 ns
   * (a third).
   */
  static int loneSurrogate(String text) {
    int n = text.length();
    for (int i = 0; i < n; i++) {
      char c = text.charAt(i);
      if (c < Character.MIN_SURROGATE || c > Character.MAX_SURROGATE) continue;
      if (c <= Character.MAX_HIGH_SURROGATE && i + 1 < n && Character.isLowSurrogate(text.charAt(i + 1))) {
        i++; // a pair: one character beyond the BMP, an emoji
        continue;
      }
      return i;
    }
    return -1;
  }

  /**
   * {@code text} with each surrogate code unit not in a pair replaced by U+FFFD, as a UTF-8
   * decoder replaces a byte it cannot read: {@code text} itself when it holds none (null: null).
   * For an error's message and type, which go with the error rather than hide it; encoded as
   * they are, each lone surrogate reached the host as {@code '?'}.
   */
  static String wellFormed(String text) {
    return replacingLone(text, false);
  }

  /**
   * {@code text} with each surrogate code unit not in a pair written as its escape ({@code
   * \\ud83d}): a name to show in a log line, where it would print as {@code '?'}.
   */
  static String escapedLone(String text) {
    return replacingLone(text, true);
  }

  private static String replacingLone(String text, boolean escaped) {
    if (text == null) return null;
    int lone = loneSurrogate(text);
    if (lone < 0) return text;
    StringBuilder replaced = new StringBuilder(text.length() + 8).append(text, 0, lone);
    int n = text.length();
    for (int i = lone; i < n; i++) {
      char c = text.charAt(i);
      if (Character.isHighSurrogate(c) && i + 1 < n && Character.isLowSurrogate(text.charAt(i + 1))) {
        replaced.append(c).append(text.charAt(++i));
      } else if (!Character.isSurrogate(c)) {
        replaced.append(c);
      } else if (escaped) {
        replaced.append(String.format("\\u%04x", (int) c));
      } else {
        replaced.append('\uFFFD');
      }
    }
    return replaced.toString();
  }

  /**
   * A {@code Writer} into a {@code StringBuilder}, as {@code toString()} writes: a {@code
   * StringWriter}'s {@code StringBuffer} locks on every write, which made this 2.7 times as
   * slow as {@code toString()} (a 10,000-object array: 9.2 ms against 3.4 ms).
   */
  private static final class TextWriter extends Writer {
    private final StringBuilder text = new StringBuilder();

    @Override
    public void write(int character) {
      text.append((char) character);
    }

    @Override
    public void write(char[] characters, int offset, int length) {
      text.append(characters, offset, length);
    }

    @Override
    public void write(String string) {
      text.append(string);
    }

    @Override
    public void write(String string, int offset, int length) {
      text.append(string, offset, offset + length);
    }

    @Override
    public Writer append(CharSequence characters) {
      text.append(characters);
      return this;
    }

    @Override
    public Writer append(CharSequence characters, int start, int end) {
      text.append(characters, start, end);
      return this;
    }

    @Override
    public Writer append(char character) {
      text.append(character);
      return this;
    }

    @Override
    public void flush() {}

    @Override
    public void close() {}

    @Override
    public String toString() {
      return text.toString();
    }
  }

  /**
   * Why Gson's writer refused a number, in a few words: the writer's message names the number
   * (NaN, Infinity) or, for a {@code Number} of the plugin's own class whose text is no JSON
   * number, quotes that text, which is the plugin's value and is not repeated.
   */
  private static String reason(IllegalArgumentException refused) {
    String message = String.valueOf(refused.getMessage());
    if (message.startsWith(REFUSED_PREFIX)) {
      String number = message.substring(REFUSED_PREFIX.length());
      if (NON_FINITE.contains(number)) return number + " is not a JSON number";
    }
    return "a number's text is not a JSON number";
  }
}
