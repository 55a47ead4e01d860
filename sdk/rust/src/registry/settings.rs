//! The registry's settings as `serve` takes them: a flag each, the same as the Go and
//! Python SDKs' (docs/registry.md, "A plugin registers itself"), and the variable each
//! reads when its flag is not given, which orchestrators set. A flag wins over its
//! variable, an empty one too (`--register-etcd ''` turns off what `LINCHKIT_REGISTER_ETCD`
//! asks for). Messages name a setting as it was given: the flag when it came on the
//! command line, the variable when it came from the environment, both when it was not
//! given at all.
//!
//! etcd's password has a variable and no flag: a command line shows in the process list.
//! `--register-etcd-password` is refused by name, its value never repeated, rather than met
//! as an unknown argument (whose message quotes it).

use std::collections::HashMap;

/// The registry's variables, the same in every SDK.
pub(crate) const ENV_REGISTER_ETCD: &str = "LINCHKIT_REGISTER_ETCD";
pub(crate) const ENV_REGISTER_PREFIX: &str = "LINCHKIT_REGISTER_PREFIX";
pub(crate) const ENV_REGISTER_TTL: &str = "LINCHKIT_REGISTER_TTL";
pub(crate) const ENV_ADVERTISE: &str = "LINCHKIT_ADVERTISE";
pub(crate) const ENV_LEAVE_DELAY: &str = "LINCHKIT_LEAVE_DELAY";
pub(crate) const ENV_REGISTER_ETCD_CA_FILE: &str = "LINCHKIT_REGISTER_ETCD_CA_FILE";
pub(crate) const ENV_REGISTER_ETCD_CERT_FILE: &str = "LINCHKIT_REGISTER_ETCD_CERT_FILE";
pub(crate) const ENV_REGISTER_ETCD_KEY_FILE: &str = "LINCHKIT_REGISTER_ETCD_KEY_FILE";
pub(crate) const ENV_REGISTER_ETCD_USER: &str = "LINCHKIT_REGISTER_ETCD_USER";
/// The user's password: a variable only, no flag anywhere.
pub(crate) const ENV_REGISTER_ETCD_PASSWORD: &str = "LINCHKIT_REGISTER_ETCD_PASSWORD";

/// One registry setting: its flag, the variable read when the flag is not given, and
/// what `serve --help` says of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Setting {
    pub(crate) flag: &'static str,
    pub(crate) env: &'static str,
    pub(crate) value_name: &'static str,
    pub(crate) usage: &'static str,
}

pub(crate) const ETCD: Setting = Setting {
    flag: "--register-etcd",
    env: ENV_REGISTER_ETCD,
    value_name: "URL",
    usage: "register in the etcd at URL (http:// or https://) while serving",
};
pub(crate) const PREFIX: Setting = Setting {
    flag: "--register-prefix",
    env: ENV_REGISTER_PREFIX,
    value_name: "PREFIX",
    usage: "under this key prefix, e.g. /linchkit/plugins/echo (required)",
};
pub(crate) const ADVERTISE: Setting = Setting {
    flag: "--advertise",
    env: ENV_ADVERTISE,
    value_name: "HOST:PORT",
    usage: "where dispatchers reach this server (default: where it listens; \
            required when it listens on 0.0.0.0 or ::)",
};
pub(crate) const TTL: Setting = Setting {
    flag: "--register-ttl",
    env: ENV_REGISTER_TTL,
    value_name: "SECONDS",
    usage: "a killed server leaves the registry this long after its last renewal, \
            at least 2 (default 10)",
};
pub(crate) const LEAVE_DELAY: Setting = Setting {
    flag: "--leave-delay",
    env: ENV_LEAVE_DELAY,
    value_name: "SECONDS",
    usage: "on SIGTERM, keep answering this long after leaving the registry, while \
            dispatchers learn it left, 0-600 (default 1)",
};
pub(crate) const CA_FILE: Setting = Setting {
    flag: "--register-etcd-ca-file",
    env: ENV_REGISTER_ETCD_CA_FILE,
    value_name: "PEM",
    usage: "https:// only: the roots that verify etcd (default: the system's)",
};
pub(crate) const CERT_FILE: Setting = Setting {
    flag: "--register-etcd-cert-file",
    env: ENV_REGISTER_ETCD_CERT_FILE,
    value_name: "PEM",
    usage: "https:// only: the client certificate to present to etcd",
};
pub(crate) const KEY_FILE: Setting = Setting {
    flag: "--register-etcd-key-file",
    env: ENV_REGISTER_ETCD_KEY_FILE,
    value_name: "PEM",
    usage: "the unencrypted key of --register-etcd-cert-file",
};
pub(crate) const USER: Setting = Setting {
    flag: "--register-etcd-user",
    env: ENV_REGISTER_ETCD_USER,
    value_name: "NAME",
    usage: "register as this etcd user, whose password is read from \
            LINCHKIT_REGISTER_ETCD_PASSWORD only (over http:// only to a loopback etcd)",
};

/// Every setting, in the order `--help` lists them.
pub(crate) const IN_ORDER: [Setting; 9] = [
    ETCD,
    PREFIX,
    ADVERTISE,
    TTL,
    LEAVE_DELAY,
    CA_FILE,
    CERT_FILE,
    KEY_FILE,
    USER,
];

/// The flag no password may come by.
pub(crate) const PASSWORD_FLAG: &str = "--register-etcd-password";

/// Why `--register-etcd-password` is refused; its value is never repeated.
pub(crate) fn password_flag_refusal() -> String {
    format!(
        "{PASSWORD_FLAG}: no flag takes etcd's password, a command line shows in the process \
         list: set {ENV_REGISTER_ETCD_PASSWORD} instead"
    )
}

/// Whether `args` hold the password flag, as `--register-etcd-password VALUE` or
/// `--register-etcd-password=VALUE` (one dash too, as Go's flag package takes it). Checked
/// before anything else reads the arguments, so no message quotes what follows it.
pub(crate) fn password_flag_given(args: &[String]) -> bool {
    args.iter().any(|arg| {
        let flag = arg.split_once('=').map_or(arg.as_str(), |(flag, _)| flag);
        flag == PASSWORD_FLAG || flag == &PASSWORD_FLAG[1..]
    })
}

/// The setting whose flag is `flag` (`--register-etcd`, ...), if any.
pub(crate) fn setting_of_flag(flag: &str) -> Option<Setting> {
    IN_ORDER.into_iter().find(|setting| setting.flag == flag)
}

/// The registry's settings: the flags given, over the environment.
#[derive(Clone, Debug, Default)]
pub(crate) struct RegistryConfig {
    /// By flag: the registry flags on the command line (the last one of each wins).
    given: HashMap<&'static str, String>,
    /// The settings' variables and the password's, as the process has them.
    vars: HashMap<&'static str, String>,
}

impl RegistryConfig {
    /// The flags `given` (each a setting's flag and its value) over what `var` reads.
    pub(crate) fn new<'a>(
        given: impl IntoIterator<Item = (&'static str, String)>,
        var: impl Fn(&str) -> &'a str,
    ) -> RegistryConfig {
        let vars = IN_ORDER
            .iter()
            .map(|setting| setting.env)
            .chain([ENV_REGISTER_ETCD_PASSWORD])
            .map(|name| (name, var(name).to_string()))
            .collect();
        RegistryConfig {
            given: given.into_iter().collect(),
            vars,
        }
    }

    /// The setting's flag when given (an empty one too: a flag says "none" over a
    /// variable), else its variable.
    pub(crate) fn value(&self, setting: Setting) -> &str {
        match self.given.get(setting.flag) {
            Some(value) => value,
            None => self.var(setting.env),
        }
    }

    /// A variable the settings read (the password's among them).
    pub(crate) fn var(&self, name: &str) -> &str {
        self.vars.get(name).map(String::as_str).unwrap_or("")
    }

    /// How a message names the setting: as it was given.
    pub(crate) fn name(&self, setting: Setting) -> String {
        if self.given.contains_key(setting.flag) {
            setting.flag.to_string()
        } else if !self.var(setting.env).is_empty() {
            setting.env.to_string()
        } else {
            format!("{} (or {})", setting.flag, setting.env)
        }
    }
}

/// What `serve --help` says of the registry's flags and the password's variable.
pub(crate) fn help() -> String {
    let mut text = String::from(
        "registry flags (docs/registry.md; each reads its variable when not given):\n",
    );
    for setting in IN_ORDER {
        text.push_str(&format!(
            "  {} {} [{}]\n{}",
            setting.flag,
            setting.value_name,
            setting.env,
            wrapped(setting.usage)
        ));
    }
    text.push_str(&format!("  {ENV_REGISTER_ETCD_PASSWORD}\n"));
    text.push_str(&wrapped(
        "the password of --register-etcd-user: no flag takes it, a command line shows in \
         the process list",
    ));
    text
}

/// `text` as help lines indented by six spaces, each at most 90 columns wide.
fn wrapped(text: &str) -> String {
    let mut lines = vec![String::from("     ")];
    for word in text.split_whitespace() {
        let line = lines.last_mut().expect("one line at least");
        if line.len() > 6 && line.len() + 1 + word.len() > 90 {
            lines.push(format!("      {word}"));
        } else {
            line.push(' ');
            line.push_str(word);
        }
    }
    lines.iter().map(|line| format!("{line}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(given: &[(&'static str, &str)], vars: &[(&str, &str)]) -> RegistryConfig {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        RegistryConfig::new(
            given.iter().map(|(flag, value)| (*flag, value.to_string())),
            |name| vars.get(name).map(String::as_str).unwrap_or(""),
        )
    }

    #[test]
    fn a_flag_wins_over_its_variable_an_empty_one_too() {
        let vars = [
            (ENV_REGISTER_ETCD, "http://e:2379"),
            (ENV_REGISTER_PREFIX, "/p"),
        ];
        let chosen = config(&[("--register-etcd", "")], &vars);
        assert_eq!(chosen.value(ETCD), "");
        assert_eq!(chosen.value(PREFIX), "/p");
        let chosen = config(&[("--register-etcd", "http://f:2379")], &vars);
        assert_eq!(chosen.value(ETCD), "http://f:2379");
    }

    #[test]
    fn a_setting_is_named_as_it_was_given() {
        let chosen = config(&[("--register-ttl", "3")], &[(ENV_REGISTER_PREFIX, "/p")]);
        assert_eq!(chosen.name(TTL), "--register-ttl");
        assert_eq!(chosen.name(PREFIX), "LINCHKIT_REGISTER_PREFIX");
        assert_eq!(
            chosen.name(ADVERTISE),
            "--advertise (or LINCHKIT_ADVERTISE)"
        );
    }

    #[test]
    fn the_password_flag_is_found_in_either_form_and_never_quoted() {
        for args in [
            &["--register-etcd-password", "SECRET"][..],
            &["--address", "h:0", "--register-etcd-password=SECRET"],
            &["-register-etcd-password=SECRET"],
        ] {
            let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            assert!(password_flag_given(&args), "{args:?}");
        }
        let args = vec!["--register-etcd-user".to_string(), "x".to_string()];
        assert!(!password_flag_given(&args));
        let refusal = password_flag_refusal();
        assert!(refusal.contains(ENV_REGISTER_ETCD_PASSWORD) && !refusal.contains("SECRET"));
    }

    #[test]
    fn help_names_every_flag_and_variable_but_not_the_password_flag() {
        let text = help();
        for setting in IN_ORDER {
            assert!(
                text.contains(&format!("{} ", setting.flag)),
                "{}",
                setting.flag
            );
            assert!(text.contains(setting.env), "{}", setting.env);
        }
        assert!(text.contains(ENV_REGISTER_ETCD_PASSWORD));
        assert!(!text.contains(PASSWORD_FLAG));
    }
}
