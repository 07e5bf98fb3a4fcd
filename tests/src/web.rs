//! A web console set up as on a node, for tests and benchmarks: a network
//! namespace holding the private subnet's `.1`, the network-module double
//! that names it, vmd asking it; and a WebSocket client of the console.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use vmd::api::{Ip, IpNet, Vm, VmIface};

use crate::netns::{NetNs, NETNS_DIR};
use crate::network_double::{NetworkDouble, Subnets};
use crate::stack::Stack;
use crate::vm::boot_timeout;

const SHORT: Duration = Duration::from_secs(10);

/// What the guest's shell (busybox `sh`, real or the double's) prints when
/// it is up.
pub const PROMPT: &str = "/ # ";

/// Whether `console` shows the shell prompt of the guest's `n`th boot
/// (what is typed before it reaches no one).
pub fn shell_prompted(console: &str, n: usize) -> bool {
    console
        .split("GUEST-HELLO")
        .nth(n)
        .is_some_and(|boot| boot.contains(PROMPT))
}

/// The pid of the web console server of vm `name`, if one runs.
pub fn console_server(name: &str) -> Option<i32> {
    crate::supervisor::processes_with("vmd-console")
        .into_iter()
        .find(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(name))
        })
}

/// An interface on network `net_id` (empty: none) with `ips`.
pub fn iface(tap: &str, net_id: &str, ips: &[&str]) -> VmIface {
    VmIface {
        tap: tap.into(),
        mac: "de:ad:be:ef:00:01".into(),
        ips: ips
            .iter()
            .map(|a| {
                let ip: IpAddr = a.parse().unwrap();
                // /24 or /64
                let mask = match ip {
                    IpAddr::V4(_) => vec![255, 255, 255, 0],
                    IpAddr::V6(_) => [vec![255; 8], vec![0; 8]].concat(),
                };
                IpNet {
                    ip: Ip::from(ip),
                    mask: Ip(serde_bytes::ByteBuf::from(mask)),
                }
            })
            .collect(),
        net_id: net_id.into(),
        ..Default::default()
    }
}

/// A VM of `env` with `ifaces` (their taps made in its fake sysfs).
pub fn with_ifaces(env: &Stack, name: &str, ifaces: Vec<VmIface>) -> Vm {
    let mut vm = env.vm(name, &[("gaction", "wait")]);
    for i in &ifaces {
        env.tap(&i.tap, [0; 4]);
    }
    vm.network.ifaces = ifaces;
    vm
}

/// A web console set up as on a node: the namespace with the subnet's `.1`,
/// the network module that names it, vmd that asks.
pub struct Web {
    pub env: Stack,
    pub ns: NetNs,
    _double: NetworkDouble,
}

impl Web {
    pub async fn start(address: Option<&str>) -> Result<Web, String> {
        Self::start_with(address, &[]).await
    }

    /// The same with more of vmd's flags.
    pub async fn start_with(address: Option<&str>, extra: &[&str]) -> Result<Web, String> {
        let ns = NetNs::new(address)?;
        let mut args = vec!["--network-module", "net1", "--netns-dir", NETNS_DIR];
        args.extend_from_slice(extra);
        let env = Stack::start(&args).await;
        let mut subnets = Subnets {
            ip16: true,
            ..Default::default()
        };
        subnets
            .nets
            .insert(ns.net_id.clone(), (Ipv4Addr::new(10, 20, 2, 0), 24));
        let double = NetworkDouble::start(&env.redis.broker(), "net1", subnets).await;
        Ok(Web {
            env,
            ns,
            _double: double,
        })
    }

    /// A VM on the namespace's network at `10.20.2.<last_octet>`, with a
    /// shell on its console.
    pub fn vm(&self, name: &str, last_octet: u8) -> Vm {
        let mut vm = with_ifaces(
            &self.env,
            name,
            vec![iface(
                &format!("t-{last_octet}"),
                &self.ns.net_id,
                &[&format!("10.20.2.{last_octet}")],
            )],
        );
        vm.kernel_args.insert("gaction".into(), "shell".into());
        vm
    }

    /// An HTTP request from inside the namespace: (status, body).
    pub fn get(&self, port: u16, path: &str) -> (u16, Vec<u8>) {
        use std::io::{Read, Write};
        let mut s = self
            .ns
            .connect(SocketAddr::from((Ipv4Addr::new(10, 20, 2, 1), port)))
            .unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: 10.20.2.1\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).unwrap();
        let head_end = reply.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let status = String::from_utf8_lossy(&reply[9..12]).parse().unwrap();
        (status, reply[head_end + 4..].to_vec())
    }

    pub async fn ws(&self, port: u16) -> Ws {
        let fail =
            |what: String| -> ! { panic!("{what}; zinit's output:\n{}", self.env.zinit.output()) };
        let s = self
            .ns
            .connect(SocketAddr::from((Ipv4Addr::new(10, 20, 2, 1), port)))
            .unwrap_or_else(|e| fail(format!("cannot connect to the console: {e}")));
        s.set_nonblocking(true).unwrap();
        let s = tokio::net::TcpStream::from_std(s).unwrap();
        let url = format!("ws://10.20.2.1:{port}/ws");
        let (ws, _) = tokio_tungstenite::client_async(url, s)
            .await
            .unwrap_or_else(|e| fail(format!("no WebSocket: {e}")));
        Ws {
            ws,
            seen: String::new(),
        }
    }
}

pub struct Ws {
    pub ws: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    pub seen: String,
}

impl Ws {
    /// Waits for `text` `times` times; `false` if the socket closed first.
    pub async fn wait_for(&mut self, text: &str, times: usize, limit: Duration) -> bool {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        let t0 = Instant::now();
        while self.seen.matches(text).count() < times {
            let left = limit.saturating_sub(t0.elapsed());
            match tokio::time::timeout(left, self.ws.next()).await {
                Ok(Some(Ok(Message::Binary(b)))) => {
                    self.seen.push_str(&String::from_utf8_lossy(&b))
                }
                Ok(Some(Ok(Message::Text(t)))) => panic!("a text frame: {t}"),
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(_))) | Ok(None) => return false,
                Err(_) => panic!(
                    "{text:?} x{times} not on the web console; it shows:\n{}",
                    self.seen
                ),
            }
        }
        true
    }

    /// Waits until the shell of the guest's `n`th boot prompts.
    pub async fn wait_shell_of_boot(&mut self, n: usize) {
        let t0 = Instant::now();
        loop {
            if shell_prompted(&self.seen, n) {
                return;
            }
            assert!(
                t0.elapsed() < boot_timeout() + SHORT,
                "no shell of boot {n}:\n{}",
                self.seen
            );
            assert!(
                self.pump(Duration::from_millis(200)).await,
                "closed:\n{}",
                self.seen
            );
        }
    }

    /// Reads what comes within `d`; `false` once the socket closed.
    pub async fn pump(&mut self, d: Duration) -> bool {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        match tokio::time::timeout(d, self.ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => {
                self.seen.push_str(&String::from_utf8_lossy(&b));
                true
            }
            Ok(Some(Ok(Message::Text(t)))) => panic!("a text frame: {t}"),
            Ok(Some(Ok(_))) | Err(_) => true,
            Ok(Some(Err(_))) | Ok(None) => false,
        }
    }

    /// Types `line` and Enter, each key a frame, each after its echo.
    pub async fn type_line(&mut self, line: &str) {
        use futures_util::SinkExt;
        use tokio_tungstenite::tungstenite::Message;
        for (i, c) in line.char_indices() {
            let typed = &line[..i + c.len_utf8()];
            let before = self.seen.matches(typed).count();
            self.ws
                .send(Message::Binary(c.to_string().into_bytes().into()))
                .await
                .unwrap();
            assert!(
                self.wait_for(typed, before + 1, boot_timeout()).await,
                "closed"
            );
        }
        self.ws
            .send(Message::Binary(b"\r".to_vec().into()))
            .await
            .unwrap();
    }
}
