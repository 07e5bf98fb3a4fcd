//! `VmdStub`: a typed client of vmd, the Rust counterpart of Go's generated
//! `VMModuleStub`. The operator CLI and the tests use it.

use std::time::Duration;

use crate::api::{self, MachineInfo, MachineMetrics, Stream, Vm, VmInfo};
use crate::module::Method;
use crate::zbus::broker::Broker;
use crate::zbus::client::{arg, unit, value, Client, ClientError};
use crate::zbus::wire::{ObjectId, Status};

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

    async fn call(
        &self,
        method: Method,
        inputs: Vec<Vec<u8>>,
    ) -> Result<crate::zbus::wire::Output, ClientError> {
        self.client.call(&self.object, method.name(), inputs).await
    }

    pub async fn run(&self, vm: &Vm) -> Result<MachineInfo, ClientError> {
        value(self.call(Method::Run, vec![arg(vm)?]).await?)
    }
    pub async fn inspect(&self, name: &str) -> Result<VmInfo, ClientError> {
        value(self.call(Method::Inspect, vec![arg(name)?]).await?)
    }
    pub async fn delete(&self, name: &str) -> Result<(), ClientError> {
        unit(self.call(Method::Delete, vec![arg(name)?]).await?)
    }
    pub async fn exists(&self, name: &str) -> Result<bool, ClientError> {
        value(self.call(Method::Exists, vec![arg(name)?]).await?)
    }
    pub async fn logs(&self, name: &str) -> Result<String, ClientError> {
        value(self.call(Method::Logs, vec![arg(name)?]).await?)
    }
    pub async fn logs_full(&self, name: &str) -> Result<String, ClientError> {
        value(self.call(Method::LogsFull, vec![arg(name)?]).await?)
    }
    pub async fn list(&self) -> Result<Vec<String>, ClientError> {
        value(self.call(Method::List, Vec::new()).await?)
    }
    pub async fn metrics(&self) -> Result<MachineMetrics, ClientError> {
        value(self.call(Method::Metrics, Vec::new()).await?)
    }
    pub async fn lock(&self, name: &str, lock: bool) -> Result<(), ClientError> {
        unit(
            self.call(Method::Lock, vec![arg(name)?, arg(&lock)?])
                .await?,
        )
    }
    pub async fn stream_create(&self, name: &str, stream: &Stream) -> Result<(), ClientError> {
        unit(
            self.call(Method::StreamCreate, vec![arg(name)?, arg(stream)?])
                .await?,
        )
    }
    pub async fn stream_delete(&self, id: &str) -> Result<(), ClientError> {
        unit(self.call(Method::StreamDelete, vec![arg(id)?]).await?)
    }
    pub async fn status(&self) -> Result<Status, ClientError> {
        self.client.status().await
    }
}
