package dev.linchkit.plugin.sdk;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Map;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

class BearerTokenTest {
  @Test
  void admitsOnlyTheToken() throws Exception {
    BearerToken token = new BearerToken(" s3cret\n");
    assertTrue(token.admits("Bearer s3cret"));
    assertTrue(token.admits("bearer  s3cret "));
    for (String wrong : new String[] {"Bearer s3cret2", "Bearer s3cre", "Basic s3cret", "s3cret", ""}) {
      assertFalse(token.admits(wrong), wrong);
    }
    assertFalse(token.admits(null));
    assertEquals("BearerToken(hidden)", token.toString());
  }

  @Test
  void readsOneSource(@TempDir Path dir) throws Exception {
    Path file = dir.resolve("token");
    Files.writeString(file, "from-file\n");
    assertNull(BearerToken.configured(Map.of()));
    assertTrue(BearerToken.configured(Map.of(BearerToken.TOKEN_FILE_ENV, file.toString())).admits("Bearer from-file"));
    assertTrue(BearerToken.configured(Map.of(BearerToken.TOKEN_ENV, "s3cret")).admits("Bearer s3cret"));
    Handshake.HandshakeException both = assertThrows(Handshake.HandshakeException.class,
        () -> BearerToken.configured(Map.of(BearerToken.TOKEN_FILE_ENV, file.toString(), BearerToken.TOKEN_ENV, "s3cret")));
    assertTrue(both.getMessage().contains("not both"));
    assertFalse(both.getMessage().contains("s3cret"));
    assertThrows(Handshake.HandshakeException.class,
        () -> BearerToken.configured(Map.of(BearerToken.TOKEN_FILE_ENV, dir.resolve("missing").toString())));
    assertThrows(Handshake.HandshakeException.class, () -> BearerToken.configured(Map.of(BearerToken.TOKEN_ENV, "a b")));
  }
}
