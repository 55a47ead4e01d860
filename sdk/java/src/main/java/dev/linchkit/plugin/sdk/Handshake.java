package dev.linchkit.plugin.sdk;

import java.util.Arrays;
import java.util.Base64;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.OptionalInt;
import java.util.regex.Pattern;

/**
 * The subprocess handshake of docs/protocol.md, free of I/O so it is tested directly:
 * reading the host's environment, choosing a protocol version, and the one stdout line.
 */
public final class Handshake {
  private Handshake() {}

  public static final int CORE_PROTOCOL_VERSION = 1;
  public static final String MAGIC_COOKIE_KEY = "LINCHKIT_PLUGIN_MAGIC_COOKIE";
  public static final String MAGIC_COOKIE_VALUE = "d1spatch3r-pl4g1n";
  public static final String PROTOCOL_VERSIONS_KEY = "LINCHKIT_PLUGIN_PROTOCOL_VERSIONS";
  public static final String NETWORK_KEY = "LINCHKIT_PLUGIN_NETWORK";
  public static final String SOCKET_DIR_KEY = "LINCHKIT_PLUGIN_SOCKET_DIR";
  public static final String CLIENT_CERT_KEY = "LINCHKIT_PLUGIN_CLIENT_CERT";

  /** App protocol versions this SDK speaks. */
  public static final List<Integer> SUPPORTED_VERSIONS = List.of(1);

  /** The plugin cannot go on; the message is for a person, on stderr, before exit 1. */
  public static final class HandshakeException extends Exception {
    public HandshakeException(String message) {
      super(message);
    }
  }

  /** What the host asked for. {@code socketDir} and {@code clientCertPem} may be null. */
  public record Config(int appVersion, String network, String socketDir, String clientCertPem) {}

  /** The default of {@code serve --address}: loopback only, any free port. */
  public static final String DEFAULT_SERVICE_ADDRESS = "127.0.0.1:0";

  static final String SERVE_USAGE =
      "usage: serve [--address HOST:PORT] [--websocket [--config JSON]] [--register-etcd URL ...] [--help]";

  /**
   * {@code serve --address HOST:PORT} (service mode, address non-null) with the registry flags given
   * ({@code registryFlags}, by flag name without dashes: {@link RegistrySettings}), {@code serve
   * --help} ({@code helpWanted}), or nothing (subprocess mode).
   */
  public record Command(ServiceAddress serviceAddress, boolean helpWanted, Map<String, String> registryFlags,
      boolean websocket, String config) {
    public Command(ServiceAddress serviceAddress, boolean helpWanted, Map<String, String> registryFlags) {
      this(serviceAddress, helpWanted, registryFlags, false, null);
    }

    public Command(ServiceAddress serviceAddress, boolean helpWanted) {
      this(serviceAddress, helpWanted, Map.of());
    }

    public boolean isService() {
      return serviceAddress != null;
    }
  }

  /**
   * Where {@code serve} listens: a non-empty host (a name, an IPv4 address, or an IPv6 address
   * in brackets, kept as given for the handshake line) and a port in 0-65535, 0 meaning any free
   * one. Checked before listening, so a typo is refused rather than served somewhere else.
   */
  public record ServiceAddress(String host, int port) {
    private static final Pattern PORT = Pattern.compile("\\d{1,5}");

    public static ServiceAddress parse(String text) throws HandshakeException {
      int colon = text.lastIndexOf(':');
      if (colon < 0) throw malformed(text);
      String host = text.substring(0, colon);
      String port = text.substring(colon + 1);
      if (!isHost(host) || !PORT.matcher(port).matches() || Integer.parseInt(port) > 65535) throw malformed(text);
      return new ServiceAddress(host, Integer.parseInt(port));
    }

    /** The host to bind: an IPv6 address without its brackets. */
    public String bindHost() {
      return host.startsWith("[") ? host.substring(1, host.length() - 1) : host;
    }

    @Override
    public String toString() {
      return host + ":" + port;
    }

    /** A colon outside brackets would make {@code ::1:50051} ambiguous: which part is the port? */
    private static boolean isHost(String host) {
      if (host.startsWith("[")) {
        return host.length() > 2 && host.endsWith("]") && host.indexOf(']') == host.length() - 1;
      }
      return !host.isEmpty() && host.chars().noneMatch(c -> c == ':' || c == '[' || c == ']');
    }

    private static HandshakeException malformed(String text) {
      return new HandshakeException("serve: --address must be host:port with a port in 0-65535 (e.g. 127.0.0.1:50051), not '"
          + text + "'");
    }
  }

  /** The highest version both sides speak. An empty or missing offer means 1. */
  public static OptionalInt negotiate(String offered, List<Integer> supported) {
    String text = offered == null || offered.isBlank() ? "1" : offered;
    return Arrays.stream(text.split(","))
        .map(String::trim)
        .filter(part -> part.matches("\\d{1,9}"))
        .mapToInt(Integer::parseInt)
        .filter(supported::contains)
        .max();
  }

  public static Config readEnv(Map<String, String> env) throws HandshakeException {
    if (!MAGIC_COOKIE_VALUE.equals(env.get(MAGIC_COOKIE_KEY))) {
      throw new HandshakeException("This binary is a LinchKit plugin. It is started by the dispatcher, not by hand ("
          + MAGIC_COOKIE_KEY + " is missing or wrong). To run it as a gRPC service: serve --address 127.0.0.1:0");
    }
    OptionalInt version = negotiate(env.get(PROTOCOL_VERSIONS_KEY), SUPPORTED_VERSIONS);
    if (version.isEmpty()) {
      throw new HandshakeException("no common protocol version: the host offers '" + env.get(PROTOCOL_VERSIONS_KEY)
          + "', this plugin speaks " + SUPPORTED_VERSIONS);
    }
    String network = env.getOrDefault(NETWORK_KEY, "").trim();
    if (network.isEmpty()) network = "unix";
    if (!network.equals("unix") && !network.equals("tcp")) {
      throw new HandshakeException(NETWORK_KEY + " must be 'unix' or 'tcp', got '" + network + "'");
    }
    String cert = env.get(CLIENT_CERT_KEY);
    if (cert != null && cert.isBlank()) cert = null;
    if (cert != null && !cert.contains("-----BEGIN CERTIFICATE-----")) {
      throw new HandshakeException(CLIENT_CERT_KEY + " must be a PEM certificate");
    }
    String socketDir = env.get(SOCKET_DIR_KEY);
    if (socketDir != null && socketDir.isBlank()) socketDir = null;
    return new Config(version.getAsInt(), network, socketDir, cert);
  }

  /** {@code CORE-VERSION|APP-VERSION|NETWORK|ADDRESS|PROTOCOL|SERVER-CERT}; the certificate in unpadded base64. */
  public static String line(int appVersion, String network, String address, byte[] serverCertDer) {
    String cert = serverCertDer == null ? "" : Base64.getEncoder().withoutPadding().encodeToString(serverCertDer);
    return CORE_PROTOCOL_VERSION + "|" + appVersion + "|" + network + "|" + address + "|grpc|" + cert;
  }

  /**
   * What a refusal says of {@code arg}, the {@code position}-th argument (as the shell counts
   * {@code $1}, {@code $2}): an option by its name, never its value; one given with a single dash,
   * and anything else, by its place, never its text. A command line can carry a secret where an
   * operator slipped (a mistyped {@code --register-etcd-pasword=...}, a token pasted as an
   * argument, or after a dash: a token may begin with one), and the message goes to stderr and on
   * to the logs.
   */
  static String refused(String arg, int position) {
    if (arg.startsWith("-") && !arg.startsWith("--") && arg.length() > 1) {
      return "unknown option (argument #" + position + ", its text is not shown)";
    }
    if (arg.startsWith("-") && arg.length() > 1) {
      int equals = arg.indexOf('=');
      return equals < 0 ? "unknown option " + arg : "unknown option " + arg.substring(0, equals) + " (its value is not shown)";
    }
    return "unexpected argument #" + position + " (its text is not shown)";
  }

  public static Command parseCommand(String[] args) throws HandshakeException {
    if (args.length == 0) return new Command(null, false);
    // `example-plugin --help` asks what the executable takes: the same help as `serve --help`.
    if (args[0].equals("--help") || args[0].equals("-h")) return new Command(null, true);
    if (!args[0].equals("serve")) {
      String what = args[0].startsWith("-") ? refused(args[0], 1) : "unknown command (argument #1, its text is not shown)";
      throw new HandshakeException(what + "; " + SERVE_USAGE);
    }
    String address = DEFAULT_SERVICE_ADDRESS;
    boolean websocket = false;
    String config = null;
    Map<String, String> registry = new HashMap<>();
    for (int i = 1; i < args.length; i++) {
      String arg = args[i];
      // Refused by name before anything else is read, its value never repeated: a command line
      // shows in the process list.
      if (arg.equals(RegistrySettings.PASSWORD_FLAG) || arg.startsWith(RegistrySettings.PASSWORD_FLAG + "=")) {
        throw new HandshakeException("serve: " + RegistrySettings.PASSWORD_FLAG_REFUSAL);
      }
    }
    for (int i = 1; i < args.length; i++) {
      String arg = args[i];
      int equals = arg.indexOf('=');
      String flag = arg.startsWith("--") ? arg.substring(2, equals < 0 ? arg.length() : equals) : null;
      RegistrySettings.Setting setting = flag == null ? null : RegistrySettings.Setting.ofFlag(flag);
      if (arg.equals("--help") || arg.equals("-h")) {
        return new Command(null, true);
      } else if (arg.equals("--address") && i + 1 < args.length) {
        address = args[++i];
      } else if (arg.equals("--address")) {
        throw new HandshakeException("serve: --address needs a value; " + SERVE_USAGE);
      } else if (arg.startsWith("--address=")) {
        address = arg.substring("--address=".length());
      } else if (arg.equals("--websocket")) {
        websocket = true;
      } else if (arg.equals("--config") && i + 1 < args.length) {
        config = args[++i];
      } else if (arg.equals("--config")) {
        throw new HandshakeException("serve: --config needs a value; " + SERVE_USAGE);
      } else if (arg.startsWith("--config=")) {
        config = arg.substring("--config=".length());
      } else if (setting != null && equals >= 0) {
        registry.put(setting.flag, arg.substring(equals + 1));
      } else if (setting != null && i + 1 < args.length) {
        registry.put(setting.flag, args[++i]);
      } else if (setting != null) {
        throw new HandshakeException("serve: " + arg + " needs a value; " + SERVE_USAGE);
      } else {
        // Begun with the command, as every SDK's serve begins a refusal (and this one its others).
        throw new HandshakeException("serve: " + refused(arg, i + 1) + "; " + SERVE_USAGE);
      }
    }
    ServiceAddress parsed = ServiceAddress.parse(address);
    if (config != null && !websocket) {
      throw new HandshakeException("serve: --config needs --websocket (a gRPC service gets its config from the Init call)");
    }
    return new Command(parsed, false, registry, websocket, config);
  }
}
