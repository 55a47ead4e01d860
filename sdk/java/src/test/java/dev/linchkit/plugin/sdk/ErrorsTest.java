package dev.linchkit.plugin.sdk;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import dev.linchkit.plugin.v1.CallReply;
import dev.linchkit.plugin.v1.Error;
import java.util.concurrent.CompletionException;
import org.junit.jupiter.api.Test;

class ErrorsTest {
  @Test
  void aPluginsOwnErrorKeepsTypeRetryableDetailsAndRetryAfter() {
    JsonObject details = new JsonObject();
    details.addProperty("balance", 100);
    Error wire = Errors.toWire(new PluginException("InsufficientFunds", "balance is 100", true, details, 1.5));
    assertEquals("InsufficientFunds", wire.getType());
    assertEquals("balance is 100", wire.getMessage());
    assertTrue(wire.getRetryable());
    assertEquals(1.5, wire.getRetryAfter());
    assertEquals(details, JsonParser.parseString(wire.getDetailsJson().toStringUtf8()));
  }

  @Test
  void theStableTypesAndTheirRetryability() {
    assertEquals("invalid_params", Errors.toWire(PluginException.invalidParams("x")).getType());
    assertFalse(Errors.toWire(PluginException.invalidParams("x")).getRetryable());
    assertTrue(Errors.toWire(PluginException.invalidParams("x")).getDetailsJson().isEmpty(), "no details: empty bytes");
    assertEquals("method_not_found", Errors.toWire(PluginException.methodNotFound("x")).getType());
    Error late = Errors.toWire(PluginException.deadlineExceeded("late"));
    assertEquals("deadline_exceeded", late.getType());
    assertTrue(late.getRetryable());
  }

  @Test
  void anythingElseIsAnsweredWithItsClassNameNotRetryable() {
    Error wire = Errors.toWire(new IllegalStateException("broken"));
    assertEquals("IllegalStateException", wire.getType());
    assertEquals("broken", wire.getMessage());
    assertFalse(wire.getRetryable());
    // wrappers from the SDK's own plumbing are looked through
    assertEquals("ExampleFailure", Errors.toWire(new CompletionException(new PluginException("ExampleFailure", "x"))).getType());
    CallReply reply = PluginService.errorReply(new NullPointerException());
    assertFalse(reply.getOk());
    assertEquals("NullPointerException", reply.getError().getType());
  }

  @Test
  void aMissingOrEmptyTypeIsANamedDefaultNeverAnEmptyString() {
    assertEquals(Errors.DEFAULT_TYPE, Errors.toWire(new PluginException(null, "m")).getType());
    assertEquals(Errors.DEFAULT_TYPE, Errors.toWire(new PluginException("", "m")).getType());
    assertEquals("m", Errors.toWire(new PluginException(null, "m")).getMessage());
    assertEquals("PluginException", Errors.toWire(new PluginException(null, null)).getMessage());
    class OutOfStock extends PluginException {
      OutOfStock() {
        super(null, "gone");
      }
    }
    assertEquals("OutOfStock", Errors.toWire(new OutOfStock()).getType(), "a subclass without a type is named by its class");
    // An anonymous class has no simple name: its nearest named superclass's.
    assertEquals("IllegalStateException", Errors.toWire(new IllegalStateException("x") {}).getType());
    assertEquals(Errors.DEFAULT_TYPE, Errors.toWire(new PluginException("", "x") {}).getType());
    assertEquals(Errors.DEFAULT_TYPE, Errors.toWire(null).getType(), "never throws");
  }

  @Test
  void anExceptionWithoutAMessageNamesItsClassOnce() {
    Error wire = Errors.toWire(new StackOverflowError());
    assertEquals("StackOverflowError", wire.getType());
    assertFalse(wire.getMessage().contains("StackOverflowError"), wire.getMessage());
    assertFalse(wire.getMessage().isEmpty());
  }

  @Test
  void paramsOfTheWrongShapeAreInvalidParams() throws Exception {
    assertThrows(PluginException.class, () -> new Params(JsonParser.parseString("[1, 2]"), "count"));
    Params params = new Params(JsonParser.parseString("{\"n\": 2.5, \"s\": 1, \"big\": 3.0}"), "count");
    assertEquals("invalid_params", assertThrows(PluginException.class, () -> params.integer("n")).type());
    assertTrue(assertThrows(PluginException.class, () -> params.integer("missing")).getMessage().contains("'missing'"));
    assertThrows(PluginException.class, () -> params.string("s"));
    assertEquals(3, params.integer("big"), "3.0 is an integer in JSON");
    assertEquals(3, new Params(JsonParser.parseString("{\"n\": 3}"), "count").integer("n", 0, 10));
  }
}
