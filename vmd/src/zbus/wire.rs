//! The zbus v1 envelope: requests, responses and the status object.
//!
//! Field names and order are those of the Go structs, so that
//! [`codec::encode`](super::codec::encode) writes the bytes the Go server writes.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use super::codec::{nil_default, GoTime};

/// An object a zbus server serves: `Name@Version`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ObjectId {
    #[serde(rename = "Name", deserialize_with = "nil_default")]
    pub name: String,
    #[serde(rename = "Version", deserialize_with = "nil_default")]
    pub version: String,
}

impl ObjectId {
    pub fn new(name: impl Into<String>, version: impl Into<String>) -> Self {
        ObjectId {
            name: name.into(),
            version: version.into(),
        }
    }

    /// The reserved object every Go zbus server answers status requests on.
    pub fn status() -> Self {
        ObjectId::new("zbus", "1.0")
    }

    /// The Redis list requests for this object are pushed to.
    pub fn queue(&self, module: &str) -> String {
        // On every call's path: no formatting machinery.
        let mut q = String::with_capacity(module.len() + self.name.len() + self.version.len() + 2);
        q.push_str(module);
        q.push('.');
        q.push_str(&self.name);
        q.push('@');
        q.push_str(&self.version);
        q
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.version)
    }
}

/// A [`Request`] to send, borrowing its parts: the same bytes on the wire
/// (same fields, same order), without copying them first.
#[derive(Serialize)]
pub struct RequestRef<'a> {
    #[serde(rename = "ID")]
    pub id: &'a str,
    #[serde(rename = "Inputs")]
    pub inputs: &'a [ByteBuf],
    #[serde(rename = "Object")]
    pub object: &'a ObjectId,
    #[serde(rename = "ReplyTo")]
    pub reply_to: &'a str,
    #[serde(rename = "Method")]
    pub method: &'a str,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Request {
    #[serde(rename = "ID", deserialize_with = "nil_default")]
    pub id: String,
    /// Each argument msgpack-encoded on its own.
    #[serde(rename = "Inputs", deserialize_with = "nil_default")]
    pub inputs: Vec<ByteBuf>,
    #[serde(rename = "Object", deserialize_with = "nil_default")]
    pub object: ObjectId,
    #[serde(rename = "ReplyTo", deserialize_with = "nil_default")]
    pub reply_to: String,
    #[serde(rename = "Method", deserialize_with = "nil_default")]
    pub method: String,
}

/// What a method returned: a value (already msgpack) and/or its error.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Output {
    #[serde(rename = "Data", deserialize_with = "nil_default")]
    pub data: Option<ByteBuf>,
    #[serde(rename = "Error", deserialize_with = "nil_default")]
    pub error: Option<RemoteError>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RemoteError {
    #[serde(rename = "Message", deserialize_with = "nil_default")]
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Response {
    #[serde(rename = "ID", deserialize_with = "nil_default")]
    pub id: String,
    #[serde(rename = "Output", deserialize_with = "nil_default")]
    pub output: Output,
    /// Protocol errors only; Go callers panic when this is set.
    #[serde(rename = "Error", deserialize_with = "nil_default")]
    pub error: Option<String>,
}

impl Response {
    /// The response to a call: its output, or the protocol error it hit.
    pub fn from_call(id: &str, result: Result<Output, String>) -> Self {
        match result {
            Ok(output) => Response {
                id: id.to_owned(),
                output,
                error: None,
            },
            Err(msg) => Response::protocol_error(id, msg),
        }
    }

    pub fn protocol_error(id: &str, message: impl Into<String>) -> Self {
        Response {
            id: id.to_owned(),
            output: Output::default(),
            error: Some(message.into()),
        }
    }
}

/// Reply of the status object `zbus@1.0`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Status {
    #[serde(rename = "Objects", deserialize_with = "nil_default")]
    pub objects: Vec<ObjectId>,
    #[serde(rename = "Workers", deserialize_with = "nil_default")]
    pub workers: Vec<WorkerStatus>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum WorkerState {
    #[default]
    #[serde(rename = "free")]
    Free,
    #[serde(rename = "busy")]
    Busy,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct WorkerStatus {
    #[serde(rename = "State", deserialize_with = "nil_default")]
    pub state: WorkerState,
    #[serde(rename = "StartTime", deserialize_with = "nil_default")]
    pub start_time: GoTime,
    #[serde(rename = "Action", deserialize_with = "nil_default")]
    pub action: String,
}
