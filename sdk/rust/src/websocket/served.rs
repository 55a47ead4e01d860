//! The plugin as every WebSocket connection serves it ([`Core`]): the gRPC binding's
//! [`Shared`] (calls, hooks, spans), the `hello` each connection opens with, and whether
//! `health` answers serving.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::protocol;
use crate::service::Shared;
use crate::tracing::Tracer;
use crate::{Json, Plugin};

/// The plugin as every connection serves it.
pub(crate) struct Core {
    pub(crate) shared: Arc<Shared>,
    /// The `hello` every connection opens with.
    pub(crate) hello: Vec<u8>,
    /// What `health` answers: serving once started, not once stopping.
    serving: AtomicBool,
}

impl Core {
    pub(crate) async fn new(plugin: Plugin, tracer: Option<Tracer>) -> Arc<Core> {
        // No gRPC health service here: `health` frames answer from `serving`.
        let (health, _) = tonic_health::server::health_reporter();
        let shared = Shared::new(plugin, health, false, tracer).await;
        let (id, version) = shared.identity();
        let (methods, streaming) = shared.method_names();
        let hello = protocol::hello(id, version, &methods, &streaming);
        Arc::new(Core {
            shared,
            hello,
            serving: AtomicBool::new(false),
        })
    }

    /// Runs the init and start hooks with `config`.
    pub(crate) async fn open(&self, config: Json) -> Result<(), String> {
        self.shared.open(config).await?;
        self.serving.store(true, Ordering::SeqCst);
        Ok(())
    }

    pub(crate) fn serving(&self) -> bool {
        self.serving.load(Ordering::SeqCst)
    }

    pub(crate) fn stop_serving(&self) {
        self.serving.store(false, Ordering::SeqCst);
    }

    #[cfg(test)]
    pub(crate) async fn ready(plugin: Plugin) -> Arc<Core> {
        let core = Core::new(plugin, None).await;
        core.open(Json::raw("{}")).await.expect("the hooks run");
        core
    }
}
