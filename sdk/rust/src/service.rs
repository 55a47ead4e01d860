//! The `PluginService` RPCs for one plugin.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::events::EventStream;
use crate::hosts::{host_of, AttachedHosts, MAX_HOSTS};
use crate::late_answers::LateAnswers;
use crate::pb::plugin_service_server::PluginService;
use crate::size_status::restated;
use crate::tracing::{CallSpan, Tracer};

/// The most calls one `CallBatch` may carry: the dispatcher's batcher sends at most this
/// many (docs/protocol.md).
pub const MAX_BATCH_CALLS: usize = 10_000;
use crate::{
    pb, types, Call, ChunkSender, Emitter, Error, EventFn, Handler, Hooks, Json, Method, Plugin,
    PROTOCOL_VERSION, SERVICE_NAME,
};

/// What the lifecycle RPCs left behind; one lock, as tonic runs RPCs concurrently.
#[derive(Default)]
struct Lifecycle {
    /// The hosts attached now: the last to leave runs the stop and destroy hooks.
    hosts: AttachedHosts,
    /// The init hook ran, and the destroy hook has not since.
    inited: bool,
    /// The start hook ran, and the stop hook has not since.
    started: bool,
}

/// Everything the RPCs share, built once from the [`Plugin`] when it starts serving.
pub(crate) struct Shared {
    id: String,
    version: String,
    methods: HashMap<String, Method>,
    order: Vec<String>,
    hooks: Hooks,
    handlers: Arc<HashMap<String, EventFn>>,
    emitter: Emitter,
    config: Arc<RwLock<Arc<Json>>>,
    health: HealthReporter,
    lifecycle: Mutex<Lifecycle>,
    /// A service (`serve --address`) outlives its hosts: SERVING until it shuts down.
    service: bool,
    /// Each call's span goes here; `None` (tracing off) unless the environment names an
    /// OTLP endpoint.
    tracer: Option<Tracer>,
    /// The methods said to have answered long after their deadlines, and when.
    late: LateAnswers,
}

impl Shared {
    pub(crate) async fn new(
        plugin: Plugin,
        health: HealthReporter,
        serving_from_start: bool,
        tracer: Option<Tracer>,
    ) -> Arc<Self> {
        let shared = Arc::new(Shared {
            id: plugin.id,
            version: plugin.version,
            methods: plugin.methods,
            order: plugin.order,
            hooks: plugin.hooks,
            handlers: Arc::new(plugin.handlers),
            emitter: plugin.emitter,
            config: plugin.config,
            health,
            lifecycle: Mutex::default(),
            service: serving_from_start,
            tracer,
            late: LateAnswers::default(),
        });
        shared.set_serving(serving_from_start).await;
        shared
    }

    async fn set_serving(&self, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.health.set_service_status("", status).await;
        self.health.set_service_status(SERVICE_NAME, status).await;
    }

    /// The first step of a stop, before the calls in flight are drained: reports
    /// NOT_SERVING and ends the `Events` streams, which never end by themselves.
    pub(crate) async fn stop_serving(&self) {
        self.set_serving(false).await;
        self.emitter.close();
    }

    /// Runs the stop and destroy hooks the host did not call, so a plugin ended by SIGTERM
    /// or by its host's death still cleans up. It comes after the drain: a stop hook that
    /// closes what the calls use must not pull it from under calls still running. Both
    /// together get `cap` (the stop's hooks cap: 5 s unless `LINCHKIT_PLUGIN_STOP_HOOKS_MS`
    /// sets it, `crate::stop`); a hook still running then is abandoned with a warning, and
    /// the destroy hook is not begun after an abandoned stop hook. What remains of `cap`
    /// when they end (none when one was abandoned) is for the spans still buffered.
    pub(crate) async fn run_remaining_hooks(&self, cap: Duration) -> Duration {
        let (need_stop, need_destroy) = {
            let state = self.lifecycle.lock().unwrap();
            (state.started, state.inited)
        };
        let hooks = [
            (need_stop, "stop", &self.hooks.stop),
            (need_destroy, "destroy", &self.hooks.destroy),
        ];
        // One deadline for both: each hook's own 5 s let a stuck stop hook and a stuck
        // destroy hook hold the exit 10 s, past what a host waits for before it kills.
        let deadline = Instant::now() + cap;
        for (needed, name, hook) in hooks {
            if let (true, Some(hook)) = (needed, hook) {
                let hook = hook.clone();
                match tokio::time::timeout_at(deadline, guarded(async move { hook().await })).await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(err)) => {
                        crate::log::error(&format!("{name} hook failed at shutdown: {err}"))
                    }
                    Err(_) => {
                        crate::log::warn(&format!(
                            "the {name} hook did not finish within {}s of the stop; \
                             exiting without it",
                            crate::stop::seconds(cap)
                        ));
                        return Duration::ZERO;
                    }
                }
            }
        }
        deadline.saturating_duration_since(Instant::now())
    }

    /// The last step of a stop, after the hooks: sends the spans still buffered, for
    /// `hooks_left` or the span flush margin when less remains (`crate::tracing`).
    pub(crate) async fn flush_spans(&self, hooks_left: Duration) {
        if let Some(tracer) = &self.tracer {
            tracer.flush_at_stop(hooks_left).await;
        }
    }

    /// Opens the span `call` runs in, with tracing on.
    fn start_span(&self, call: &mut Call) -> Option<CallSpan> {
        self.tracer.as_ref().map(|tracer| tracer.start(call))
    }

    fn mark<T>(&self, set: impl FnOnce(&mut Lifecycle) -> T) -> T {
        set(&mut self.lifecycle.lock().unwrap())
    }

    /// Takes the calling host out (docs/protocol.md, "Several hosts on one service"):
    /// whether another stays attached, when its `Stop` or `Destroy` runs nothing.
    fn others_stay<T>(&self, request: &Request<T>) -> Result<bool, Status> {
        let host = host_of(request.metadata())?;
        Ok(self.mark(|state| state.hosts.others_stay(&host)))
    }

    fn config(&self) -> Arc<Json> {
        self.config.read().unwrap().clone()
    }

    /// The answer to a call of a method the plugin lacks: the plugin's id and the methods
    /// it has, sorted, as the TypeScript and Java SDKs say it.
    fn method_not_found(&self, name: &str) -> Error {
        let mut known: Vec<&str> = self.methods.keys().map(String::as_str).collect();
        known.sort_unstable();
        let known = if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        };
        Error::new(
            types::METHOD_NOT_FOUND,
            format!(
                "plugin {} has no method {}; it has: {known}",
                self.id,
                crate::error::shown_name(name)
            ),
        )
    }

    /// Checks the envelope and finds the method: the call, its handler and the method's
    /// name as registered (borrowed: a late answer's warning names it without a copy a
    /// call), or the error.
    fn prepare(&self, request: pb::CallRequest) -> Result<(Call, Handler, &str), Error> {
        if request.v != 0 && request.v != PROTOCOL_VERSION {
            return Err(Error::new(
                types::PROVIDER_ERROR,
                format!(
                    "envelope version {} is not supported; this plugin speaks {PROTOCOL_VERSION}",
                    request.v
                ),
            ));
        }
        let (name, method) = self
            .methods
            .get_key_value(&request.method)
            .ok_or_else(|| self.method_not_found(&request.method))?;
        // Checked: echoed back as a result, they are not checked again.
        let params = Json::from_wire(request.params_json)
            .checked()
            .map_err(|why| Error::invalid_params(format!("params of {} {why}", request.method)))?;
        let context = request.context.unwrap_or_default();
        // Only a positive deadline_ms bounds the call (0 is none, a negative one a host's
        // mistake); one no clock can hold (2^63-1 ms) is no bound either, not a panic.
        let deadline = (context.deadline_ms > 0)
            .then(|| Instant::now().checked_add(Duration::from_millis(context.deadline_ms as u64)))
            .flatten();
        let call = Call {
            method: request.method,
            request_id: context.request_id,
            caller: context.caller,
            traceparent: context.traceparent,
            idempotency_key: context.idempotency_key,
            deadline,
            span_traceparent: None,
            params,
            config: self.config(),
            emitter: self.emitter.clone(),
        };
        Ok((call, method.handler.clone(), name))
    }

    /// Runs one unary call; never fails: every failure is a `CallReply` error. A call the
    /// SDK cannot route (no such method, bad params) gets no span, as in the Go SDK.
    pub(crate) async fn invoke(&self, request: pb::CallRequest) -> pb::CallReply {
        match self.answer(request).await {
            Ok(result) => pb::CallReply {
                ok: true,
                result_json: result.into_bytes(),
                error: None,
            },
            Err(err) => error_reply(&err),
        }
    }

    /// Runs one unary call ([`invoke`](Shared::invoke)): its result, sent as JSON (a raw
    /// one checked, once), or its error. The WebSocket binding frames it as it is: what
    /// is known of the result's bytes spares it a second look at them.
    pub(crate) async fn answer(&self, request: pb::CallRequest) -> Result<Json, Error> {
        let (mut call, handler, name) = self.prepare(request)?;
        let span = self.start_span(&mut call);
        let outcome = match (call, handler) {
            (call, Handler::Unary(method)) => {
                let deadline = call.deadline;
                self.within(name, deadline, guarded(method(call))).await
            }
            (call, handler @ Handler::Stream(_)) => {
                // A streaming method called once: the list of its chunks.
                let deadline = call.deadline;
                let (sender, mut receiver) = mpsc::channel::<Json>(64);
                let run = run_streamed(handler, call, sender);
                let collect = async move {
                    let mut list = crate::json::List::new(); // of chunks each sent as JSON
                    while let Some(chunk) = receiver.recv().await {
                        list.push(&chunk);
                    }
                    list.end()
                };
                self.within(name, deadline, async move {
                    let (outcome, list) = tokio::join!(run, collect);
                    outcome.map(|()| list)
                })
                .await
            }
        };
        // A raw result that is no JSON is this call's error, as an encoded NaN is.
        let outcome = outcome.and_then(Json::sendable);
        if let Some(span) = span {
            span.end(outcome.as_ref().err());
        }
        outcome
    }

    /// Bounds `work`, a call of `method`, by the call's deadline: past it the work is
    /// dropped (and its task aborted) and the answer is `deadline_exceeded`; over gRPC and
    /// WebSocket alike. tokio's timeout polls the work before its timer, so work that held
    /// its runtime worker past the deadline is answered as it finished: its answer stands,
    /// and a warning says why the host saw a timeout (`crate::late_answers`).
    pub(crate) async fn within<T>(
        &self,
        method: &str,
        deadline: Option<Instant>,
        work: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        let Some(deadline) = deadline else {
            return work.await;
        };
        match tokio::time::timeout_at(deadline, work).await {
            Ok(answer) => {
                self.late.check(method, deadline);
                answer
            }
            Err(_) => Err(Error::deadline_exceeded(
                "the call's deadline passed before the method finished",
            )),
        }
    }
}

fn error_reply(err: &Error) -> pb::CallReply {
    pb::CallReply {
        ok: false,
        result_json: Vec::new(),
        error: Some(err.to_proto()),
    }
}

/// Aborts the task when the caller stops waiting for it (deadline, cancelled RPC).
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs a method for a stream, over gRPC or WebSocket (or its chunks' list, called once):
/// a streaming method sends its chunks itself, a unary method's result is the one chunk.
/// A chunk JSON cannot carry ends the stream with its refusal, even when the method went
/// on without returning it (`ChunkSender::send`).
pub(crate) async fn run_streamed(
    handler: Handler,
    call: Call,
    chunks: mpsc::Sender<Json>,
) -> Result<(), Error> {
    let (chunks, refused) = ChunkSender::new(chunks);
    let outcome = match handler {
        Handler::Stream(method) => guarded(method(call, chunks)).await,
        Handler::Unary(method) => match guarded(method(call)).await {
            Ok(result) => chunks.send(result).await,
            Err(err) => Err(err),
        },
    };
    match refused.get() {
        Some(refusal) => Err(refusal.clone()),
        None => outcome,
    }
}

/// A stream's method (`run`) and the sending of its chunks (`forward`), to the stream's
/// end: the chunks a failed method sent still go out before its error (try_join! dropped
/// those not yet forwarded), and a send that fails (a chunk over the cap, the connection
/// gone) drops the method at once, as a cancel does.
pub(crate) async fn sent_then_ended(
    run: impl Future<Output = Result<(), Error>>,
    forward: impl Future<Output = Result<(), Error>>,
) -> Result<(), Error> {
    tokio::pin!(run, forward);
    tokio::select! {
        forwarded = &mut forward => {
            forwarded?;
            run.await
        }
        outcome = &mut run => {
            forward.await?;
            outcome
        }
    }
}

/// Runs plugin code in its own task, so a panic answers a `PluginError` instead of
/// ending the plugin.
pub(crate) async fn guarded<T: Send + 'static>(
    work: impl Future<Output = Result<T, Error>> + Send + 'static,
) -> Result<T, Error> {
    let mut task = AbortOnDrop(tokio::spawn(work));
    match (&mut task.0).await {
        Ok(outcome) => outcome,
        Err(err) if err.is_panic() => {
            let panic = err.into_panic();
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a non-string panic".to_string());
            Err(Error::new(
                types::PLUGIN_ERROR,
                format!("method panicked: {message}"),
            ))
        }
        Err(_) => Err(Error::deadline_exceeded("the call was cancelled")),
    }
}

fn hook_status(name: &str, err: Error) -> Status {
    Status::failed_precondition(format!("{name} hook failed: {err}"))
}

pub(crate) struct Service(pub(crate) Arc<Shared>);

/// A host's place while its `Init` runs: given back when the `Init` ends without
/// attaching it (failed, or dropped because its host cancelled it).
struct Joining<'a> {
    shared: &'a Shared,
    host: Option<String>,
}

impl Drop for Joining<'_> {
    fn drop(&mut self) {
        if let Some(host) = self.host.take() {
            self.shared.mark(|state| state.hosts.joined(&host, false));
        }
    }
}

impl Service {
    async fn run_hook(&self, name: &str, hook: &Option<crate::HookFn>) -> Result<(), Status> {
        if let Some(hook) = hook.clone() {
            guarded(async move { hook().await })
                .await
                .map_err(|err| hook_status(name, err))?;
        }
        Ok(())
    }
}

type ItemStream = ReceiverStream<Result<pb::StreamItem, Status>>;

fn chunk_item(chunk: Json) -> pb::StreamItem {
    pb::StreamItem {
        item: Some(pb::stream_item::Item::ChunkJson(chunk.into_bytes())),
    }
}

fn error_item(err: &Error) -> pb::StreamItem {
    pb::StreamItem {
        item: Some(pb::stream_item::Item::Error(err.to_proto())),
    }
}

#[tonic::async_trait]
impl PluginService for Service {
    async fn describe(
        &self,
        _: Request<pb::DescribeRequest>,
    ) -> Result<Response<pb::PluginInfo>, Status> {
        let shared = &self.0;
        let methods = shared
            .order
            .iter()
            .map(|name| {
                let method = &shared.methods[name];
                pb::MethodInfo {
                    name: name.clone(),
                    streaming: matches!(method.handler, Handler::Stream(_)),
                    description: method.description.clone(),
                }
            })
            .collect();
        Ok(Response::new(pb::PluginInfo {
            id: shared.id.clone(),
            version: shared.version.clone(),
            protocol_version: PROTOCOL_VERSION,
            runtime: "rust".to_string(),
            methods,
        }))
    }

    async fn init(
        &self,
        request: Request<pb::InitRequest>,
    ) -> Result<Response<pb::LifecycleReply>, Status> {
        let host = host_of(request.metadata())?;
        if !self.0.mark(|state| state.hosts.join(&host)) {
            return Err(Status::resource_exhausted(format!(
                "{MAX_HOSTS} hosts are attached to this service; one more is refused"
            )));
        }
        // Gives the place back if this Init fails, or is dropped when its host cancels it.
        let mut joining = Joining {
            shared: &self.0,
            host: Some(host),
        };
        let mut config = request.into_inner().config_json;
        if config.is_empty() {
            config = b"{}".to_vec();
        }
        if serde_json::from_slice::<serde::de::IgnoredAny>(&config).is_err() {
            return Err(Status::invalid_argument(
                "Init: config_json is not valid JSON",
            ));
        }
        let config = Json::raw(config);
        *self.0.config.write().unwrap() = Arc::new(config.clone());
        if let Some(hook) = self.0.hooks.init.clone() {
            guarded(async move { hook(config).await })
                .await
                .map_err(|err| hook_status("init", err))?;
        }
        let host = joining.host.take().expect("joined once");
        self.0.mark(|state| {
            state.inited = true;
            state.hosts.joined(&host, true);
        });
        Ok(Response::new(pb::LifecycleReply {}))
    }

    async fn start(
        &self,
        request: Request<pb::LifecycleRequest>,
    ) -> Result<Response<pb::LifecycleReply>, Status> {
        host_of(request.metadata())?;
        self.run_hook("start", &self.0.hooks.start).await?;
        self.0.mark(|state| state.started = true);
        self.0.set_serving(true).await;
        Ok(Response::new(pb::LifecycleReply {}))
    }

    async fn stop(
        &self,
        request: Request<pb::LifecycleRequest>,
    ) -> Result<Response<pb::LifecycleReply>, Status> {
        if self.0.others_stay(&request)? {
            return Ok(Response::new(pb::LifecycleReply {})); // the plugin serves them on
        }
        if !self.0.service {
            self.0.set_serving(false).await;
        }
        self.run_hook("stop", &self.0.hooks.stop).await?;
        self.0.mark(|state| state.started = false);
        Ok(Response::new(pb::LifecycleReply {}))
    }

    async fn destroy(
        &self,
        request: Request<pb::LifecycleRequest>,
    ) -> Result<Response<pb::LifecycleReply>, Status> {
        if self.0.others_stay(&request)? {
            return Ok(Response::new(pb::LifecycleReply {}));
        }
        self.run_hook("destroy", &self.0.hooks.destroy).await?;
        self.0.mark(|state| state.inited = false);
        Ok(Response::new(pb::LifecycleReply {}))
    }

    async fn call(
        &self,
        request: Request<pb::CallRequest>,
    ) -> Result<Response<pb::CallReply>, Status> {
        Ok(Response::new(self.0.invoke(request.into_inner()).await))
    }

    async fn call_batch(
        &self,
        request: Request<pb::BatchRequest>,
    ) -> Result<Response<pb::BatchReply>, Status> {
        let calls = request.into_inner().calls;
        // Every item runs at once: a batch of 100,000 held them all in memory together.
        // More than the dispatcher's batcher ever sends is refused whole, before any runs.
        if calls.len() > MAX_BATCH_CALLS {
            return Err(Status::invalid_argument(format!(
                "a batch of {} calls is over the limit of {MAX_BATCH_CALLS}",
                calls.len()
            )));
        }
        let calls = calls.into_iter().map(|call| self.0.invoke(call));
        let results = futures_util::future::join_all(calls).await;
        Ok(Response::new(pb::BatchReply { results }))
    }

    type CallStreamStream = ItemStream;

    async fn call_stream(
        &self,
        request: Request<pb::CallRequest>,
    ) -> Result<Response<ItemStream>, Status> {
        let (items, receiver) = mpsc::channel(64);
        let (mut call, handler, name) = match self.0.prepare(request.into_inner()) {
            Ok(prepared) => prepared,
            Err(err) => {
                let _ = items.try_send(Ok(error_item(&err)));
                return Ok(Response::new(ReceiverStream::new(receiver)));
            }
        };
        let deadline = call.deadline;
        let (shared, name) = (self.0.clone(), name.to_string());
        // Dropped unended when the host goes away: the span then ends as cancelled.
        let span = self.0.start_span(&mut call);
        tokio::spawn(async move {
            let (chunks, mut chunk_receiver) = mpsc::channel::<Json>(64);
            let run = run_streamed(handler, call, chunks);
            let forward = async {
                while let Some(chunk) = chunk_receiver.recv().await {
                    if items.send(Ok(chunk_item(chunk))).await.is_err() {
                        return;
                    }
                }
            };
            let outcome = tokio::select! {
                (outcome, ()) = async {
                    tokio::join!(shared.within(&name, deadline, run), forward)
                } => outcome,
                // The host went away: dropping `run` aborts the method's task.
                () = items.closed() => return,
            };
            if let Some(span) = span {
                span.end(outcome.as_ref().err());
            }
            if let Err(err) = outcome {
                let _ = items.send(Ok(error_item(&err))).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    type EventsStream = EventStream;

    async fn events(
        &self,
        request: Request<Streaming<pb::HostEvent>>,
    ) -> Result<Response<EventStream>, Status> {
        let receiver = self.0.emitter.subscribe();
        let mut host_events = request.into_inner();
        let handlers = self.0.handlers.clone();
        let emitter = self.0.emitter.clone();
        let (refuse, refusal) = oneshot::channel();
        tokio::spawn(async move {
            loop {
                match host_events.message().await {
                    Ok(Some(event)) => {
                        if let Some(handler) = handlers.get(&event.name) {
                            // A panicking handler loses its one event, not the stream: the
                            // task reading it would end, and every later event with it.
                            let data = Json::from_wire(event.data_json);
                            let run = AssertUnwindSafe(|| handler(data, &emitter));
                            if std::panic::catch_unwind(run).is_err() {
                                crate::log::error(&format!(
                                    "the handler of host event {:?} panicked; \
                                     the Events stream goes on",
                                    event.name
                                ));
                            }
                        }
                    }
                    Ok(None) => return,
                    Err(status) => {
                        let _ = refuse.send(restated(status));
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ended_by(receiver, refusal)))
    }
}

/// The plugin's events until the host's side fails, then that failure as the stream's
/// status. The headers went when the stream opened, so a host event tonic refuses (one
/// over the size cap, one that is not a `HostEvent`) can only be answered in the
/// trailers; without this the stream stayed open, and the host waited for its deadline
/// instead of hearing why. Restated like a refused `Call`: one over the cap is
/// RESOURCE_EXHAUSTED (docs/protocol.md).
///
/// It also ends when the events do (the emitter closed at a stop), while the host's side
/// is still open: a merge alone waited for both, and a graceful stop waited for it, the
/// whole grace and the plugin's hooks with it.
fn ended_by(events: EventStream, refusal: oneshot::Receiver<Status>) -> EventStream {
    let events = events
        .map(Some)
        .chain(tokio_stream::once(None::<Result<pb::PluginEvent, Status>>));
    let refused =
        futures_util::stream::once(refusal).filter_map(|sent| sent.ok().map(|s| Some(Err(s))));
    Box::pin(
        events
            .merge(refused)
            .take_while(Option::is_some)
            .filter_map(|item| item),
    )
}

/// What the WebSocket binding (`crate::websocket`) runs through besides
/// [`Shared::invoke`]: the plugin's own lifecycle (no host runs it there: `--config` is its
/// config), the lists its `hello` names, streams sent as the host's credit allows, and
/// host events.
impl Shared {
    /// Runs the init hook with `config`, then the start hook, as a host's `Init` and
    /// `Start` would; a hook that fails is named with its error ("init hook failed: …").
    pub(crate) async fn open(&self, config: Json) -> Result<(), String> {
        *self.config.write().unwrap() = Arc::new(config.clone());
        if let Some(hook) = self.hooks.init.clone() {
            guarded(async move { hook(config).await })
                .await
                .map_err(|err| format!("init hook failed: {err}"))?;
        }
        self.mark(|state| state.inited = true);
        if let Some(hook) = self.hooks.start.clone() {
            guarded(async move { hook().await })
                .await
                .map_err(|err| format!("start hook failed: {err}"))?;
        }
        self.mark(|state| state.started = true);
        Ok(())
    }

    /// The plugin's id and version.
    pub(crate) fn identity(&self) -> (&str, &str) {
        (&self.id, &self.version)
    }

    /// The plugin's methods, and those of them that stream.
    pub(crate) fn method_names(&self) -> (Vec<&str>, Vec<&str>) {
        let streaming = self
            .order
            .iter()
            .filter(|name| matches!(self.methods[*name].handler, Handler::Stream(_)))
            .map(String::as_str)
            .collect();
        (self.order.iter().map(String::as_str).collect(), streaming)
    }

    /// [`Shared::prepare`], for a stream the binding runs itself.
    pub(crate) fn prepared(&self, request: pb::CallRequest) -> Result<(Call, Handler), Error> {
        self.prepare(request)
            .map(|(call, handler, _)| (call, handler))
    }

    /// The span a call the binding runs itself goes in, with tracing on.
    pub(crate) fn span_of(&self, call: &mut Call) -> Option<CallSpan> {
        self.start_span(call)
    }

    pub(crate) fn emitter(&self) -> &Emitter {
        &self.emitter
    }

    /// Hands a host event to its handler, if the plugin has one; a handler that panics
    /// loses its one event, logged, as on the gRPC binding's `Events` stream.
    pub(crate) fn deliver(&self, name: &str, data: Json) {
        if let Some(handler) = self.handlers.get(name) {
            let run = AssertUnwindSafe(|| handler(data, &self.emitter));
            if std::panic::catch_unwind(run).is_err() {
                crate::log::error(&format!(
                    "the handler of host event {} panicked; the connection goes on",
                    crate::error::shown_name(name)
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracing::Tracer;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn traced_request(method: &str) -> pb::CallRequest {
        pb::CallRequest {
            v: 1,
            method: method.to_string(),
            context: Some(pb::CallContext {
                traceparent: PARENT.to_string(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn streamed_and_batched_calls_are_traced_too() {
        let plugin = Plugin::new("test", "0.1.0")
            .streaming_method("count", "", |_: Call, chunks: ChunkSender| async move {
                for i in 0..3 {
                    chunks.send(serde_json::json!({ "i": i })).await?;
                }
                Ok(())
            })
            .method("sees", "", |call: Call| async move {
                Json::encode(&call.span_traceparent().map(str::to_string))
            });
        let (tracer, mut spans) = Tracer::capturing("test");
        let (health, _) = tonic_health::server::health_reporter();
        let service = Service(Shared::new(plugin, health, true, Some(tracer)).await);

        let mut items = service
            .call_stream(Request::new(traced_request("count")))
            .await
            .unwrap()
            .into_inner();
        let mut chunks = 0;
        while let Some(item) = items.next().await {
            assert!(matches!(
                item.unwrap().item,
                Some(pb::stream_item::Item::ChunkJson(_))
            ));
            chunks += 1;
        }
        assert_eq!(chunks, 3);
        let span = spans.recv().await.unwrap();
        assert_eq!(span.name, "linchkit.plugin/count");
        assert_eq!(
            span.parent_span_id,
            [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );

        let batch = pb::BatchRequest {
            calls: vec![traced_request("sees"), traced_request("sees")],
        };
        let replies = service
            .call_batch(Request::new(batch))
            .await
            .unwrap()
            .into_inner();
        for reply in replies.results {
            // The method sees its own span, a child in the dispatcher's trace.
            let seen: Option<String> = serde_json::from_slice(&reply.result_json).unwrap();
            let seen = seen.unwrap();
            assert!(
                seen.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
                "{seen}"
            );
            assert_ne!(seen, PARENT);
            let span = spans.recv().await.unwrap();
            assert_eq!(span.name, "linchkit.plugin/sees");
        }
        // A call the SDK cannot route has no span.
        service.0.invoke(traced_request("nope")).await;
        assert!(spans.try_recv().is_err());
    }

    /// Methods that hold their worker past a 100 ms deadline, answer at once, or await
    /// past it (the deadline ends those).
    fn deadlines_plugin() -> Plugin {
        Plugin::new("test", "0.1.0")
            .method("blocks", "", |_: Call| async move {
                // Holds the runtime's one worker (a #[tokio::test] has one): the deadline's
                // timer cannot fire before it returns.
                std::thread::sleep(Duration::from_millis(800));
                Ok(Json::raw(r#""done""#))
            })
            .streaming_method(
                "blocks_streaming",
                "",
                |_: Call, chunks: ChunkSender| async move {
                    std::thread::sleep(Duration::from_millis(800));
                    chunks.send(Json::raw("1")).await
                },
            )
            .method("quick", "", |_: Call| async move { Ok(Json::raw("1")) })
            .method("waits", "", |_: Call| async move {
                tokio::time::sleep(Duration::from_millis(800)).await;
                Ok(Json::raw("1"))
            })
    }

    async fn deadlines_service() -> Service {
        let (health, _) = tonic_health::server::health_reporter();
        Service(Shared::new(deadlines_plugin(), health, true, None).await)
    }

    fn within_ms(method: &str, deadline_ms: i64) -> pb::CallRequest {
        pb::CallRequest {
            v: 1,
            method: method.to_string(),
            params_json: b"null".to_vec(),
            context: Some(pb::CallContext {
                deadline_ms,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The late-answer warnings logged on this thread since `captured::start`, their words
    /// checked: the method each names, and how late it says the answer came.
    fn late_answers_said() -> Vec<(String, f64)> {
        crate::log::captured::lines()
            .iter()
            .filter_map(|line| line.split_once(" WARN linchkit_plugin: method '"))
            .map(|(_, said)| {
                let (method, rest) = said.split_once("' answered ").expect("a method");
                let (late, rest) = rest
                    .split_once(" s after its deadline: ")
                    .expect("how late");
                assert_eq!(
                    rest,
                    "a runtime worker was held that long without yielding, by this method's \
                     task or another's, so the deadline could not end it; an async method must \
                     not block (run blocking work with tokio::task::spawn_blocking) (said at \
                     most once a minute)"
                );
                (method.to_string(), late.parse().expect("seconds"))
            })
            .collect()
    }

    /// The methods [`late_answers_said`] names, in order.
    fn late_methods() -> Vec<String> {
        late_answers_said()
            .into_iter()
            .map(|(method, _)| method)
            .collect()
    }

    fn ok_result(reply: &pb::CallReply) -> &str {
        assert!(reply.ok, "{:?}", reply.error);
        std::str::from_utf8(&reply.result_json).unwrap()
    }

    #[tokio::test]
    async fn a_method_that_holds_its_worker_past_its_deadline_is_answered_and_said_once() {
        // Before, its answer went out 0.7 s after the deadline, and nothing said why the
        // host had answered deadline_exceeded meanwhile.
        crate::log::captured::start();
        let service = deadlines_service().await;
        let reply = service.0.invoke(within_ms("blocks", 100)).await;
        assert_eq!(ok_result(&reply), r#""done""#, "the answer stands");
        let said = late_answers_said();
        assert_eq!(said.len(), 1, "{said:?}");
        assert_eq!(said[0].0, "blocks");
        assert!((0.65..5.0).contains(&said[0].1), "{said:?}");
        // Once a minute: the second late answer is sent as quietly as the first.
        let reply = service.0.invoke(within_ms("blocks", 100)).await;
        assert_eq!(ok_result(&reply), r#""done""#);
        assert_eq!(late_answers_said().len(), 1);
    }

    #[tokio::test]
    async fn batch_items_and_streams_answered_late_are_said_too() {
        crate::log::captured::start();
        let service = deadlines_service().await;
        // The item without a deadline is never late, though the other held its answer.
        let batch = pb::BatchRequest {
            calls: vec![within_ms("quick", 0), within_ms("blocks", 100)],
        };
        let replies = service
            .call_batch(Request::new(batch))
            .await
            .unwrap()
            .into_inner()
            .results;
        assert_eq!(ok_result(&replies[0]), "1");
        assert_eq!(ok_result(&replies[1]), r#""done""#);
        assert_eq!(late_methods(), ["blocks"]);

        let mut items = service
            .call_stream(Request::new(within_ms("blocks_streaming", 100)))
            .await
            .unwrap()
            .into_inner();
        let mut got = Vec::new();
        while let Some(item) = items.next().await {
            got.push(item.unwrap().item);
        }
        assert_eq!(
            got,
            vec![Some(pb::stream_item::Item::ChunkJson(b"1".to_vec()))],
            "its chunk, then its end"
        );
        assert_eq!(late_methods(), ["blocks", "blocks_streaming"]);
        // Called once, the streaming method answers its chunks' list, as late (a new
        // service: this one said it within the minute).
        let reply = deadlines_service()
            .await
            .0
            .invoke(within_ms("blocks_streaming", 100))
            .await;
        assert_eq!(ok_result(&reply), "[1]");
        assert_eq!(
            late_methods(),
            ["blocks", "blocks_streaming", "blocks_streaming"]
        );
    }

    #[tokio::test]
    async fn an_answer_in_time_or_one_the_deadline_ended_says_nothing() {
        crate::log::captured::start();
        let service = deadlines_service().await;
        assert_eq!(
            ok_result(&service.0.invoke(within_ms("quick", 100)).await),
            "1"
        );
        let ended = service.0.invoke(within_ms("waits", 100)).await;
        assert_eq!(ended.error.unwrap().r#type, types::DEADLINE_EXCEEDED);
        // Without a deadline, nothing is late: not even a method that blocks.
        let reply = service.0.invoke(within_ms("blocks", 0)).await;
        assert_eq!(ok_result(&reply), r#""done""#);
        assert_eq!(late_methods(), [] as [&str; 0]);
        // What this thread logs is seen: a late answer on the same service is said.
        service.0.invoke(within_ms("blocks", 100)).await;
        assert_eq!(late_methods(), ["blocks"]);
    }
}
