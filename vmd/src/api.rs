//! The types of the vmd zbus interface, exactly as the Go `VMModule` stubs
//! put them on the wire (see `shared/spec/vmd-api.md`).
//!
//! These mirror the wire, nothing more: every field decodes leniently (nil or
//! missing means zero), and nothing here is validated. Turning a [`Vm`] into
//! something that may be started is the job of the module, which rejects
//! what does not hold.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::zbus::codec::nil_default;

/// Module name on the bus.
pub const MODULE: &str = "vmd";
/// Object name every Zero-OS caller uses.
pub const OBJECT: &str = "manager";
/// Object name the module's own documentation gives; served as an alias.
pub const OBJECT_ALIAS: &str = "vmd";
pub const VERSION: &str = "0.0.1";

/// Declares a wire struct: Go field names, lenient decoding on every field.
macro_rules! wire_struct {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$fmeta:meta])* $wire:literal => pub $field:ident : $ty:ty, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
        #[serde(default)]
        pub struct $name {
            $(
                $(#[$fmeta])*
                #[serde(rename = $wire, deserialize_with = "nil_default")]
                pub $field: $ty,
            )*
        }
    };
}

wire_struct! {
    /// A virtual machine as a caller asks for it.
    pub struct Vm {
        "Name" => pub name: String,
        "CPU" => pub cpu: u8,
        /// Bytes.
        "Memory" => pub memory: u64,
        "Network" => pub network: VmNetworkInfo,
        "KernelImage" => pub kernel_image: String,
        "InitrdImage" => pub initrd_image: String,
        "KernelArgs" => pub kernel_args: BTreeMap<String, String>,
        "Entrypoint" => pub entrypoint: String,
        "Disks" => pub disks: Vec<VmDisk>,
        "Shared" => pub shared: Vec<SharedDir>,
        "Boot" => pub boot: Boot,
        "Environment" => pub environment: BTreeMap<String, String>,
        "NoKeepAlive" => pub no_keep_alive: bool,
        "Hostname" => pub hostname: String,
        "Devices" => pub devices: Vec<String>,
    }
}

wire_struct! {
    pub struct VmNetworkInfo {
        "Ifaces" => pub ifaces: Vec<VmIface>,
        "Nameservers" => pub nameservers: Vec<Ip>,
    }
}

wire_struct! {
    pub struct VmIface {
        "Tap" => pub tap: String,
        "MAC" => pub mac: String,
        "IPs" => pub ips: Vec<IpNet>,
        "Routes" => pub routes: Vec<Route>,
        "IP4DefaultGateway" => pub ip4_default_gateway: Ip,
        "IP6DefaultGateway" => pub ip6_default_gateway: Ip,
        "PublicIPv4" => pub public_ipv4: bool,
        "PublicIPv6" => pub public_ipv6: bool,
        "NetID" => pub net_id: String,
    }
}

wire_struct! {
    pub struct Route {
        "Net" => pub net: IpNet,
        /// May be nil.
        "Gateway" => pub gateway: Ip,
    }
}

wire_struct! {
    /// Go `net.IPNet`.
    pub struct IpNet {
        "IP" => pub ip: Ip,
        "Mask" => pub mask: Ip,
    }
}

wire_struct! {
    pub struct VmDisk {
        "Path" => pub path: String,
        "Target" => pub target: String,
    }
}

wire_struct! {
    pub struct SharedDir {
        "ID" => pub id: String,
        "Path" => pub path: String,
        "Target" => pub target: String,
    }
}

wire_struct! {
    pub struct Boot {
        /// 0: disk (`path` is the root disk), 1: virtio-fs (`path` is the root dir).
        "Type" => pub kind: u8,
        "Path" => pub path: String,
    }
}

wire_struct! {
    pub struct MachineInfo {
        "ConsoleURL" => pub console_url: String,
    }
}

/// What `Inspect` returns. The first three fields are Zero-OS's; the rest are
/// vmd's additions, left off the wire when unset so that old replies stay
/// byte-identical. Go decoders ignore keys they do not know.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct VmInfo {
    #[serde(rename = "HtEnabled", deserialize_with = "nil_default")]
    pub ht_enabled: bool,
    /// MiB.
    #[serde(rename = "Memory", deserialize_with = "nil_default")]
    pub memory: i64,
    #[serde(rename = "CPU", deserialize_with = "nil_default")]
    pub cpu: i64,
    #[serde(
        rename = "State",
        deserialize_with = "nil_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub state: Option<String>,
    #[serde(
        rename = "Reason",
        deserialize_with = "nil_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub reason: Option<String>,
    #[serde(
        rename = "Restarts",
        deserialize_with = "nil_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub restarts: Option<u64>,
    #[serde(
        rename = "Pid",
        deserialize_with = "nil_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub pid: Option<i64>,
    #[serde(
        rename = "Uptime",
        deserialize_with = "nil_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub uptime_secs: Option<u64>,
    /// The VM's log streams and how they fare.
    #[serde(
        rename = "Streams",
        deserialize_with = "nil_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub streams: Option<Vec<StreamStatus>>,
    /// The web console's address while it listens.
    #[serde(
        rename = "ConsoleURL",
        deserialize_with = "nil_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub console_url: Option<String>,
    /// Why the VM's web console does not listen.
    #[serde(
        rename = "ConsoleError",
        deserialize_with = "nil_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub console_error: Option<String>,
}

/// A log stream of a VM as `Inspect` shows it (vmd's addition).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct StreamStatus {
    #[serde(rename = "ID", deserialize_with = "nil_default")]
    pub id: String,
    #[serde(rename = "Output", deserialize_with = "nil_default")]
    pub output: String,
    #[serde(rename = "Connected", deserialize_with = "nil_default")]
    pub connected: bool,
    /// Console bytes sent (before compression).
    #[serde(rename = "SentBytes", deserialize_with = "nil_default")]
    pub sent_bytes: u64,
    /// Console bytes lost: rotated away while the receiver was unreachable.
    #[serde(rename = "DroppedBytes", deserialize_with = "nil_default")]
    pub dropped_bytes: u64,
    /// Console bytes published to Redis while no subscriber listened.
    #[serde(rename = "UnheardBytes", deserialize_with = "nil_default")]
    pub unheard_bytes: u64,
    /// Console bytes the receiver refused for good (Loki's 400).
    #[serde(rename = "RejectedBytes", deserialize_with = "nil_default")]
    pub rejected_bytes: u64,
}

/// Key: VM name. Sorted, so the same metrics always encode the same way.
pub type MachineMetrics = BTreeMap<String, MachineMetric>;

/// Per VM. `Private` and `Public` are Zero-OS's; the rest are vmd's
/// additions, left off the wire when unknown (Go decoders ignore them).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct MachineMetric {
    /// Sum of the VM's private taps (all but `p-*`).
    #[serde(rename = "Private", deserialize_with = "nil_default")]
    pub private: NetMetric,
    /// Sum of the VM's public taps (`p-*`).
    #[serde(rename = "Public", deserialize_with = "nil_default")]
    pub public: NetMetric,
    #[serde(
        rename = "CPUTimeMs",
        deserialize_with = "nil_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub cpu_time_ms: Option<u64>,
    #[serde(
        rename = "MemoryRSS",
        deserialize_with = "nil_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub memory_rss: Option<u64>,
    #[serde(
        rename = "DiskReadBytes",
        deserialize_with = "nil_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub disk_read_bytes: Option<u64>,
    #[serde(
        rename = "DiskWriteBytes",
        deserialize_with = "nil_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub disk_write_bytes: Option<u64>,
    #[serde(
        rename = "Restarts",
        deserialize_with = "nil_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub restarts: Option<u64>,
}

wire_struct! {
    pub struct NetMetric {
        "NetRxPackets" => pub net_rx_packets: u64,
        "NetRxBytes" => pub net_rx_bytes: u64,
        "NetTxPackets" => pub net_tx_packets: u64,
        "NetTxBytes" => pub net_tx_bytes: u64,
    }
}

wire_struct! {
    pub struct Stream {
        "ID" => pub id: String,
        "Namespace" => pub namespace: String,
        "Output" => pub output: String,
    }
}

/// A Go `net.IP` (or `net.IPMask`): 4 or 16 bytes, or nil.
///
/// Kept as raw bytes because that is what the wire holds, including forms
/// that are not addresses at all; [`Ip::addr`] interprets them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ip(pub ByteBuf);

impl<'de> Deserialize<'de> for Ip {
    /// msgpack: the raw bytes (bin, or str as Go also accepts). Text formats
    /// (the operator's JSON files): an address such as `10.0.0.1` or `fd00::1`.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = Option::<String>::deserialize(d)?.unwrap_or_default();
            if s.is_empty() {
                return Ok(Ip::default());
            }
            let a: IpAddr = s
                .parse()
                .map_err(|_| serde::de::Error::custom(format!("invalid IP address {s:?}")))?;
            Ok(Ip::from(a))
        } else {
            Ok(Ip(ByteBuf::deserialize(d)?))
        }
    }
}

impl Ip {
    pub fn is_nil(&self) -> bool {
        self.0.is_empty()
    }

    /// The address, with the `::ffff:a.b.c.d` form Go's `ParseIP` produces
    /// turned into IPv4. `None` for nil or a length that is no address.
    pub fn addr(&self) -> Option<IpAddr> {
        match self.0.len() {
            4 => {
                let b: [u8; 4] = self.0[..].try_into().ok()?;
                Some(IpAddr::from(b))
            }
            16 => {
                let b: [u8; 16] = self.0[..].try_into().ok()?;
                let v6 = std::net::Ipv6Addr::from(b);
                Some(match v6.to_ipv4_mapped() {
                    Some(v4) => IpAddr::V4(v4),
                    None => IpAddr::V6(v6),
                })
            }
            _ => None,
        }
    }
}

impl From<IpAddr> for Ip {
    fn from(a: IpAddr) -> Self {
        match a {
            IpAddr::V4(v4) => Ip(ByteBuf::from(v4.octets().to_vec())),
            IpAddr::V6(v6) => Ip(ByteBuf::from(v6.octets().to_vec())),
        }
    }
}

impl Serialize for Ip {
    /// Empty is nil, as Go encodes a nil `net.IP`.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.is_nil() {
            s.serialize_none()
        } else if s.is_human_readable() {
            match self.addr() {
                Some(a) => s.serialize_str(&a.to_string()),
                None => s.serialize_bytes(&self.0),
            }
        } else {
            s.serialize_bytes(&self.0)
        }
    }
}

/// The stream method lifecycle events are published under: channel
/// `vmd.manager@0.0.1.Events`, as a Go zbus server publishes a stream.
pub const EVENTS: &str = "Events";

/// The Redis channel of [`VmEvent`]s.
pub fn events_channel() -> String {
    format!("{MODULE}.{OBJECT}@{VERSION}.{EVENTS}")
}

wire_struct! {
    /// A change in a VM's life, published on [`events_channel`]: the Go type
    /// is `VMEvent{Name string; Event string; Seq uint64; At int64; Reason
    /// string \`msgpack:",omitempty"\`}` (`docs/events.md`). Nothing else is
    /// ever published there: a Go stub panics on what it cannot decode.
    pub struct VmEvent {
        "Name" => pub name: String,
        /// `vmd_runtime::events::EventKind`'s wire text: `booted`, `crashed`…
        "Event" => pub event: String,
        /// 1, 2, 3… per VM, without gaps; `created` is 1.
        "Seq" => pub seq: u64,
        /// Unix seconds.
        "At" => pub at: i64,
        /// Why, where there is a reason (an exit status, a stream id…).
        #[serde(skip_serializing_if = "String::is_empty")]
        "Reason" => pub reason: String,
    }
}
