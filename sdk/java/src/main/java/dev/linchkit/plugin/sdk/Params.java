package dev.linchkit.plugin.sdk;

import com.google.gson.JsonElement;
import com.google.gson.JsonNull;
import com.google.gson.JsonObject;
import com.google.gson.JsonPrimitive;
import java.math.BigDecimal;

/**
 * Typed access to a method's JSON params; every failure is an {@code invalid_params}
 * {@link PluginException} that says what was wrong.
 */
public final class Params {
  private final String method;
  private final JsonObject values;

  public Params(JsonElement params, String method) throws PluginException {
    this.method = method;
    if (params == null || !params.isJsonObject()) {
      String got = params == null || params.isJsonNull() ? "null" : params.isJsonArray() ? "an array" : "a " + kind(params);
      throw PluginException.invalidParams(method + " takes an object of named params, got " + got);
    }
    this.values = params.getAsJsonObject();
  }

  private static String kind(JsonElement value) {
    JsonPrimitive primitive = value.getAsJsonPrimitive();
    return primitive.isString() ? "string" : primitive.isNumber() ? "number" : "boolean";
  }

  private JsonElement required(String name) throws PluginException {
    if (!values.has(name)) {
      throw PluginException.invalidParams(method + " needs the param '" + name + "'");
    }
    return values.get(name);
  }

  /** An integer (a JSON number without a fraction) in {@code [min, max]}. */
  public long integer(String name, long min, long max) throws PluginException {
    JsonElement value = required(name);
    if (value.isJsonPrimitive() && value.getAsJsonPrimitive().isNumber()) {
      try {
        long number = new BigDecimal(value.getAsString()).longValueExact();
        if (number < min || number > max) {
          throw PluginException.invalidParams(method + ": '" + name + "' must be between " + min + " and " + max + ", got " + number);
        }
        return number;
      } catch (ArithmeticException | NumberFormatException notAnInteger) {
        // reported below
      }
    }
    throw PluginException.invalidParams(method + ": '" + name + "' must be an integer, got " + value);
  }

  /** {@link #integer(String, long, long)}, or {@code fallback} when the param is absent. */
  public long integer(String name, long min, long max, long fallback) throws PluginException {
    return values.has(name) ? integer(name, min, max) : fallback;
  }

  public long integer(String name) throws PluginException {
    return integer(name, Long.MIN_VALUE, Long.MAX_VALUE);
  }

  public String string(String name) throws PluginException {
    JsonElement value = required(name);
    if (value.isJsonPrimitive() && value.getAsJsonPrimitive().isString()) {
      return value.getAsString();
    }
    throw PluginException.invalidParams(method + ": '" + name + "' must be a string, got " + value);
  }

  /** Any JSON value; JSON null when absent. */
  public JsonElement any(String name) {
    return values.has(name) ? values.get(name) : JsonNull.INSTANCE;
  }
}
