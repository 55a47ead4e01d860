package dev.linchkit.plugin.sdk;

import java.io.IOException;
import java.net.InetSocketAddress;
import java.net.Socket;
import java.time.Duration;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.TimeUnit;
import javax.net.ssl.SSLContext;
import javax.net.ssl.SSLParameters;
import javax.net.ssl.SSLSocket;

/**
 * What a TLS server says of this client's certificate, asked on a connection of the probe's own.
 * With TLS 1.3 a server judges the client's certificate once the client's side of the handshake is
 * over, and closes the connection: the JDK's {@link java.net.http.HttpClient}, writing its request
 * by then, may meet that as a broken pipe or a reset and never read the alert, which then reads as
 * an outage. That client gives no hold on its socket to read the alert from, as the Python SDK
 * does: this connection completes the handshake as the client's did (the same context, protocols,
 * server name and host name check), writes nothing, and reads what the server says, all within a
 * bound.
 */
final class AlertProbe {
  /**
   * The longest wait for the server's word once the handshake is over. A server that refuses the
   * certificate says so as soon as it has read it; one that takes it waits for a request, silent.
   */
  static final Duration ALERT_WAIT = Duration.ofSeconds(2);

  private AlertProbe() {}

  /**
   * The fatal alert the server at {@code host}:{@code port} ({@link java.net.URI#getHost}'s form)
   * sends a client of {@code context} speaking {@code protocols}, or null when it sends none; the
   * whole probe within {@code bound}.
   */
  static IOException alert(SSLContext context, String[] protocols, String host, int port, Duration bound) {
    String name = host.startsWith("[") && host.endsWith("]") ? host.substring(1, host.length() - 1) : host;
    int millis = (int) Math.max(1, Math.min(bound.toMillis(), Integer.MAX_VALUE));
    Socket plain = new Socket();
    // Socket timeouts bound each read, not a handshake a peer trickles byte by byte: past the
    // bound the socket is closed under the probe, which then fails as any read would.
    CompletableFuture<Void> cutoff = CompletableFuture.runAsync(() -> close(plain),
        CompletableFuture.delayedExecutor(millis, TimeUnit.MILLISECONDS));
    try {
      plain.connect(new InetSocketAddress(name, port), millis);
      plain.setSoTimeout(millis);
      try (SSLSocket tls = (SSLSocket) context.getSocketFactory().createSocket(plain, name, port, true)) {
        SSLParameters parameters = tls.getSSLParameters(); // the server name (SNI) the host gave
        parameters.setProtocols(protocols);
        parameters.setEndpointIdentificationAlgorithm("HTTPS");
        tls.setSSLParameters(parameters);
        tls.startHandshake();
        tls.setSoTimeout((int) Math.min(millis, ALERT_WAIT.toMillis()));
        tls.getInputStream().read();
      }
      return null; // silent or closed: the server took the certificate
    } catch (IOException | RuntimeException failed) {
      return alertIn(failed);
    } finally {
      cutoff.cancel(false);
      close(plain);
    }
  }

  /** The error in {@code failed}'s causes that carries a fatal alert the peer sent, or null. */
  static IOException alertIn(Throwable failed) {
    Throwable each = failed;
    for (int depth = 0; each != null && depth < 16; depth++, each = each.getCause()) {
      String text = each.getMessage();
      if (each instanceof IOException io && text != null && text.contains("Received fatal alert")) return io;
    }
    return null;
  }

  private static void close(Socket socket) {
    try {
      socket.close();
    } catch (IOException ignored) {
      // closing is all that was wanted
    }
  }
}
