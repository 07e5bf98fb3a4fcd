//! `network-double`: the Zero-OS network module as far as vmd asks it
//! (`Namespace`, `GetSubnet`; see `vmd_tests::network_double`), for the
//! demo and for trying vmd by hand.
//!
//!   network-double --broker unix:///path/redis.sock --net zosnet1=10.20.2.0/24

use std::net::Ipv4Addr;

use clap::Parser;
use vmd::zbus::broker::Broker;
use vmd_tests::network_double::{NetworkDouble, Subnets};

#[derive(Parser)]
#[command(name = "network-double")]
struct Cli {
    /// Redis: unix:///path or tcp://host:port.
    #[arg(long)]
    broker: Broker,
    /// The module name (requests on `<module>.network@0.0.1`).
    #[arg(long, default_value = "network")]
    module: String,
    /// A private network: NETID=A.B.C.D/PREFIX (repeatable).
    #[arg(long = "net")]
    nets: Vec<String>,
    /// Send subnets in the 4-byte form (the real module sends 16 bytes).
    #[arg(long)]
    ip4: bool,
}

fn parse(net: &str) -> Result<(String, (Ipv4Addr, u8)), String> {
    let bad = || format!("--net {net:?}: expected NETID=A.B.C.D/PREFIX");
    let (id, cidr) = net.split_once('=').ok_or_else(bad)?;
    let (addr, prefix) = cidr.split_once('/').ok_or_else(bad)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32).ok_or_else(bad)?;
    Ok((id.to_owned(), (addr, prefix)))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let mut subnets = Subnets {
        ip16: !cli.ip4,
        ..Default::default()
    };
    for n in &cli.nets {
        match parse(n) {
            Ok((id, net)) => {
                subnets.nets.insert(id, net);
            }
            Err(e) => {
                eprintln!("network-double: {e}");
                return std::process::ExitCode::from(2);
            }
        }
    }
    let _double = NetworkDouble::start(&cli.broker, &cli.module, subnets).await;
    let _ = tokio::signal::ctrl_c().await;
    std::process::ExitCode::SUCCESS
}
