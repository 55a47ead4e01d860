//! Write LinchKit dispatcher plugins in Rust: register methods, lifecycle hooks and event
//! handlers on a [`Plugin`], then call [`Plugin::serve`]. The SDK speaks the plugin protocol
//! (docs/protocol.md) over gRPC, either as a subprocess plugin started by the host with the
//! handshake environment, or as a network service (`my-plugin serve --address 127.0.0.1:0`).
//!
//! ```no_run
//! use linchkit_plugin::{Call, Error, Json, Plugin};
//!
//! fn main() {
//!     Plugin::new("example", "1.0.0")
//!         .method("echo", "returns its params", |call: Call| async move {
//!             Ok::<Json, Error>(call.raw_params().clone())
//!         })
//!         .serve()
//! }
//! ```
//!
//! A method fails with an [`Error`] (type, message, retryable, details), answered inside
//! `CallReply.error`. A method that panics answers a `PluginError`; the plugin goes on.
//!
//! ## How the crate is layered
//!
//! The modules from the top down. A module uses only modules on the lines below its own,
//! never one above it or beside it on its line, so no two modules use each other:
//!
//! 1. `serve`: [`Plugin::serve`] and [`Plugin::run`], the subprocess handshake and the
//!    gRPC `serve`; `connect` and `serve --websocket` go to `websocket`.
//! 2. `websocket`: the WebSocket binding, both modes (its parts, top down, in its docs).
//! 3. `command_line`: what the `serve` and `connect` command lines share (the program's
//!    name, the default address and its check, a refused argument's words) | `registry`:
//!    the gRPC service's etcd registration (`registry::gateway` over `registry::settings`).
//! 4. `service`: the plugin service both bindings call through: calls, hooks, the
//!    `Events` streams, the stop.
//! 5. `tracing`: a call's span.
//! 6. This file's types: [`Plugin`], [`Call`], [`ChunkSender`], [`PROTOCOL_VERSION`].
//! 7. `events`: plugin events to the hosts' streams | `otlp`: the span exporter and its
//!    settings | `sampler` | `hosts`: the hosts attached | `size_status` | `late_streams` |
//!    `late_answers`: the warning for a method that answered long after its deadline |
//!    `tls`: AutoMTLS | `auth`: the bearer token | `stop`: the stop's caps | `process`: what
//!    the process gives the plugin ([`Environment`]) and why it cannot serve
//!    ([`ServeError`]).
//! 8. `json`: [`Json`], what cannot be JSON refused.
//! 9. `params`: the params' checks and decoding (and a raw value's before it is sent) |
//!    `finite`: the floats JSON has no form for, in a value serde serializes.
//! 10. `error`: the [`Error`] a method answers with.
//! 11. `log`: the SDK's lines on stderr | `pb`: the protocol's generated code.
//!
//! This file also re-exports the public API from the modules that define it.

mod auth;
mod command_line;
mod error;
mod events;
mod finite;
mod hosts;
mod json;
mod late_answers;
mod late_streams;
mod log;
mod otlp;
mod params;
mod process;
mod registry;
mod sampler;
mod serve;
mod service;
mod size_status;
mod stop;
mod tls;
mod tracing;
mod websocket;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, RwLock};

use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::time::Instant;

pub use auth::{ENV_TOKEN, ENV_TOKEN_FILE};
pub use error::{types, Error};
pub use events::Emitter;
pub use json::Json;
pub use process::{Environment, ServeError};
pub use stop::{ENV_STOP_GRACE_MS, ENV_STOP_HOOKS_MS, MAX_STOP_MS};

/// The protocol's generated types and gRPC service (package `linchkit.plugin.v1`).
pub mod pb {
    tonic::include_proto!("linchkit.plugin.v1");
}

/// The version of the plugin protocol this SDK speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// The health service name of the plugin service.
pub const SERVICE_NAME: &str = "linchkit.plugin.v1.PluginService";

/// One invocation of a method: its params and the context the host sent.
pub struct Call {
    pub method: String,
    pub request_id: String,
    pub caller: String,
    pub traceparent: String,
    pub idempotency_key: String,
    /// When the call's deadline passes (from `deadline_ms`). The SDK stops waiting for the
    /// method then and answers `deadline_exceeded`; CPU-bound code may check it to stop early.
    pub deadline: Option<Instant>,
    /// The traceparent of the span the call runs in, with tracing on (docs/observability.md).
    span_traceparent: Option<String>,
    params: Json,
    config: Arc<Json>,
    emitter: Emitter,
}

impl Call {
    /// Decodes the params; a decoding failure (a missing field, a wrong type) is answered
    /// as `invalid_params`. A struct or a map takes named params (a struct positional ones
    /// too: an array fills its fields in order): a string, a number or a boolean is
    /// refused, "greet takes an object of named params, got a string", as the TypeScript
    /// and Java SDKs say it. A field of the wrong kind names the
    /// param and what it takes in JSON's words, never a Rust type: "greet: 'name' must be
    /// a string, got 5".
    pub fn params<T: DeserializeOwned>(&self) -> Result<T, Error> {
        params::decode(&self.method, self.params.as_bytes())
    }

    /// The params as the host sent them (`null` when it sent none).
    pub fn raw_params(&self) -> &Json {
        &self.params
    }

    /// The config JSON the host passed to `Init` (`{}` before `Init`).
    pub fn config(&self) -> &Json {
        &self.config
    }

    /// The W3C `traceparent` of the SERVER span the SDK runs this call in, when the
    /// plugin's environment names an OTLP endpoint (`OTEL_EXPORTER_OTLP_ENDPOINT` or
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`): the parent for the spans the method starts
    /// and the requests it sends, so they continue the trace under the call's span. `None`
    /// with tracing off; [`traceparent`](Call::traceparent) is what the host sent.
    pub fn span_traceparent(&self) -> Option<&str> {
        self.span_traceparent.as_deref()
    }

    /// Sends a plugin event to the host (see [`Emitter::emit`]).
    pub fn emit(&self, name: &str, data: Json) {
        self.emitter.emit(name, data);
    }
}

/// Sends the chunks of a streaming method, in order.
#[derive(Clone)]
pub struct ChunkSender {
    chunks: mpsc::Sender<Json>,
    /// Why a chunk was refused, which ends the stream: set once, by the first.
    refused: Arc<OnceLock<Error>>,
}

impl ChunkSender {
    /// A sender of `chunks`, and where the refusal of one is read once the method returned
    /// (not a clone of the sender: that would hold the stream open).
    pub(crate) fn new(chunks: mpsc::Sender<Json>) -> (Self, Arc<OnceLock<Error>>) {
        let refused = Arc::<OnceLock<Error>>::default();
        let sender = ChunkSender {
            chunks,
            refused: refused.clone(),
        };
        (sender, refused)
    }

    /// Sends one chunk; fails when the host stopped listening. A chunk JSON cannot carry
    /// (a [`Json::raw`] that is no JSON) is not sent: it fails with the `provider_error`
    /// the stream then ends with, as do the sends after it, whether or not the method
    /// returns that error.
    pub async fn send(&self, chunk: impl Into<Json>) -> Result<(), Error> {
        if let Some(refusal) = self.refused.get() {
            return Err(refusal.clone());
        }
        let chunk = chunk
            .into()
            .sendable()
            .map_err(|refusal| self.refused.get_or_init(|| refusal).clone())?;
        self.chunks
            .send(chunk)
            .await
            .map_err(|_| Error::deadline_exceeded("the host stopped reading the stream"))
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type UnaryFn = Arc<dyn Fn(Call) -> BoxFuture<Result<Json, Error>> + Send + Sync>;
type StreamFn = Arc<dyn Fn(Call, ChunkSender) -> BoxFuture<Result<(), Error>> + Send + Sync>;
type InitFn = Arc<dyn Fn(Json) -> BoxFuture<Result<(), Error>> + Send + Sync>;
type HookFn = Arc<dyn Fn() -> BoxFuture<Result<(), Error>> + Send + Sync>;
type EventFn = Arc<dyn Fn(Json, &Emitter) + Send + Sync>;

#[derive(Clone)]
enum Handler {
    Unary(UnaryFn),
    Stream(StreamFn),
}

struct Method {
    description: String,
    handler: Handler,
}

#[derive(Default, Clone)]
struct Hooks {
    init: Option<InitFn>,
    start: Option<HookFn>,
    stop: Option<HookFn>,
    destroy: Option<HookFn>,
}

/// What a plugin offers. Build it, then [`serve`](Plugin::serve) it.
pub struct Plugin {
    id: String,
    version: String,
    methods: HashMap<String, Method>,
    order: Vec<String>,
    hooks: Hooks,
    handlers: HashMap<String, EventFn>,
    emitter: Emitter,
    config: Arc<RwLock<Arc<Json>>>,
}

impl Plugin {
    pub fn new(id: impl Into<String>, version: impl Into<String>) -> Self {
        Plugin {
            id: id.into(),
            version: version.into(),
            methods: HashMap::new(),
            order: Vec::new(),
            hooks: Hooks::default(),
            handlers: HashMap::new(),
            emitter: Emitter::new(),
            config: Arc::new(RwLock::new(Arc::new(Json::raw("{}")))),
        }
    }

    /// Registers a unary method.
    pub fn method<F, Fut>(self, name: &str, description: &str, method: F) -> Self
    where
        F: Fn(Call) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Json, Error>> + Send + 'static,
    {
        let handler: UnaryFn = Arc::new(move |call| Box::pin(method(call)));
        self.register(name, description, Handler::Unary(handler))
    }

    /// Registers a streaming method (`CallStream`); called with a unary `Call`, the host
    /// gets the list of its chunks.
    pub fn streaming_method<F, Fut>(self, name: &str, description: &str, method: F) -> Self
    where
        F: Fn(Call, ChunkSender) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), Error>> + Send + 'static,
    {
        let handler: StreamFn = Arc::new(move |call, chunks| Box::pin(method(call, chunks)));
        self.register(name, description, Handler::Stream(handler))
    }

    fn register(mut self, name: &str, description: &str, handler: Handler) -> Self {
        let method = Method {
            description: description.to_string(),
            handler,
        };
        if self.methods.insert(name.to_string(), method).is_some() {
            panic!("plugin {}: method {name:?} registered twice", self.id);
        }
        self.order.push(name.to_string());
        self
    }

    /// The hook run by `Init` with the host's config JSON.
    pub fn on_init<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(Json) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), Error>> + Send + 'static,
    {
        self.hooks.init = Some(Arc::new(move |config| Box::pin(hook(config))));
        self
    }

    /// The hook run by `Start`.
    pub fn on_start<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), Error>> + Send + 'static,
    {
        self.hooks.start = Some(Arc::new(move || Box::pin(hook())));
        self
    }

    /// The hook run by `Stop` from the last host attached, and at shutdown if no `Stop` ran it
    /// since the last `Start`.
    pub fn on_stop<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), Error>> + Send + 'static,
    {
        self.hooks.stop = Some(Arc::new(move || Box::pin(hook())));
        self
    }

    /// The hook run by `Destroy` from the last host attached, and at shutdown if no `Destroy`
    /// ran it since the last `Init`.
    pub fn on_destroy<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), Error>> + Send + 'static,
    {
        self.hooks.destroy = Some(Arc::new(move || Box::pin(hook())));
        self
    }

    /// The handler of host events with this name; other names are ignored.
    pub fn on_event<F>(mut self, name: &str, handler: F) -> Self
    where
        F: Fn(Json, &Emitter) + Send + Sync + 'static,
    {
        self.handlers.insert(name.to_string(), Arc::new(handler));
        self
    }

    /// Emits plugin events from outside a call (a background task, a hook).
    pub fn emitter(&self) -> Emitter {
        self.emitter.clone()
    }
}
