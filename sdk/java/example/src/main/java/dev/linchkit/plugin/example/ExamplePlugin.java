package dev.linchkit.plugin.example;

import com.google.gson.JsonObject;
import dev.linchkit.plugin.sdk.Params;
import dev.linchkit.plugin.sdk.Plugin;
import dev.linchkit.plugin.sdk.PluginException;
import dev.linchkit.plugin.sdk.Serve;
import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.HexFormat;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.concurrent.atomic.AtomicInteger;

/**
 * The example plugin of docs/protocol.md ("The example plugin, in every language"),
 * written on the Java SDK: the author writes only the methods.
 */
public final class ExamplePlugin {
  /**
   * The most letters x {@code pad} asks for (64 MiB): the suite's largest chunk is 9 MB, and a
   * caller's 2**40 must be refused before it is allocated, not end in an OutOfMemoryError.
   */
  static final long MAX_PAD = 64L << 20;

  /** The most chunks {@code count} sends: a unary call collects them all before it answers. */
  static final long MAX_COUNT = 1_000_000;

  private ExamplePlugin() {}

  /**
   * Fails the hook a config's {@code fail_hook} names: how the conformance suite sees what the
   * SDK answers a failing hook.
   */
  static void failIfNamed(JsonObject config, String hook) throws PluginException {
    if (config != null && config.has("fail_hook") && config.get("fail_hook").isJsonPrimitive()
        && hook.equals(config.get("fail_hook").getAsString())) {
      throw new PluginException("BadConfig", "fail_hook names " + hook);
    }
  }

  /**
   * A config's {@code say_hooks} has the stop and destroy hooks each write a line to stderr: how
   * the conformance suite sees that they ran once the process is gone.
   */
  static void sayIfAsked(JsonObject config, String hook) {
    if (config != null && config.has("say_hooks") && config.get("say_hooks").isJsonPrimitive()
        && config.get("say_hooks").getAsJsonPrimitive().isBoolean() && config.get("say_hooks").getAsBoolean()) {
      System.err.println("example: " + hook + " hook ran");
    }
  }

  /**
   * A config's {@code stall_hook} has that hook never return (a close stuck on a peer that does
   * not answer): how the conformance suite sees that a stop does not wait for it.
   */
  static void stallIfNamed(JsonObject config, String hook) throws InterruptedException {
    if (config != null && config.has("stall_hook") && config.get("stall_hook").isJsonPrimitive()
        && hook.equals(config.get("stall_hook").getAsString())) {
      Thread.sleep(Long.MAX_VALUE);
    }
  }

  /** Hex of SHA-256 applied {@code rounds} times, each round hashing the previous digest. */
  public static String digest(String data, long rounds) throws NoSuchAlgorithmException {
    MessageDigest sha256 = MessageDigest.getInstance("SHA-256");
    byte[] bytes = data.getBytes(StandardCharsets.UTF_8);
    for (long i = 0; i < rounds; i++) bytes = sha256.digest(bytes);
    return HexFormat.of().formatHex(bytes);
  }

  /**
   * The params' {@code pad} (0 when absent, at most {@link #MAX_PAD}) as that many letters x: how
   * the conformance suite makes a chunk or an event as large as it needs.
   */
  static String pad(Params params) throws PluginException {
    long pad = atMost("pad", params.integer("pad", Long.MIN_VALUE, Long.MAX_VALUE, 0), MAX_PAD, " (64 MiB)");
    return "x".repeat((int) pad);
  }

  /** The params' {@code n} of count, at most {@link #MAX_COUNT}. */
  static long count(Params params) throws PluginException {
    return atMost("n", params.integer("n"), MAX_COUNT, "");
  }

  /**
   * {@code value} when it is from 0 to {@code max}, else invalid_params naming the bound
   * ({@code inWords}: the bound said another way too) and the value.
   */
  private static long atMost(String name, long value, long max, String inWords) throws PluginException {
    if (value < 0) {
      throw PluginException.invalidParams(name + " must not be negative, got " + value);
    }
    if (value > max) {
      throw PluginException.invalidParams(name + " must be at most " + max + inWords + ", got " + value);
    }
    return value;
  }

  /** A chunk of count with its padding: {@code {"i": k, "pad": "xx…"}}, in that order. */
  static Map<String, Object> chunk(long i, String pad) {
    Map<String, Object> chunk = new LinkedHashMap<>();
    chunk.put("i", i);
    chunk.put("pad", pad);
    return chunk;
  }

  /**
   * The double that non_finite's {@code value} names: "nan", "inf" or "-inf"; anything else is
   * invalid_params naming {@code value}.
   */
  static double nonFinite(Params params) throws PluginException {
    return switch (params.string("value")) {
      case "nan" -> Double.NaN;
      case "inf" -> Double.POSITIVE_INFINITY;
      case "-inf" -> Double.NEGATIVE_INFINITY;
      default -> throw PluginException.invalidParams("non_finite: 'value' must be \"nan\", \"inf\" or \"-inf\"");
    };
  }

  /**
   * not_unicode's result: {@code {"text": S}}, S "smile " and the first half of 😀 (U+D83D, a
   * lone surrogate), cut at a UTF-16 index as an author cuts a string. No UTF-8 encodes it: the
   * SDK answers provider_error.
   */
  static Map<String, String> notUnicode() {
    return Map.of("text", "smile 😀".substring(0, 7));
  }

  public static Plugin plugin() {
    Plugin plugin = new Plugin("example", "1.0.0", "java");

    plugin.method("echo", "the params, unchanged", (params, ctx) -> params);

    plugin.method("digest", "hex of SHA-256 applied `rounds` times to `data` (CPU-bound)", (params, ctx) -> {
      Params p = new Params(params, "digest");
      return digest(p.string("data"), p.integer("rounds", 0, Long.MAX_VALUE));
    });

    plugin.method("fail", "fails with the business error ExampleFailure", (params, ctx) -> {
      Params p = new Params(params, "fail");
      throw new PluginException("ExampleFailure", p.string("message"), false);
    });

    plugin.method("sleep", "sleeps `ms` milliseconds, or gives up at the deadline", (params, ctx) -> {
      long ms = new Params(params, "sleep").integer("ms", 0, Long.MAX_VALUE);
      ctx.sleep(ms);
      return Map.of("slept_ms", ms);
    });

    plugin.streamingMethod("count",
        "chunks {\"i\": 0} … {\"i\": n-1} (`n` at most 1000000), each with `pad` letters x when `pad` > 0 (at most 64 MiB)",
        (params, ctx, out) -> {
          Params p = new Params(params, "count");
          long n = count(p);
          String pad = pad(p);
          for (long i = 0; i < n; i++) out.send(pad.isEmpty() ? Map.of("i", i) : chunk(i, pad));
        });

    plugin.method("emit", "emits plugin event `name` with `data`, or with `pad` letters x when `pad` > 0 (at most 64 MiB)", (params, ctx) -> {
      Params p = new Params(params, "emit");
      String name = p.string("name");
      String pad = pad(p);
      plugin.emit(name, pad.isEmpty() ? p.any("data") : pad);
      return true;
    });

    // A result JSON cannot carry, built as an author builds one: the SDK answers provider_error.
    plugin.method("non_finite", "returns {\"x\": NaN, Infinity or -Infinity} as `value` (\"nan\", \"inf\", \"-inf\") says",
        (params, ctx) -> Map.of("x", nonFinite(new Params(params, "non_finite"))));

    // A string that is not valid Unicode, built as an author builds one: provider_error too.
    plugin.method("not_unicode", "returns {\"text\": \"smile \\ud83d\"}, half an emoji (a lone surrogate); params are ignored",
        (params, ctx) -> notUnicode());

    plugin.method("config", "the JSON object passed to Init", (params, ctx) -> {
      JsonObject config = plugin.config();
      return config;
    });

    // How many times each lifecycle hook ran, for as long as the process lives.
    Map<String, AtomicInteger> hooks = new LinkedHashMap<>();
    for (String hook : new String[] {"init", "start", "stop", "destroy"}) hooks.put(hook, new AtomicInteger());
    plugin.onInit(config -> {
          hooks.get("init").incrementAndGet();
          failIfNamed(config, "init");
        })
        .onStart(() -> {
          hooks.get("start").incrementAndGet();
          failIfNamed(plugin.config(), "start");
        })
        .onStop(() -> {
          hooks.get("stop").incrementAndGet();
          sayIfAsked(plugin.config(), "stop");
          stallIfNamed(plugin.config(), "stop");
        })
        .onDestroy(() -> {
          hooks.get("destroy").incrementAndGet();
          sayIfAsked(plugin.config(), "destroy");
          stallIfNamed(plugin.config(), "destroy");
        });

    plugin.method("hooks", "how many times each lifecycle hook ran, counted `after_ms` from now", (params, ctx) -> {
      // Counted later: whether a stop ran the hooks under a call still in flight.
      if (params != null && params.isJsonObject() && params.getAsJsonObject().has("after_ms")) {
        ctx.sleep(new Params(params, "hooks").integer("after_ms", 0, Long.MAX_VALUE));
      }
      Map<String, Integer> counts = new LinkedHashMap<>();
      hooks.forEach((hook, count) -> counts.put(hook, count.get()));
      return counts;
    });

    plugin.on("ping", (name, data) -> plugin.emit("pong", data));
    // A handler that fails: the SDK logs it at ERROR and goes on.
    plugin.on("fail", (name, data) -> {
      throw new IllegalStateException(data.getAsJsonObject().get("message").getAsString());
    });
    return plugin;
  }

  public static void main(String[] args) {
    Serve.serve(plugin(), args);
  }
}
