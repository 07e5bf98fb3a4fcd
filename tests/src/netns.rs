//! Network namespaces made by a test, as the Zero-OS network module makes
//! them (`ip netns add`, so under `/var/run/netns`), with the private
//! subnet's `.1` address; removed when dropped.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

pub const NETNS_DIR: &str = "/var/run/netns";

pub struct NetNs {
    /// The namespace's name (`n-<net id>`, as the network module names it).
    pub name: String,
    /// The network id it belongs to.
    pub net_id: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

impl NetNs {
    /// A namespace with `lo` up and `address` (e.g. `10.20.2.1/24`) on it;
    /// `Err(why)` where namespaces cannot be made (not root).
    pub fn new(address: Option<&str>) -> Result<NetNs, String> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        if !nix::unistd::geteuid().is_root() {
            return Err("network namespaces need root".into());
        }
        let net_id = format!(
            "vmdt{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let ns = NetNs {
            name: format!("n-{net_id}"),
            net_id,
        };
        ip(&["netns", "add", &ns.name])?;
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        if let Some(a) = address {
            ip(&["-n", &ns.name, "addr", "add", a, "dev", "lo"])?;
        }
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.name)
    }

    /// `program` run inside the namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// A TCP connection made from inside the namespace.
    pub fn connect(&self, addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpStream> {
        let file = std::fs::File::open(self.path())?;
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
                std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))
            })
            .join()
            .unwrap()
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}
