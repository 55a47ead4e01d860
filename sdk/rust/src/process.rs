//! The plugin as a process, whichever mode it runs in (`serve`, a subprocess, the WebSocket
//! modes): what it reads from the process that runs it ([`Environment`]), the format
//! version of the handshake line it writes first, and why it could not serve
//! ([`ServeError`], the one line on stderr before it exits with status 1).

use std::collections::HashMap;
use std::fmt;

use tokio::io::{AsyncRead, AsyncWrite};

/// The version of the handshake line's format.
pub const CORE_VERSION: u32 = 1;

/// Why a plugin could not serve.
#[derive(Debug)]
pub enum ServeError {
    /// Run without the handshake environment and without `serve`.
    NotLaunchedByHost,
    Failed(String),
}

impl fmt::Display for ServeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServeError::NotLaunchedByHost => f.write_str(
                "this is a LinchKit dispatcher plugin: the dispatcher starts it as a subprocess; \
                 to run it by hand as a gRPC service use `serve --address 127.0.0.1:0`",
            ),
            ServeError::Failed(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for ServeError {}

/// What [`Plugin::run`](crate::Plugin::run) reads from the process; tests pass their own.
pub struct Environment {
    pub args: Vec<String>,
    pub vars: HashMap<String, String>,
    pub stdin: Box<dyn AsyncRead + Send + Unpin>,
    pub stdout: Box<dyn AsyncWrite + Send + Unpin>,
}

impl Environment {
    /// This process's arguments (without the program name), variables, stdin and stdout.
    pub fn from_process() -> Self {
        Environment {
            args: std::env::args().skip(1).collect(),
            vars: std::env::vars().collect(),
            stdin: Box::new(tokio::io::stdin()),
            stdout: Box::new(tokio::io::stdout()),
        }
    }

    /// The variable `name`, empty when unset.
    pub(crate) fn var(&self, name: &str) -> &str {
        self.vars.get(name).map(String::as_str).unwrap_or("")
    }
}
