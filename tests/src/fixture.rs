//! A `VmModule` whose answers are derived from its inputs, so a test can tell
//! which call a reply belongs to, and a way to serve it on a broker.
//!
//! It answers the way the Go vectors were produced (same values), so the
//! vector tests can compare bytes, and it records what it was called with.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use vmd::api::{self, MachineInfo, MachineMetric, MachineMetrics, NetMetric, Stream, Vm, VmInfo};
use vmd::module::{MethodError, MethodResult, ModuleService, VmModule};
use vmd::zbus::broker::Broker;
use vmd::zbus::server::{Server, ServerConfig};
use vmd::zbus::wire::ObjectId;

fn missing(name: &str) -> MethodError {
    MethodError::new(format!("machine '{name}' does not exist"))
}

#[derive(Default)]
pub struct Fixture {
    /// VMs that "exist": Exists, List, Inspect, Delete and Lock look here.
    pub vms: Vec<String>,
    /// Calls seen, as `Method(args)`.
    pub calls: Mutex<Vec<String>>,
    /// Per key: how many calls run at this moment, and the most ever seen.
    active: Mutex<HashMap<String, (usize, usize)>>,
    pub running_total: AtomicUsize,
    pub max_running_total: AtomicUsize,
}

impl Fixture {
    pub fn with_vms(vms: &[&str]) -> Self {
        Fixture {
            vms: vms.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn record(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }

    /// The most calls that ever ran at once for `key`.
    pub fn max_concurrent(&self, key: &str) -> usize {
        self.active.lock().unwrap().get(key).map_or(0, |e| e.1)
    }

    /// Holds the call open for `ms`, tracking concurrency per key.
    async fn busy(&self, key: &str, ms: u64) {
        {
            let mut a = self.active.lock().unwrap();
            let e = a.entry(key.to_owned()).or_default();
            e.0 += 1;
            e.1 = e.1.max(e.0);
        }
        let n = self.running_total.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running_total.fetch_max(n, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        self.running_total.fetch_sub(1, Ordering::SeqCst);
        self.active.lock().unwrap().get_mut(key).unwrap().0 -= 1;
    }

    /// The metrics of the `resp_metrics_two` vector.
    pub fn metrics_two() -> MachineMetrics {
        let m = |a, b, c, d| NetMetric {
            net_rx_packets: a,
            net_rx_bytes: b,
            net_tx_packets: c,
            net_tx_bytes: d,
        };
        let mut out = MachineMetrics::new();
        out.insert(
            "1-2-vm".into(),
            MachineMetric {
                private: m(10, 1000, 20, 2000),
                public: m(30, 3000, 40, 4000),
                ..Default::default()
            },
        );
        out.insert(
            "3-4-vm".into(),
            MachineMetric {
                private: m(1, 1 << 40, 2, 1 << 33),
                public: m(0, 0, 0, 0),
                ..Default::default()
            },
        );
        out
    }
}

/// Names with a meaning to the fixture: `boom` fails Run, `panic` panics,
/// `slow-*` takes 300 ms, `sleep-<ms>` takes that long.
fn delay_of(name: &str) -> u64 {
    if name.starts_with("slow") {
        300
    } else if let Some(ms) = name.strip_prefix("sleep-") {
        ms.parse().unwrap_or(0)
    } else {
        0
    }
}

impl VmModule for Fixture {
    async fn run(&self, vm: Vm) -> MethodResult<MachineInfo> {
        self.record(format!("Run({})", vm.name));
        self.busy(&vm.name, delay_of(&vm.name)).await;
        match vm.name.as_str() {
            "boom" => Err(MethodError::new("boom")),
            "panic" => panic!("fixture panics on request"),
            _ => Ok(MachineInfo {
                console_url: "10.20.2.1:20001".into(),
            }),
        }
    }
    async fn inspect(&self, name: String) -> MethodResult<VmInfo> {
        self.record(format!("Inspect({name})"));
        if !self.vms.contains(&name) {
            return Err(missing(&name));
        }
        Ok(VmInfo {
            memory: 512,
            cpu: 1,
            ..Default::default()
        })
    }
    async fn delete(&self, name: String) -> MethodResult<()> {
        self.record(format!("Delete({name})"));
        self.busy(&name, delay_of(&name)).await;
        if name == "x" {
            return Err(missing(&name));
        }
        Ok(())
    }
    async fn exists(&self, name: String) -> bool {
        self.record(format!("Exists({name})"));
        self.vms.contains(&name)
    }
    async fn logs(&self, name: String) -> MethodResult<String> {
        self.record(format!("Logs({name})"));
        Ok(format!("last lines of {name}\n"))
    }
    async fn logs_full(&self, name: String) -> MethodResult<String> {
        self.record(format!("LogsFull({name})"));
        Ok(format!("all lines of {name}\n").repeat(3))
    }
    async fn list(&self) -> MethodResult<Vec<String>> {
        self.record("List()".into());
        Ok(self.vms.clone())
    }
    async fn metrics(&self) -> MethodResult<MachineMetrics> {
        self.record("Metrics()".into());
        Ok(Fixture::metrics_two())
    }
    async fn usage(&self) -> MethodResult<MachineMetrics> {
        self.record("Usage()".into());
        Ok(Fixture::metrics_two())
    }
    async fn lock(&self, name: String, lock: bool) -> MethodResult<()> {
        self.record(format!("Lock({name}, {lock})"));
        if !self.vms.contains(&name) {
            return Err(missing(&name));
        }
        Ok(())
    }
    async fn stream_create(&self, name: String, stream: Stream) -> MethodResult<()> {
        self.record(format!(
            "StreamCreate({name}, {}, {}, {})",
            stream.id, stream.namespace, stream.output
        ));
        if !self.vms.contains(&name) {
            return Err(missing(&name));
        }
        Ok(())
    }
    async fn stream_delete(&self, id: String) -> MethodResult<()> {
        self.record(format!("StreamDelete({id})"));
        Ok(())
    }
}

/// An in-process zbus server serving a module as vmd does (both names).
pub struct Serving {
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Serving {
    pub fn start<M: VmModule>(broker: Broker, module: Arc<M>, max_changes: usize) -> Self {
        let mut config = ServerConfig::new(api::MODULE);
        config.max_changes = max_changes;
        config.drain_timeout = Duration::from_secs(5);
        let service = Arc::new(ModuleService(module));
        let mut server = Server::new(broker, config);
        server
            .register(ObjectId::new(api::OBJECT, api::VERSION), service.clone())
            .register(ObjectId::new(api::OBJECT_ALIAS, api::VERSION), service);
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            server.run(rx).await.expect("server");
        });
        Serving {
            stop,
            task: Some(task),
        }
    }

    /// Asks the server to stop and waits until it has.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            t.await.expect("server task panicked");
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}
