//! The example plugin of docs/protocol.md ("The example plugin, in every language"),
//! written on the Rust SDK. Every SDK ships the same one, so one conformance suite runs
//! against all of them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use linchkit_plugin::{Call, ChunkSender, Error, Json, Plugin};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

#[derive(Deserialize)]
struct DigestParams {
    data: String,
    rounds: u64,
}

#[derive(Deserialize)]
struct FailParams {
    message: String,
}

#[derive(Deserialize)]
struct SleepParams {
    ms: u64,
}

#[derive(Deserialize)]
struct HooksParams {
    #[serde(default)]
    after_ms: u64,
}

/// The most letters x `pad` asks for (64 MiB): the suite's largest chunk is 9 MB, and a
/// caller's 2**40 must be refused before it is allocated (`"x".repeat` of a terabyte
/// aborts the process).
const MAX_PAD: u64 = 64 << 20;
/// The most chunks `count` sends: a unary call collects them all before it answers.
const MAX_COUNT: u64 = 1_000_000;

#[derive(Deserialize)]
struct CountParams {
    /// At most [`MAX_COUNT`].
    n: u64,
    /// Each chunk carries `pad` letters x too (0: none, at most [`MAX_PAD`]), to make a
    /// chunk of a given size.
    #[serde(default)]
    pad: u64,
}

#[derive(Deserialize)]
struct NonFiniteParams {
    value: String,
}

/// What `non_finite` returns: a plain struct, as a plugin author's result is.
#[derive(Serialize)]
struct NonFinite {
    x: f64,
}

#[derive(Deserialize)]
struct EmitParams {
    name: String,
    #[serde(default)]
    data: serde_json::Value,
    /// The event's data is `pad` letters x instead (0: `data`; at most [`MAX_PAD`]).
    #[serde(default)]
    pad: u64,
}

/// `pad` letters x, or `invalid_params` past [`MAX_PAD`] (before anything is allocated).
fn padding(pad: u64) -> Result<String, Error> {
    if pad > MAX_PAD {
        return Err(Error::invalid_params(format!(
            "pad must be at most {MAX_PAD} (64 MiB), got {pad}"
        )));
    }
    let letters = usize::try_from(pad).expect("at most 64 MiB fits a usize");
    Ok("x".repeat(letters))
}

async fn echo(call: Call) -> Result<Json, Error> {
    Ok(call.raw_params().clone())
}

async fn digest(call: Call) -> Result<Json, Error> {
    let params: DigestParams = call.params()?;
    // CPU-bound: off the async workers, so other calls go on meanwhile.
    let hex = tokio::task::spawn_blocking(move || {
        let mut value = params.data.into_bytes();
        for _ in 0..params.rounds {
            value = Sha256::digest(&value).to_vec();
        }
        hex::encode(value)
    })
    .await
    .map_err(|err| Error::new("PluginError", format!("digest failed: {err}")))?;
    Ok(json!(hex).into())
}

async fn fail(call: Call) -> Result<Json, Error> {
    let params: FailParams = call.params()?;
    Err(Error::new("ExampleFailure", params.message))
}

/// Sleeps; the SDK answers `deadline_exceeded` when the call's deadline passes first.
async fn sleep(call: Call) -> Result<Json, Error> {
    let params: SleepParams = call.params()?;
    tokio::time::sleep(Duration::from_millis(params.ms)).await;
    Ok(json!({ "slept_ms": params.ms }).into())
}

async fn count(call: Call, chunks: ChunkSender) -> Result<(), Error> {
    let params: CountParams = call.params()?;
    if params.n > MAX_COUNT {
        return Err(Error::invalid_params(format!(
            "n must be at most {MAX_COUNT}, got {}",
            params.n
        )));
    }
    let pad = padding(params.pad)?;
    for i in 0..params.n {
        if params.pad > 0 {
            chunks.send(json!({ "i": i, "pad": pad })).await?;
        } else {
            chunks.send(json!({ "i": i })).await?;
        }
    }
    Ok(())
}

async fn emit(call: Call) -> Result<Json, Error> {
    let params: EmitParams = call.params()?;
    let data = if params.pad > 0 {
        json!(padding(params.pad)?)
    } else {
        params.data
    };
    call.emit(&params.name, data.into());
    Ok(json!(true).into())
}

/// `{"x": NaN}`, `+inf` or `-inf` as `value` says: a result JSON cannot carry, which
/// `Json::encode` refuses, so the call answers `provider_error`.
async fn non_finite(call: Call) -> Result<Json, Error> {
    let params: NonFiniteParams = call.params()?;
    let x = match params.value.as_str() {
        "nan" => f64::NAN,
        "inf" => f64::INFINITY,
        "-inf" => f64::NEG_INFINITY,
        other => {
            let shown: String = other.chars().take(40).collect();
            return Err(Error::invalid_params(format!(
                "'value' must be \"nan\", \"inf\" or \"-inf\", got {shown:?}"
            )));
        }
    };
    Json::encode(&NonFinite { x })
}

/// `{"text": "smile \ud83d"}`: half an emoji, a string that is not valid Unicode. A Rust
/// `String` cannot hold one, so it is pre-built JSON holding a lone surrogate escape (as
/// a UTF-16 string cut inside "😀" encodes); the SDK refuses it when it is sent, so the
/// call answers `provider_error`. Any params are ignored.
async fn not_unicode(_: Call) -> Result<Json, Error> {
    Ok(Json::raw(r#"{"text":"smile \ud83d"}"#))
}

async fn config(call: Call) -> Result<Json, Error> {
    Ok(call.config().clone())
}

/// How many times each of the plugin's lifecycle hooks ran, for the `hooks` method, the
/// hook the last config's `fail_hook` names, and whether it asked for `say_hooks`.
#[derive(Default)]
struct HookCounts {
    init: AtomicU64,
    start: AtomicU64,
    stop: AtomicU64,
    destroy: AtomicU64,
    fail_hook: Mutex<Option<String>>,
    say_hooks: AtomicBool,
    stall_hook: Mutex<Option<String>>,
}

#[derive(Deserialize)]
struct HookConfig {
    fail_hook: Option<String>,
    #[serde(default)]
    say_hooks: bool,
    stall_hook: Option<String>,
}

impl HookCounts {
    fn ran(counter: &AtomicU64) -> Result<(), Error> {
        counter.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// A config's `say_hooks` has the stop and destroy hooks each write a line to stderr:
    /// how the conformance suite sees that they ran once the process is gone.
    fn say_if_asked(&self, hook: &str) {
        if self.say_hooks.load(Ordering::SeqCst) {
            eprintln!("example: {hook} hook ran");
        }
    }

    /// A config's `stall_hook` has that hook never return (a close stuck on a peer that
    /// does not answer): how the conformance suite sees that a stop does not wait for it.
    fn stalls(&self, hook: &str) -> bool {
        let named = self.stall_hook.lock().unwrap_or_else(|p| p.into_inner());
        named.as_deref() == Some(hook)
    }

    /// Fails the hook the config's `fail_hook` names: how the conformance suite sees what
    /// the SDK answers a failing hook.
    fn fail_if_named(&self, hook: &str) -> Result<(), Error> {
        let named = self.fail_hook.lock().unwrap_or_else(|p| p.into_inner());
        if named.as_deref() == Some(hook) {
            return Err(Error::new("BadConfig", format!("fail_hook names {hook}")));
        }
        Ok(())
    }
}

fn main() {
    let counts = Arc::new(HookCounts::default());
    let (on_init, on_start, on_stop, on_destroy, reported) = (
        counts.clone(),
        counts.clone(),
        counts.clone(),
        counts.clone(),
        counts,
    );
    Plugin::new("example", "1.0.0")
        .method("echo", "returns the params unchanged", echo)
        .method(
            "digest",
            "hex SHA-256 of data applied rounds times (CPU-bound)",
            digest,
        )
        .method("fail", "fails with the business error ExampleFailure", fail)
        .method(
            "sleep",
            "sleeps ms milliseconds, giving up at the call's deadline",
            sleep,
        )
        .streaming_method(
            "count",
            "streams {\"i\": 0} … {\"i\": n-1} (n at most 1000000), each with \"pad\": pad letters x when pad > 0 (at most 64 MiB)",
            count,
        )
        .method(
            "emit",
            "emits plugin event name with data (pad > 0: a string of pad letters x, at most 64 MiB)",
            emit,
        )
        .method("config", "the config object passed to Init", config)
        .method(
            "hooks",
            "how many times each lifecycle hook ran, counted after_ms from now",
            move |call: Call| {
                let counts = reported.clone();
                async move {
                    // Counted later: whether a stop ran the hooks under a call in flight.
                    let params: Option<HooksParams> = call.params()?;
                    let after_ms = params.map_or(0, |p| p.after_ms);
                    tokio::time::sleep(Duration::from_millis(after_ms)).await;
                    let count = |counter: &AtomicU64| counter.load(Ordering::SeqCst);
                    Ok(json!({
                        "init": count(&counts.init),
                        "start": count(&counts.start),
                        "stop": count(&counts.stop),
                        "destroy": count(&counts.destroy),
                    })
                    .into())
                }
            },
        )
        .method(
            "non_finite",
            "returns {\"x\": NaN, Infinity or -Infinity} as value (\"nan\", \"inf\", \"-inf\") says: a result JSON cannot carry",
            non_finite,
        )
        .method(
            "not_unicode",
            "returns {\"text\": \"smile \\ud83d\"} (half an emoji, a lone surrogate): a result that is not valid Unicode",
            not_unicode,
        )
        // The SDK keeps the config for `config`; the hooks count, and fail or say so when asked.
        .on_init(move |config: Json| {
            let ran = HookCounts::ran(&on_init.init);
            let asked = config.decode::<HookConfig>().ok();
            let say = asked.as_ref().is_some_and(|c| c.say_hooks);
            on_init.say_hooks.store(say, Ordering::SeqCst);
            let stall = asked.as_ref().and_then(|c| c.stall_hook.clone());
            *on_init.stall_hook.lock().unwrap_or_else(|p| p.into_inner()) = stall;
            let named = asked.and_then(|c| c.fail_hook);
            *on_init.fail_hook.lock().unwrap_or_else(|p| p.into_inner()) = named;
            let ran = ran.and_then(|()| on_init.fail_if_named("init"));
            async move { ran }
        })
        .on_start(move || {
            let ran =
                HookCounts::ran(&on_start.start).and_then(|()| on_start.fail_if_named("start"));
            async move { ran }
        })
        .on_stop(move || {
            let ran = HookCounts::ran(&on_stop.stop);
            on_stop.say_if_asked("stop");
            let stall = on_stop.stalls("stop");
            async move {
                if stall {
                    std::future::pending::<()>().await;
                }
                ran
            }
        })
        .on_destroy(move || {
            let ran = HookCounts::ran(&on_destroy.destroy);
            on_destroy.say_if_asked("destroy");
            let stall = on_destroy.stalls("destroy");
            async move {
                if stall {
                    std::future::pending::<()>().await;
                }
                ran
            }
        })
        .on_event("ping", |data, events| events.emit("pong", data))
        // A handler that fails: the SDK logs it at ERROR and goes on.
        .on_event("fail", |data, _| {
            let event: FailParams = data.decode().unwrap_or(FailParams {
                message: String::new(),
            });
            panic!("{}", event.message)
        })
        .serve()
}
