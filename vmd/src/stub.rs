//! `VmdStub`: a typed client of vmd, the Rust counterpart of Go's generated
//! `VMModuleStub`. The operator CLI and the tests use it. A call is the same
//! [`VmCall`] the server decodes: the arguments are encoded by it. Its
//! typed methods (`run`, `inspect`…) come from the interface's table in
//! [`crate::module`], one per method.

use std::time::Duration;

use crate::api;
use crate::module::VmCall;
use crate::zbus::broker::Broker;
use crate::zbus::client::{Client, ClientError};
use crate::zbus::wire::{ObjectId, Output, Status};

pub struct VmdStub {
    client: Client,
    object: ObjectId,
}

impl VmdStub {
    /// A stub for `vmd.manager@0.0.1` on `broker`.
    pub fn new(broker: Broker) -> Self {
        VmdStub {
            client: Client::new(broker, api::MODULE),
            object: ObjectId::new(api::OBJECT, api::VERSION),
        }
    }

    /// Talks to the object under another name (e.g. the `vmd` alias).
    pub fn with_object(mut self, object: ObjectId) -> Self {
        self.object = object;
        self
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.client = self.client.with_timeout(timeout);
        self
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Sends one call of the interface and returns its raw output.
    pub async fn send(&self, call: &VmCall) -> Result<Output, ClientError> {
        let inputs = call.inputs()?;
        self.client
            .call(&self.object, call.method().name(), inputs)
            .await
    }

    pub async fn status(&self) -> Result<Status, ClientError> {
        self.client.status().await
    }
}
