//! The web console's placement: vmd asks the network module (a double that
//! answers byte-for-byte as the Go server does) where each VM's console goes,
//! by Zero-OS's rule, and records it in the VM's description.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use vmd::api::{Ip, IpNet, Vm, VmIface};
use vmd::zbus::client::ClientError;
use vmd_runtime::spec::VmSpec;
use vmd_tests::network_double::{NetworkDouble, Subnets};
use vmd_tests::stack::Stack;

fn method_err(e: ClientError) -> String {
    match e {
        ClientError::Method(m) => m,
        other => panic!("expected a method error, got {other}"),
    }
}

fn iface(tap: &str, net_id: &str, ips: &[&str]) -> VmIface {
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

fn with_ifaces(env: &Stack, name: &str, ifaces: Vec<VmIface>) -> Vm {
    let mut vm = env.vm(name, &[("gaction", "wait")]);
    for i in &ifaces {
        env.tap(&i.tap, [0; 4]);
    }
    vm.network.ifaces = ifaces;
    vm
}

fn spec(env: &Stack, name: &str) -> VmSpec {
    VmSpec::load(&env.run_dir(name).join("vm.json")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_network_module_places_the_console_by_the_zero_os_rule() {
    let env = Stack::start(&["--network-module", "net1", "--netns-dir", "/run/test-netns"]).await;
    let mut subnets = Subnets {
        ip16: true, // what the real module sends
        ..Default::default()
    };
    subnets
        .nets
        .insert("zosnet1".into(), (Ipv4Addr::new(10, 20, 2, 0), 24));
    let double = NetworkDouble::start(&env.redis.broker(), "net1", subnets).await;

    // The first interface with a private network and an IPv4 address.
    let vm = with_ifaces(
        &env,
        "12-1-a",
        vec![
            iface("p-a", "", &["185.69.1.7"]),
            iface("t-a6", "zosnet1", &["fd00::5"]),
            iface("t-a", "zosnet1", &["10.20.2.5"]),
        ],
    );
    env.stub.run(&vm).await.unwrap();
    let web = spec(&env, "12-1-a").web_console.expect("a web console");
    assert_eq!(web.netns, std::path::Path::new("/run/test-netns/n-zosnet1"));
    assert_eq!(web.address, Ipv4Addr::new(10, 20, 2, 1));
    assert_eq!(web.port, 20_005);
    assert_eq!(web.url(), "10.20.2.1:20005");
    assert_eq!(
        double.calls(),
        [
            ("Namespace".to_owned(), "zosnet1".to_owned()),
            ("GetSubnet".to_owned(), "zosnet1".to_owned())
        ]
    );

    // No private network: no console, nothing asked.
    let vm = with_ifaces(&env, "12-1-b", vec![iface("p-b", "", &["185.69.1.8"])]);
    env.stub.run(&vm).await.unwrap();
    assert_eq!(spec(&env, "12-1-b").web_console, None);
    assert_eq!(double.calls().len(), 2);

    // An unknown network: Run fails as Zero-OS's does, nothing is left.
    let vm = with_ifaces(&env, "12-1-c", vec![iface("t-c", "nosuch", &["10.30.0.9"])]);
    let e = method_err(env.stub.run(&vm).await.unwrap_err());
    assert_eq!(
        e,
        "could not get console config for vm 12-1-c: network not found"
    );
    env.assert_gone("12-1-c").await;
    assert!(!env.stub.exists("12-1-c").await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_network_module_is_a_clear_error_within_its_budget() {
    let env = Stack::start(&["--network-module", "nobody", "--network-timeout-secs", "2"]).await;
    let vm = with_ifaces(
        &env,
        "12-2-a",
        vec![iface("t-a", "zosnet1", &["10.20.2.5"])],
    );
    let t0 = Instant::now();
    let e = method_err(env.stub.run(&vm).await.unwrap_err());
    let took = t0.elapsed();
    assert!(
        e.starts_with(
            "could not get console config for vm 12-2-a: no reply from nobody.network@0.0.1"
        ),
        "{e}"
    );
    // One call's budget (2 s), not a hang; the caller's deadline is 90 s.
    assert!(took < Duration::from_secs(30), "took {took:?}");
    env.assert_gone("12-2-a").await;

    // `none`: no network module, no web console, Run works.
    drop(env);
    let env = Stack::start(&["--network-module", "none"]).await;
    let vm = with_ifaces(
        &env,
        "12-2-b",
        vec![iface("t-b", "zosnet1", &["10.20.2.6"])],
    );
    let info = env.stub.run(&vm).await.unwrap();
    assert_eq!(info.console_url, "");
    assert_eq!(spec(&env, "12-2-b").web_console, None);
}
