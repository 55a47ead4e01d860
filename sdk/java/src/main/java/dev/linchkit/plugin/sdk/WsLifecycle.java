package dev.linchkit.plugin.sdk;

import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParseException;
import com.google.gson.JsonParser;
import com.google.gson.Strictness;
import com.google.gson.stream.JsonReader;
import com.google.gson.stream.JsonToken;
import java.io.IOException;
import java.io.StringReader;

/**
 * The plugin's own lifecycle in the WebSocket modes ({@code connect}, {@code serve --websocket}):
 * no host sends Init or Start there, so the plugin runs its init hooks with {@code --config} and
 * its start hooks before it serves, and its stop and destroy hooks once it has stopped serving
 * ({@link Serve#runHooksWithinCap}), as every SDK does in these modes.
 */
final class WsLifecycle {
  private WsLifecycle() {}

  /**
   * {@code --config} as the init hooks get it: {} when not given; refused unless a JSON object,
   * in every SDK's words ("is not valid JSON", "must be a JSON object"), never with its text: a
   * config may hold a secret.
   */
  static JsonObject config(String mode, String text) throws Handshake.HandshakeException {
    if (text == null) return new JsonObject();
    JsonElement value = parsed(text);
    if (value == null) throw new Handshake.HandshakeException(mode + ": --config is not valid JSON");
    if (!value.isJsonObject()) {
      throw new Handshake.HandshakeException(mode + ": --config must be a JSON object");
    }
    return value.getAsJsonObject();
  }

  /** One JSON value and nothing after it, or null. */
  private static JsonElement parsed(String text) {
    JsonReader reader = new JsonReader(new StringReader(text));
    reader.setStrictness(Strictness.STRICT);
    reader.setNestingLimit(WireJson.MAX_DEPTH);
    try {
      JsonElement value = JsonParser.parseReader(reader);
      return reader.peek() == JsonToken.END_DOCUMENT ? value : null;
    } catch (JsonParseException | IOException | IllegalStateException notJson) {
      return null;
    }
  }

  /** The init hooks with {@code config}, then the start hooks; a failing one ends the command in one line. */
  static void start(Plugin plugin, String mode, JsonObject config) throws Handshake.HandshakeException {
    try {
      plugin.init(config);
    } catch (Exception failed) {
      throw hookFailed(mode, "init", failed);
    }
    try {
      plugin.start();
    } catch (Exception failed) {
      throw hookFailed(mode, "start", failed);
    }
  }

  private static Handshake.HandshakeException hookFailed(String mode, String hook, Exception failed) {
    var wire = Errors.toWire(failed);
    return new Handshake.HandshakeException(mode + ": " + hook + " hook: " + wire.getType() + ": " + wire.getMessage());
  }
}
