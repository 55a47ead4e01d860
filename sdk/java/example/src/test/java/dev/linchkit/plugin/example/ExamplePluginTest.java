package dev.linchkit.plugin.example;

import static org.junit.jupiter.api.Assertions.assertEquals;

import org.junit.jupiter.api.Test;

class ExamplePluginTest {
  @Test
  void digestHashesThePreviousDigestEachRound() throws Exception {
    assertEquals("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", ExamplePlugin.digest("abc", 1));
    assertEquals("4f8b42c22dd3729b519ba6f68d2da7cc5b2d606d05daed5ad5128cc03e6c6358", ExamplePlugin.digest("abc", 2));
  }
}
