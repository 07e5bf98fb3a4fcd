//! The Zero-OS network module, as vmd asks it where a VM's web console goes:
//! the Rust counterpart of the Go `NetworkerStub` calls the VM module makes
//! (`network.network@0.0.1`: `Namespace(NetID) string`,
//! `GetSubnet(NetID) (net.IPNet, error)`).
//!
//! It is a peer on the bus like Redis is one: every call has a deadline and
//! fails with a clear error, never hangs (the Go module waits forever when
//! the network module is down).

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use crate::api::IpNet;
use crate::telemetry::PeerCalls;
use crate::zbus::broker::Broker;
use crate::zbus::client::{arg, value, Client, ClientError};
use crate::zbus::wire::ObjectId;

pub const OBJECT: &str = "network";
pub const VERSION: &str = "0.0.1";

/// The network module of one bus.
pub struct Networker {
    client: Client,
    object: ObjectId,
}

impl Networker {
    /// The module named `module` (Zero-OS: `network`) on `broker`, each
    /// call bounded by `timeout`.
    pub fn new(broker: Broker, module: &str, timeout: Duration, stats: PeerCalls) -> Self {
        Networker {
            client: Client::new(broker, module)
                .with_timeout(timeout)
                .with_stats(stats),
            object: ObjectId::new(OBJECT, VERSION),
        }
    }

    /// The network namespace of private network `net_id`.
    pub async fn namespace(&self, net_id: &str) -> Result<String, ClientError> {
        let out = self
            .client
            .call(&self.object, "Namespace", vec![arg(net_id)?])
            .await?;
        value(out)
    }

    /// The subnet of private network `net_id` on this node.
    pub async fn subnet(&self, net_id: &str) -> Result<IpNet, ClientError> {
        let out = self
            .client
            .call(&self.object, "GetSubnet", vec![arg(net_id)?])
            .await?;
        value(out)
    }
}

/// The console's address in a subnet: its IPv4 address with the last octet
/// set to 1 (the network module gives 4 bytes, or 16 in `::ffff:a.b.c.d`
/// form; anything else is not an IPv4 subnet).
pub fn console_address(subnet: &IpNet) -> Option<Ipv4Addr> {
    let v4 = match subnet.ip.addr()? {
        IpAddr::V4(a) => a,
        IpAddr::V6(a) => a.to_ipv4_mapped()?,
    };
    let [a, b, c, _] = v4.octets();
    Some(Ipv4Addr::new(a, b, c, 1))
}

/// The console's port for a VM at `vm`: 20000 + its last octet.
pub fn console_port(vm: Ipv4Addr) -> u16 {
    20_000 + u16::from(vm.octets()[3])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Ip;

    fn net(ip: IpAddr) -> IpNet {
        IpNet {
            ip: Ip::from(ip),
            mask: Ip::default(),
        }
    }

    #[test]
    fn the_zero_os_placement_rule() {
        let four = net("10.20.2.0".parse().unwrap());
        assert_eq!(console_address(&four), Some(Ipv4Addr::new(10, 20, 2, 1)));
        let mapped = net("::ffff:10.20.2.0".parse().unwrap());
        assert_eq!(console_address(&mapped), Some(Ipv4Addr::new(10, 20, 2, 1)));
        assert_eq!(console_address(&net("fd00::".parse().unwrap())), None);
        assert_eq!(console_address(&IpNet::default()), None);
        assert_eq!(console_port(Ipv4Addr::new(10, 20, 2, 5)), 20_005);
        assert_eq!(console_port(Ipv4Addr::new(10, 20, 2, 255)), 20_255);
    }
}
