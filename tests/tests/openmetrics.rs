//! The OpenMetrics endpoint scraped by a real Prometheus (Debian's
//! `prometheus`, which `tests/scripts/test.sh` installs): the series a VM
//! leaves are what the VM did — its restarts, the frames its guest sent, its
//! state — asked of Prometheus' own HTTP API; `promtool check metrics`
//! passes on a scrape.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmd::api::VmIface;
use vmd_tests::scrape::{free_port, get, get_as};
use vmd_tests::stack::Stack;

fn urlencode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn tool(name: &str) -> String {
    let p = format!("/usr/bin/{name}");
    assert!(
        Path::new(&p).exists(),
        "{p} is missing: install Debian's prometheus package (tests/scripts/test.sh does)"
    );
    p
}

struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: vmd\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus");
        Prometheus {
            child,
            addr,
            _dir: dir,
        }
    }

    /// The value of the instant query `q`'s only series, if it has one.
    fn value(&self, q: &str) -> Option<f64> {
        let (code, body) = get(self.addr, &format!("/api/v1/query?query={}", urlencode(q))).ok()?;
        if code != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let result = v["data"]["result"].as_array()?;
        if result.len() != 1 {
            return None;
        }
        result[0]["value"][1].as_str()?.parse().ok()
    }

    /// Waits until `q` is `want` in Prometheus (scraped every second).
    async fn wait_for(&self, q: &str, want: f64) {
        let t0 = Instant::now();
        loop {
            let got = self.value(q);
            if got == Some(want) {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "Prometheus: {q} is {got:?}, expected {want}; log:\n{}",
                std::fs::read_to_string(self._dir.path().join("prometheus.log"))
                    .unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn running_vmm(env: &Stack, name: &str, restarts: u64) -> i64 {
    let t0 = Instant::now();
    loop {
        let i = env.stub.inspect(name).await.unwrap();
        if i.restarts == Some(restarts) && i.state.as_deref() == Some("running") {
            if let Some(pid) = i.pid {
                return pid;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{name} not running after {restarts} restarts: {i:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_sees_what_a_vm_did() {
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let listen_s = listen.to_string();
    let env = Stack::start_with_real_tap_counters(&["--metrics-listen", &listen_s]).await;
    let Some(ns) = env.taps.as_ref() else {
        panic!("this test needs root: the taps are made in a namespace of their own");
    };
    // A persistent tap, as the network module makes them on a node.
    env.tap("t-om", [0; 4]);
    let made = ns
        .command("ip")
        .args(["tuntap", "add", "t-om", "mode", "tap", "vnet_hdr"])
        .status()
        .unwrap();
    assert!(made.success());
    let mut vm = env.vm("om", &[("double.net_send", "5")]);
    vm.network.ifaces.push(VmIface {
        tap: "t-om".into(),
        mac: "02:00:00:00:0a:01".into(),
        ..Default::default()
    });
    env.stub.run(&vm).await.unwrap();
    // Restarted twice: each boot sends 5 frames.
    for restarts in 0..2 {
        let pid = running_vmm(&env, "om", restarts).await;
        env.wait_logs_since("om", "GUEST-NET-SENT", 0).await;
        // SAFETY: kill has no memory effects.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    running_vmm(&env, "om", 2).await;
    let t0 = Instant::now();
    while std::fs::read_to_string(env.log("om"))
        .unwrap_or_default()
        .matches("GUEST-NET-SENT fd=4 frames=5")
        .count()
        < 3
    {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the third boot sent nothing"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A log stream to Loki, for the stream and service series.
    let loki = vmd_tests::loki::LokiReceiver::start(Default::default()).await;
    env.stub
        .stream_create(
            "om",
            &vmd::api::Stream {
                id: "om-logs".into(),
                namespace: String::new(),
                output: format!("http://127.0.0.1:{}", loki.port),
            },
        )
        .await
        .unwrap();
    vmd_tests::until(Duration::from_secs(20), "the console in Loki", || {
        std::future::ready(
            loki.entries()
                .iter()
                .any(|e| e.line.contains("GUEST-NET-SENT")),
        )
    })
    .await;
    let series = |text: &str, name: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    };
    // The worker records its progress within half a second of its last
    // send: then the stream has caught up with the console.
    let text = vmd_tests::until_some(Duration::from_secs(10), "the stream's progress", || {
        let text = get(listen, "/metrics").unwrap().1;
        let lag = series(&text, r#"vmd_stream_lag_bytes{stream="om-logs",vm="om"}"#);
        std::future::ready((lag == Some(0.0)).then_some(text))
    })
    .await;
    let sent = series(
        &text,
        r#"vmd_stream_sent_bytes_total{stream="om-logs",vm="om"}"#,
    );
    let written = series(&text, r#"vmd_vm_console_written_bytes_total{vm="om"}"#);
    assert!(sent.is_some_and(|s| s > 0.0), "{text}");
    assert!(written.is_some_and(|w| w >= sent.unwrap()), "{text}");
    assert_eq!(
        series(&text, r#"vmd_stream_connected{stream="om-logs",vm="om"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        series(&text, r#"vmd_services{kind="vm",state="up"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        series(&text, r#"vmd_services{kind="stream",state="up"}"#),
        Some(1.0),
        "{text}"
    );

    // What vmd serves is valid, by Prometheus' own linter.
    let (code, text) = get(listen, "/metrics").unwrap();
    assert_eq!(code, 200, "{text}");
    let mut lint = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    lint.stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let linted = lint.wait_with_output().unwrap();
    assert!(
        linted.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&linted.stdout),
        String::from_utf8_lossy(&linted.stderr)
    );
    assert_eq!(get(listen, "/other").unwrap().0, 404);
    // What Prometheus asks for: OpenMetrics, ended as the format says.
    let (code, head, om) = get_as(
        listen,
        "/metrics",
        "application/openmetrics-text;version=1.0.0,*/*;q=0.1",
    )
    .unwrap();
    assert_eq!(code, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    assert!(om.ends_with("# EOF\n"), "{om}");

    let prom = Prometheus::start(listen);
    prom.wait_for(r#"up{job="vmd"}"#, 1.0).await;
    prom.wait_for(r#"vmd_vm_restarts_total{vm="om"}"#, 2.0)
        .await;
    prom.wait_for(r#"vmd_vm_state{vm="om",state="running"}"#, 1.0)
        .await;
    prom.wait_for(
        r#"vmd_vm_network_receive_packets_total{vm="om",interface="t-om",network="private"}"#,
        15.0,
    )
    .await;
    prom.wait_for(r#"vmd_vm_network_receive_bytes_total{vm="om"}"#, 1500.0)
        .await;
    let cpu = prom.value(r#"vmd_vm_cpu_seconds_total{vm="om"}"#);
    assert!(cpu.is_some_and(|c| c >= 0.0), "no CPU time: {cpu:?}");
    let rss = prom.value(r#"vmd_vm_memory_rss_bytes{vm="om"}"#);
    assert!(rss.is_some_and(|r| r > 0.0), "no memory: {rss:?}");
    // vmd's own calls: the Runs and Inspects above, by outcome.
    prom.wait_for(r#"vmd_zbus_calls_total{method="Run",outcome="ok"}"#, 1.0)
        .await;
    let inspects = prom.value(r#"vmd_zbus_calls_total{method="Inspect",outcome="ok"}"#);
    assert!(inspects.is_some_and(|n| n >= 3.0), "{inspects:?}");
    // The zbus Metrics says the same as the endpoint.
    let m = &env.stub.metrics().await.unwrap()["om"];
    assert_eq!(
        (m.private.net_rx_packets, m.private.net_rx_bytes),
        (15, 1500)
    );
    assert_eq!(m.restarts, Some(2));

    // And `vmd ctl` shows it to a person: totals, then rates like top.
    let (code, out, err) = env.vmd.ctl(&["metrics"]);
    assert_eq!(code, 0, "{err}");
    let row: Vec<&str> = out
        .lines()
        .find(|l| l.starts_with("om "))
        .unwrap_or_else(|| panic!("no row for om:\n{out}"))
        .split_whitespace()
        .collect();
    // NAME RST CPU MEM DISK RD DISK WR PRIV RX …
    assert_eq!((row[1], row[6]), ("2", "1.5K"), "{out}");
    assert!(row[2].parse::<f64>().is_ok() && row[3] != "-", "{out}");
    let (code, out, err) = env.vmd.ctl(&["top", "-n", "2", "-d", "0.2", "--json"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{out}");
    let om = &lines[1][0];
    assert_eq!(om["name"], "om");
    assert!(om["cpu_percent"].as_f64().is_some_and(|c| c >= 0.0), "{om}");
    assert!(om["memory_rss"].as_u64().is_some_and(|b| b > 0), "{om}");
    assert_eq!(om["net_rx_per_sec"], 0.0);
}
