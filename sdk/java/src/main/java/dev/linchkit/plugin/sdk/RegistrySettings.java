package dev.linchkit.plugin.sdk;

import java.util.Map;

/**
 * The registry's settings as {@code serve} takes them (docs/registry.md, "A plugin registers
 * itself"): a flag each, the same as the Go and Python SDKs', and the variable each reads when its
 * flag is not given, which orchestrators set. A flag wins over its variable, an empty one too
 * ({@code --register-etcd ''} turns off what {@code LINCHKIT_REGISTER_ETCD} asks for). Messages
 * name a setting as it was given: the flag when it came on the command line, the variable when it
 * came from the environment, both when it was not given at all.
 *
 * <p>etcd's password has a variable and no flag: a command line shows in the process list.
 * {@code --register-etcd-password} is known only to be refused by name, its value never repeated
 * ({@link Handshake#parseCommand}); the help leaves it out.
 */
final class RegistrySettings {
  /** One registry setting: its flag (without dashes), its variable, and what the help says of it. */
  enum Setting {
    ETCD("register-etcd", Registration.ETCD_ENV, "URL", "register in the etcd at URL while serving"),
    PREFIX("register-prefix", Registration.PREFIX_ENV, "PREFIX", "under this key PREFIX, e.g. /linchkit/plugins/echo"),
    ADVERTISE("advertise", Registration.ADVERTISE_ENV, "HOST:PORT",
        "where dispatchers reach this server (default: where it listens; required when it listens on 0.0.0.0 or ::)"),
    TTL("register-ttl", Registration.TTL_ENV, "SECONDS", "a killed server leaves the registry this long after its"
        + " last renewal, at least 2 (default: " + Registration.DEFAULT_TTL_SECONDS + ")"),
    LEAVE_DELAY("leave-delay", Registration.LEAVE_DELAY_ENV, "SECONDS", "on SIGTERM, keep answering this long after"
        + " leaving the registry, while dispatchers learn it left, 0-600 (default: 1)"),
    CA_FILE("register-etcd-ca-file", Registration.CA_FILE_ENV, "PEM",
        "https://: the roots that verify etcd (default: the system's)"),
    CERT_FILE("register-etcd-cert-file", Registration.CERT_FILE_ENV, "PEM",
        "https://: the client certificate to present to etcd"),
    KEY_FILE("register-etcd-key-file", Registration.KEY_FILE_ENV, "PEM", "its unencrypted key"),
    USER("register-etcd-user", Registration.USER_ENV, "NAME", "register as this etcd user, whose password is read"
        + " from " + Registration.PASSWORD_ENV + " only (over http:// only to a loopback etcd)");

    final String flag;
    final String env;
    final String metavar;
    final String usage;

    Setting(String flag, String env, String metavar, String usage) {
      this.flag = flag;
      this.env = env;
      this.metavar = metavar;
      this.usage = usage;
    }

    /** The setting this flag (without dashes) names, or null. */
    static Setting ofFlag(String flag) {
      for (Setting setting : values()) {
        if (setting.flag.equals(flag)) return setting;
      }
      return null;
    }
  }

  /** The flag no password may come by. */
  static final String PASSWORD_FLAG = "--register-etcd-password";

  /** Its refusal, which never repeats what followed it. */
  static final String PASSWORD_FLAG_REFUSAL = PASSWORD_FLAG + ": no flag takes etcd's password, a command line"
      + " shows in the process list: set " + Registration.PASSWORD_ENV + " instead";

  /** The registry flags given on the command line, by flag name (without dashes). */
  private final Map<String, String> given;
  private final Map<String, String> env;

  RegistrySettings(Map<String, String> given, Map<String, String> env) {
    this.given = Map.copyOf(given);
    this.env = env;
  }

  /** The setting's flag when given (an empty one too: a flag says "none" over a variable), else its variable. */
  String value(Setting setting) {
    String flag = given.get(setting.flag);
    if (flag != null) return flag;
    return env.getOrDefault(setting.env, "");
  }

  /** How a message names the setting: as it was given. */
  String name(Setting setting) {
    if (given.containsKey(setting.flag)) return "--" + setting.flag;
    if (!env.getOrDefault(setting.env, "").isEmpty()) return setting.env;
    return "--" + setting.flag + " (or " + setting.env + ")";
  }

  /** etcd's password: from its variable only. */
  String password() {
    return env.getOrDefault(Registration.PASSWORD_ENV, "");
  }

  /** The help's lines for the registry flags, each with the variable it reads. */
  static String help() {
    StringBuilder help = new StringBuilder();
    for (Setting setting : Setting.values()) {
      help.append("  --").append(setting.flag).append(' ').append(setting.metavar).append('\n');
      StringBuilder line = new StringBuilder("     ");
      for (String word : (setting.usage + " [" + setting.env + "]").split(" ")) {
        if (line.length() + 1 + word.length() > 90) {
          help.append(line).append('\n');
          line = new StringBuilder("     ");
        }
        line.append(' ').append(word);
      }
      help.append(line).append('\n');
    }
    return help.toString();
  }
}
