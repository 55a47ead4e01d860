//! Which calls record a span: `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`, read as
//! OpenTelemetry's SDKs read them (the Go, TypeScript and Python plugin SDKs use theirs).
//!
//! `always_on`, `always_off` and `traceidratio` decide every call alike, whatever its
//! parent said; `parentbased_always_on` (the default), `parentbased_always_off` and
//! `parentbased_traceidratio` follow the sampled flag of a call's `traceparent` and ask
//! their root sampler only for a call without a valid one. The ratio is
//! `OTEL_TRACES_SAMPLER_ARG`, 1.0 when unset. An unknown sampler is `parentbased_always_on`
//! and an argument that is no ratio from 0 to 1 is 1.0, each with one warning at start, as
//! the Go and Python SDKs do.

/// The variables, as OpenTelemetry names them.
pub(crate) const ENV_SAMPLER: &str = "OTEL_TRACES_SAMPLER";
pub(crate) const ENV_SAMPLER_ARG: &str = "OTEL_TRACES_SAMPLER_ARG";

/// The decision a sampler makes for a call, parent or not.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Sampler {
    /// Whether a call with a valid parent follows its flag (the `parentbased_*` samplers).
    parent_based: bool,
    /// What decides a call without a parent, and every call when not parent-based.
    root: Root,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Root {
    AlwaysOn,
    AlwaysOff,
    /// A trace is sampled when the last 8 bytes of its id, shifted right by one, are below
    /// this bound (`ratio * 2^63`), as OpenTelemetry Go's `TraceIDRatioBased` decides: the
    /// plugin and a Go service sample the same traces at the same ratio.
    TraceIdRatio(u64),
}

impl Default for Sampler {
    /// `parentbased_always_on`: OpenTelemetry's default.
    fn default() -> Self {
        Sampler {
            parent_based: true,
            root: Root::AlwaysOn,
        }
    }
}

impl Sampler {
    /// The sampler the variables name, and the warning to give when one of them was
    /// unusable (the fallback is then in use). The values are quoted, cut short: they
    /// name a sampler or a ratio, never a credential.
    pub(crate) fn from_vars<'a>(var: impl Fn(&str) -> &'a str) -> (Sampler, Option<String>) {
        let name = var(ENV_SAMPLER).trim().to_ascii_lowercase();
        let (parent_based, root) = match name.as_str() {
            "" | "parentbased_always_on" => (true, "always_on"),
            "always_on" | "always_off" | "traceidratio" => (false, name.as_str()),
            "parentbased_always_off" => (true, "always_off"),
            "parentbased_traceidratio" => (true, "traceidratio"),
            _ => {
                let warning = format!(
                    "{ENV_SAMPLER} must be always_on, always_off, traceidratio, \
                     parentbased_always_on, parentbased_always_off or parentbased_traceidratio, \
                     not {}; using parentbased_always_on",
                    quoted(&name)
                );
                return (Sampler::default(), Some(warning));
            }
        };
        let mut warning = None;
        let root = match root {
            "always_on" => Root::AlwaysOn,
            "always_off" => Root::AlwaysOff,
            _ => {
                let arg = var(ENV_SAMPLER_ARG).trim();
                let ratio = match arg.parse::<f64>() {
                    _ if arg.is_empty() => 1.0,
                    Ok(ratio) if (0.0..=1.0).contains(&ratio) => ratio,
                    _ => {
                        warning = Some(format!(
                            "{ENV_SAMPLER_ARG} must be a ratio from 0 to 1, not {}; using 1.0",
                            quoted(arg)
                        ));
                        1.0
                    }
                };
                // 2^63 at 1.0 still fits: every trace is below it.
                Root::TraceIdRatio((ratio * 2f64.powi(63)) as u64)
            }
        };
        (Sampler { parent_based, root }, warning)
    }

    /// Whether the span of a call in trace `trace_id` is sampled, given the sampled flag
    /// of its parent (`None`: no valid parent, the span is a root).
    pub(crate) fn sampled(&self, parent_sampled: Option<bool>, trace_id: &[u8; 16]) -> bool {
        if let (true, Some(sampled)) = (self.parent_based, parent_sampled) {
            return sampled;
        }
        match self.root {
            Root::AlwaysOn => true,
            Root::AlwaysOff => false,
            Root::TraceIdRatio(bound) => {
                let low = u64::from_be_bytes(trace_id[8..].try_into().expect("8 bytes"));
                (low >> 1) < bound
            }
        }
    }
}

/// `text` for a warning: quoted, its control characters escaped, cut to 40 characters.
fn quoted(text: &str) -> String {
    let cut: String = text.chars().take(40).collect();
    let more = if cut.len() < text.len() { "…" } else { "" };
    format!("{:?}{more}", cut)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(sampler: &str, arg: &str) -> (Sampler, Option<String>) {
        let vars: HashMap<&str, &str> = [(ENV_SAMPLER, sampler), (ENV_SAMPLER_ARG, arg)]
            .into_iter()
            .collect();
        Sampler::from_vars(|name| vars.get(name).copied().unwrap_or(""))
    }

    const LOW: [u8; 16] = [
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 1,
    ];
    const HIGH: [u8; 16] = [
        0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    ];

    /// (no parent, a sampled parent, an unsampled parent) for a trace whose id is `LOW`.
    fn decisions(sampler: &Sampler) -> [bool; 3] {
        [None, Some(true), Some(false)].map(|parent| sampler.sampled(parent, &LOW))
    }

    #[test]
    fn each_sampler_decides_as_opentelemetrys() {
        for (name, arg, expected) in [
            ("", "", [true, true, false]),
            ("always_on", "", [true, true, true]),
            ("always_off", "", [false, false, false]),
            ("traceidratio", "0", [false, false, false]),
            ("traceidratio", "1", [true, true, true]),
            ("traceidratio", "", [true, true, true]),
            ("parentbased_always_on", "", [true, true, false]),
            ("parentbased_always_off", "", [false, true, false]),
            ("parentbased_traceidratio", "0", [false, true, false]),
            (" Always_Off ", "", [false, false, false]),
        ] {
            let (sampler, warning) = from(name, arg);
            assert_eq!(decisions(&sampler), expected, "{name} {arg}");
            assert_eq!(warning, None, "{name} {arg}");
        }
    }

    #[test]
    fn a_ratio_samples_the_traces_whose_id_ends_low() {
        let (half, _) = from("traceidratio", "0.5");
        assert!(half.sampled(None, &LOW));
        assert!(!half.sampled(None, &HIGH));
        let (all, _) = from("traceidratio", "1.0");
        assert!(all.sampled(None, &HIGH));
        let (tiny, _) = from("traceidratio", "0.000001");
        assert!(tiny.sampled(None, &LOW) && !tiny.sampled(None, &HIGH));
    }

    #[test]
    fn an_unknown_sampler_is_parentbased_always_on_with_a_warning() {
        let (sampler, warning) = from("sometimes\n", "");
        assert_eq!(sampler, Sampler::default());
        let warning = warning.unwrap();
        assert!(warning.contains("OTEL_TRACES_SAMPLER must be"), "{warning}");
        assert!(
            warning.contains("\"sometimes\"; using parentbased_always_on"),
            "{warning}"
        );
        let (_, long) = from(&"x".repeat(1000), "");
        assert!(long.unwrap().len() < 300);
    }

    #[test]
    fn an_argument_that_is_no_ratio_is_one_with_a_warning() {
        for arg in ["lots", "1.5", "-0.1", "NaN", "inf"] {
            for name in ["traceidratio", "parentbased_traceidratio"] {
                let (sampler, warning) = from(name, arg);
                assert!(sampler.sampled(None, &HIGH), "{name} {arg}");
                let warning = warning.unwrap();
                assert!(
                    warning.starts_with("OTEL_TRACES_SAMPLER_ARG must be a ratio from 0 to 1"),
                    "{warning}"
                );
                assert!(warning.ends_with("; using 1.0"), "{warning}");
            }
        }
        // Parent-based still follows the parent.
        let (sampler, _) = from("parentbased_traceidratio", "lots");
        assert!(!sampler.sampled(Some(false), &LOW));
        // Only a ratio sampler reads the argument.
        assert_eq!(from("always_off", "lots").1, None);
    }
}
