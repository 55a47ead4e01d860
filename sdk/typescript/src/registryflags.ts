/**
 * The registry's settings as `serve` takes them (docs/registry.md, "A plugin registers
 * itself"): a flag each, the same as the Python and Go SDKs', and the variable each reads
 * when its flag is not given, which orchestrators set. A flag wins over its variable, an
 * empty one too (`--register-etcd ''` turns off what `LINCHKIT_REGISTER_ETCD` asks for).
 * Messages name a setting as it was given: the flag when it came on the command line, the
 * variable when it came from the environment, both when it was not given at all.
 *
 * etcd's password has a variable and no flag: a command line shows in the process list.
 * `--register-etcd-password` is known only to be refused by name, its value never
 * repeated, rather than met as an unknown argument (whose message quotes it).
 */

/** The registry's environment variables, the same in every SDK. */
export const REGISTER_ETCD_ENV = 'LINCHKIT_REGISTER_ETCD';
export const REGISTER_PREFIX_ENV = 'LINCHKIT_REGISTER_PREFIX';
export const REGISTER_TTL_ENV = 'LINCHKIT_REGISTER_TTL';
export const ADVERTISE_ENV = 'LINCHKIT_ADVERTISE';
export const LEAVE_DELAY_ENV = 'LINCHKIT_LEAVE_DELAY';
export const REGISTER_ETCD_CA_FILE_ENV = 'LINCHKIT_REGISTER_ETCD_CA_FILE';
export const REGISTER_ETCD_CERT_FILE_ENV = 'LINCHKIT_REGISTER_ETCD_CERT_FILE';
export const REGISTER_ETCD_KEY_FILE_ENV = 'LINCHKIT_REGISTER_ETCD_KEY_FILE';
export const REGISTER_ETCD_USER_ENV = 'LINCHKIT_REGISTER_ETCD_USER';
/** The password has this variable and no flag anywhere. */
export const REGISTER_ETCD_PASSWORD_ENV = 'LINCHKIT_REGISTER_ETCD_PASSWORD';

/** The lease's TTL when none is given, in seconds. */
export const DEFAULT_REGISTER_TTL = 10;
/** How long a server keeps serving once it left the registry, when none is given, in seconds. */
export const DEFAULT_LEAVE_DELAY = 1;

/** One registry setting: its flag (without `--`), the variable read when the flag is not given, what `--help` says. */
export interface RegistrySetting {
  readonly flag: string;
  readonly env: string;
  readonly usage: string;
}

export const SETTING_ETCD: RegistrySetting = { flag: 'register-etcd', env: REGISTER_ETCD_ENV, usage: 'register in the etcd at URL while serving' };
export const SETTING_PREFIX: RegistrySetting = {
  flag: 'register-prefix',
  env: REGISTER_PREFIX_ENV,
  usage: 'under this key PREFIX, e.g. /linchkit/plugins/echo',
};
export const SETTING_ADVERTISE: RegistrySetting = {
  flag: 'advertise',
  env: ADVERTISE_ENV,
  usage: 'where dispatchers reach this server, as HOST:PORT (default: where it listens; required when it listens on 0.0.0.0 or ::)',
};
export const SETTING_TTL: RegistrySetting = {
  flag: 'register-ttl',
  env: REGISTER_TTL_ENV,
  usage: `a killed server leaves the registry this long after its last renewal, in SECONDS, at least 2 (default: ${DEFAULT_REGISTER_TTL})`,
};
export const SETTING_LEAVE_DELAY: RegistrySetting = {
  flag: 'leave-delay',
  env: LEAVE_DELAY_ENV,
  usage: `on SIGTERM, keep answering this many SECONDS after leaving the registry, while dispatchers learn it left, 0-600 (default: ${DEFAULT_LEAVE_DELAY})`,
};
export const SETTING_CA_FILE: RegistrySetting = {
  flag: 'register-etcd-ca-file',
  env: REGISTER_ETCD_CA_FILE_ENV,
  usage: "https://: PEM roots that verify etcd (default: Node's)",
};
export const SETTING_CERT_FILE: RegistrySetting = {
  flag: 'register-etcd-cert-file',
  env: REGISTER_ETCD_CERT_FILE_ENV,
  usage: 'https://: the client certificate (PEM) to present to etcd',
};
export const SETTING_KEY_FILE: RegistrySetting = {
  flag: 'register-etcd-key-file',
  env: REGISTER_ETCD_KEY_FILE_ENV,
  usage: 'the unencrypted key (PEM) of --register-etcd-cert-file',
};
export const SETTING_USER: RegistrySetting = {
  flag: 'register-etcd-user',
  env: REGISTER_ETCD_USER_ENV,
  usage: `register as this etcd user (NAME), whose password is read from ${REGISTER_ETCD_PASSWORD_ENV} only (over http:// only to a loopback etcd)`,
};

/** Every registry setting, in the order `--help` lists them. */
export const REGISTRY_SETTINGS: readonly RegistrySetting[] = [
  SETTING_ETCD,
  SETTING_PREFIX,
  SETTING_ADVERTISE,
  SETTING_TTL,
  SETTING_LEAVE_DELAY,
  SETTING_CA_FILE,
  SETTING_CERT_FILE,
  SETTING_KEY_FILE,
  SETTING_USER,
];

/** The flag no password may come by. */
export const PASSWORD_FLAG = 'register-etcd-password';

/** Why `--register-etcd-password` is refused; its value is never part of it. */
export const PASSWORD_FLAG_REFUSAL =
  `--${PASSWORD_FLAG}: no flag takes etcd's password, a command line shows in the process list: ` + `set ${REGISTER_ETCD_PASSWORD_ENV} instead`;

/** The registry flag named by `name` (without `--`), or undefined. */
export function registrySettingNamed(name: string): RegistrySetting | undefined {
  return REGISTRY_SETTINGS.find((setting) => setting.flag === name);
}

/** The registry's settings: the flags given on the command line, over the environment. */
export class RegistryConfig {
  constructor(
    /** By flag name (without `--`): the registry flags on the command line, an empty value too. */
    private readonly given: ReadonlyMap<string, string>,
    private readonly env: NodeJS.ProcessEnv,
  ) {}

  /** The setting's flag when given (an empty one too: a flag says "none" over a variable), else its variable. */
  value(setting: RegistrySetting): string {
    return this.given.get(setting.flag) ?? this.env[setting.env] ?? '';
  }

  /** A variable no flag takes (the password); empty when unset. */
  variable(name: string): string {
    return this.env[name] ?? '';
  }

  /** How a message names the setting: as it was given. */
  name(setting: RegistrySetting): string {
    if (this.given.has(setting.flag)) return `--${setting.flag}`;
    if (this.env[setting.env]) return setting.env;
    return `--${setting.flag} (or ${setting.env})`;
  }
}

/** `--help`'s lines for the registry flags, each with the variable it reads. */
export function registryHelp(): string {
  return REGISTRY_SETTINGS.map((setting) => {
    const value = setting.usage.match(/\b(URL|PREFIX|HOST:PORT|SECONDS|PEM|NAME)\b/)?.[1] ?? 'VALUE';
    return `  --${setting.flag} ${value}\n      ${setting.usage} [${setting.env}]\n`;
  }).join('');
}
