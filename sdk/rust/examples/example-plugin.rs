//! The example plugin of docs/protocol.md ("The example plugin, in every language"),
//! written on the Rust SDK. Every SDK ships the same one, so one conformance suite runs
//! against all of them.

use std::time::Duration;

use linchkit_plugin::{Call, ChunkSender, Error, Json, Plugin};
use serde::Deserialize;
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
struct CountParams {
    n: u64,
}

#[derive(Deserialize)]
struct EmitParams {
    name: String,
    #[serde(default)]
    data: serde_json::Value,
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
    for i in 0..params.n {
        chunks.send(json!({ "i": i })).await?;
    }
    Ok(())
}

async fn emit(call: Call) -> Result<Json, Error> {
    let params: EmitParams = call.params()?;
    call.emit(&params.name, params.data.into());
    Ok(json!(true).into())
}

async fn config(call: Call) -> Result<Json, Error> {
    Ok(call.config().clone())
}

fn main() {
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
        .streaming_method("count", "streams {\"i\": 0} … {\"i\": n-1}", count)
        .method("emit", "emits plugin event name with data", emit)
        .method("config", "the config object passed to Init", config)
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
