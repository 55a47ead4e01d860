//! The JSON a plugin and its host exchange ([`Json`]): params, results, chunks, config and
//! event data travel as UTF-8 JSON bytes, passed through as they are.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{types, Error};

/// UTF-8 JSON text: params, results, chunks, config and event data travel as JSON bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Json(Vec<u8>);

impl Json {
    /// JSON text taken as it is (not checked).
    pub fn raw(bytes: impl Into<Vec<u8>>) -> Self {
        Json(bytes.into())
    }

    /// Encodes a value.
    pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Self, Error> {
        serde_json::to_vec(value).map(Json).map_err(|err| {
            Error::new(
                types::PLUGIN_ERROR,
                format!("value is not JSON-encodable: {err}"),
            )
        })
    }

    /// Decodes into a value.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.0)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }

    /// Empty bytes on the wire mean JSON `null`.
    pub(crate) fn from_wire(bytes: Vec<u8>) -> Self {
        if bytes.is_empty() {
            Json::raw("null")
        } else {
            Json(bytes)
        }
    }
}

impl From<serde_json::Value> for Json {
    fn from(value: serde_json::Value) -> Self {
        Json(value.to_string().into_bytes())
    }
}
