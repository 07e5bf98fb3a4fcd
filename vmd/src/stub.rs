//! `VmdStub`: a typed client of vmd, the Rust counterpart of Go's generated
//! `VMModuleStub`. The operator CLI and the tests use it. A call is the same
//! [`VmCall`] the server decodes: the arguments are encoded by it.

use std::time::Duration;

use crate::api::{self, MachineInfo, MachineMetrics, Stream, Vm, VmInfo};
use crate::module::VmCall;
use crate::zbus::broker::Broker;
use crate::zbus::client::{unit, value, Client, ClientError};
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

    pub async fn run(&self, vm: &Vm) -> Result<MachineInfo, ClientError> {
        value(self.send(&VmCall::Run(Box::new(vm.clone()))).await?)
    }
    pub async fn inspect(&self, name: &str) -> Result<VmInfo, ClientError> {
        value(self.send(&VmCall::Inspect(name.into())).await?)
    }
    pub async fn delete(&self, name: &str) -> Result<(), ClientError> {
        unit(self.send(&VmCall::Delete(name.into())).await?)
    }
    pub async fn exists(&self, name: &str) -> Result<bool, ClientError> {
        value(self.send(&VmCall::Exists(name.into())).await?)
    }
    pub async fn logs(&self, name: &str) -> Result<String, ClientError> {
        value(self.send(&VmCall::Logs(name.into())).await?)
    }
    pub async fn logs_full(&self, name: &str) -> Result<String, ClientError> {
        value(self.send(&VmCall::LogsFull(name.into())).await?)
    }
    pub async fn list(&self) -> Result<Vec<String>, ClientError> {
        value(self.send(&VmCall::List).await?)
    }
    pub async fn metrics(&self) -> Result<MachineMetrics, ClientError> {
        value(self.send(&VmCall::Metrics).await?)
    }
    pub async fn lock(&self, name: &str, lock: bool) -> Result<(), ClientError> {
        unit(self.send(&VmCall::Lock(name.into(), lock)).await?)
    }
    pub async fn stream_create(&self, name: &str, stream: &Stream) -> Result<(), ClientError> {
        unit(
            self.send(&VmCall::StreamCreate(name.into(), stream.clone()))
                .await?,
        )
    }
    pub async fn stream_delete(&self, id: &str) -> Result<(), ClientError> {
        unit(self.send(&VmCall::StreamDelete(id.into())).await?)
    }
    pub async fn status(&self) -> Result<Status, ClientError> {
        self.client.status().await
    }
}
