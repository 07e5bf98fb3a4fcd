//! A double of the Zero-OS network module, as far as vmd asks it: a zbus
//! server for object `network@0.0.1` answering `Namespace(NetID) string`
//! and `GetSubnet(NetID) (net.IPNet, error)` the way the Go server does —
//! byte-equal to the replies recorded from a real Go `zbus.NewRedisServer`
//! (`fixtures/go-vectors`: `resp_net_*`, checked by `tests/vectors.rs`).
//!
//! The real networker returns `"n-" + NetID` for any id, and the subnet it
//! loaded from its JSON file with the 16-byte `::ffff:a.b.c.d` address
//! ([`Subnets::ip16`]); an unknown network is a method error with the zero
//! `IPNet` still in `Data`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde_bytes::ByteBuf;
use vmd::zbus::codec;
use vmd::zbus::wire::{Output, RemoteError, Request, Response};

/// The networks the double knows: NetID → (subnet address, prefix length).
#[derive(Debug, Clone, Default)]
pub struct Subnets {
    pub nets: BTreeMap<String, (Ipv4Addr, u8)>,
    /// Send IPs in the 16-byte form (what the real module sends).
    pub ip16: bool,
}

#[derive(Serialize)]
struct IpNet {
    #[serde(rename = "IP")]
    ip: Option<ByteBuf>,
    #[serde(rename = "Mask")]
    mask: Option<ByteBuf>,
}

/// The Go server's reply to one request (`None`: not for this object).
pub fn answer(subnets: &Subnets, request: &[u8]) -> Option<Vec<u8>> {
    let req: Request = codec::decode(request).ok()?;
    if req.object.name != "network" || req.object.version != "0.0.1" {
        return None;
    }
    let net_id: String = req
        .inputs
        .first()
        .and_then(|i| codec::decode(i).ok())
        .unwrap_or_default();
    let output = match req.method.as_str() {
        "Namespace" => Output {
            data: Some(ByteBuf::from(codec::encode(&format!("n-{net_id}")).ok()?)),
            error: None,
        },
        "GetSubnet" => match subnets.nets.get(&net_id) {
            Some((addr, prefix)) => {
                let ip = if subnets.ip16 {
                    addr.to_ipv6_mapped().octets().to_vec()
                } else {
                    addr.octets().to_vec()
                };
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(*prefix))
                    .unwrap_or(0)
                    .to_be_bytes()
                    .to_vec();
                let v = IpNet {
                    ip: Some(ByteBuf::from(ip)),
                    mask: Some(ByteBuf::from(mask)),
                };
                Output {
                    data: Some(ByteBuf::from(codec::encode(&v).ok()?)),
                    error: None,
                }
            }
            None => Output {
                data: Some(ByteBuf::from(
                    codec::encode(&IpNet {
                        ip: None,
                        mask: None,
                    })
                    .ok()?,
                )),
                error: Some(RemoteError {
                    message: "network not found".into(),
                }),
            },
        },
        other => {
            return codec::encode(&Response::protocol_error(
                &req.id,
                format!("unknown method {other}"),
            ))
            .ok()
        }
    };
    codec::encode(&Response {
        id: req.id,
        output,
        error: None,
    })
    .ok()
}

/// The double, serving on a broker until dropped.
pub struct NetworkDouble {
    task: tokio::task::JoinHandle<()>,
    /// `(method, NetID)` of every call, in order.
    pub calls: Arc<Mutex<Vec<(String, String)>>>,
}

impl NetworkDouble {
    /// Serves module `module` (Zero-OS: `network`) on `broker`.
    pub async fn start(broker: &vmd::zbus::broker::Broker, module: &str, subnets: Subnets) -> Self {
        let queue = format!("{module}.network@0.0.1");
        let calls = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&calls);
        let task = crate::go_server::spawn(broker, queue, move |req, bytes| {
            let net_id: String = req
                .inputs
                .first()
                .and_then(|i| codec::decode(i).ok())
                .unwrap_or_default();
            seen.lock().unwrap().push((req.method.clone(), net_id));
            answer(&subnets, bytes)
        })
        .await;
        NetworkDouble { task, calls }
    }

    pub fn calls(&self) -> Vec<(String, String)> {
        self.calls.lock().unwrap().clone()
    }
}

impl Drop for NetworkDouble {
    fn drop(&mut self) {
        self.task.abort();
    }
}
