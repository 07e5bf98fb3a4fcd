//! Log streams: vmd-logstream workers shipping a VM's console to a real
//! Redis subscriber, a WebSocket server and a wss server with its own CA.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use vmd::api::Stream;
use vmd::zbus::client::ClientError;
use vmd_tests::flood::{self, seqs};
use vmd_tests::stack::Stack;
use vmd_tests::vm::real_ch;
use vmd_tests::{gunzip, until, RedisServer};

/// 10 MB of console output: 64-byte lines.
const FLOOD: u64 = 10_000_000;

/// The uid stream workers drop to: vmd's `--stream-uid` by default.
const WORKER_UID: u32 = 1879179264;

/// The stack, with console logs big enough that nothing is rotated away
/// during a test.
struct Env(Stack);

impl std::ops::Deref for Env {
    type Target = Stack;
    fn deref(&self) -> &Stack {
        &self.0
    }
}

impl Env {
    async fn start(extra: &[&str]) -> Env {
        let mut flags = vec![
            "--log-rotate-bytes",
            "67108864",
            "--log-keep-bytes",
            "33554432",
        ];
        flags.extend_from_slice(extra);
        Env(Stack::start(&flags).await)
    }

    /// A VM that starts printing `FLOOD` bytes `delay_ms` after it booted.
    async fn flooding_vm(&self, name: &str, delay_ms: u64, bps: u64) {
        flood::run_flooding(self, name, delay_ms, bps, FLOOD).await
    }

    /// Waits until the VM printed all of its flood, and returns the log.
    async fn wait_flood_done(&self, name: &str) -> Vec<u8> {
        flood::wait_done(self, name, FLOOD).await
    }
}

/// Subscribes to `channel` at `url` (retrying until the server is up) and
/// appends every message, gunzipped, to `into`.
async fn subscribe(url: &str, channel: &str, into: Arc<Mutex<Vec<u8>>>) {
    let client = redis::Client::open(url).unwrap();
    let mut pubsub = loop {
        match client.get_async_pubsub().await {
            Ok(p) => break p,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    pubsub.subscribe(channel).await.unwrap();
    tokio::spawn(async move {
        let mut msgs = pubsub.on_message();
        while let Some(m) = msgs.next().await {
            let payload: Vec<u8> = m.get_payload().unwrap();
            into.lock().unwrap().extend(gunzip(&payload));
        }
    });
}

/// Waits until `received` holds `want.len()` bytes, then compares.
async fn assert_received(received: &Arc<Mutex<Vec<u8>>>, want: &[u8]) {
    let t0 = Instant::now();
    while received.lock().unwrap().len() < want.len() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "received {} of {} bytes",
            received.lock().unwrap().len(),
            want.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = received.lock().unwrap().clone();
    assert_eq!(got.len(), want.len());
    assert!(got == want, "received bytes differ from the console");
}

/// The names of the files in `dir` (none when it does not exist).
fn files_in(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn skip() -> bool {
    if real_ch() {
        eprintln!("skipped: needs the double's flood knob");
    }
    real_ch()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_megabytes_to_a_redis_subscriber() {
    if skip() {
        return;
    }
    let env = Env::start(&[]).await;
    let receiver = RedisServer::start_tcp();
    let received = Arc::new(Mutex::new(Vec::new()));
    let url = format!("redis://127.0.0.1:{}/", receiver.tcp_port());
    subscribe(&url, "vm-logs", received.clone()).await;
    env.flooding_vm("rvm", 1500, 20_000_000).await;
    let out = format!("redis://127.0.0.1:{}/vm-logs", receiver.tcp_port());
    env.stub
        .stream_create(
            "rvm",
            &Stream {
                id: "rs".into(),
                namespace: String::new(),
                output: out.clone(),
            },
        )
        .await
        .unwrap();
    let printed = env.wait_flood_done("rvm").await;
    assert_received(&received, &printed).await;
    let i = env.stub.inspect("rvm").await.unwrap();
    let s = &i.streams.unwrap()[0];
    assert_eq!(
        (s.id.as_str(), s.output.as_str(), s.dropped_bytes),
        ("rs", out.as_str(), 0)
    );
    // zinit runs it as stream:<id>.
    assert!(env
        .zinit
        .client()
        .list()
        .await
        .unwrap()
        .contains_key("stream:rs"));
}

/// A WebSocket server (optionally TLS) collecting binary messages;
/// `drop_after` closes the first connection after that many messages.
async fn ws_server(
    tls: Option<tokio_rustls::TlsAcceptor>,
    drop_after: Option<usize>,
) -> (u16, Arc<Mutex<Vec<u8>>>, Arc<Mutex<usize>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let received = Arc::new(Mutex::new(Vec::new()));
    let connections = Arc::new(Mutex::new(0usize));
    let (r, c) = (received.clone(), connections.clone());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let n = {
                let mut c = c.lock().unwrap();
                *c += 1;
                *c
            };
            let limit = if n == 1 { drop_after } else { None };
            let r = r.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                async fn pump<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
                    s: S,
                    r: Arc<Mutex<Vec<u8>>>,
                    limit: Option<usize>,
                ) {
                    let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                        return;
                    };
                    let mut count = 0;
                    while let Some(Ok(m)) = ws.next().await {
                        if let tokio_tungstenite::tungstenite::Message::Binary(b) = m {
                            r.lock().unwrap().extend(gunzip(&b));
                            count += 1;
                            if limit.is_some_and(|l| count >= l) {
                                return; // the receiver goes away mid-stream
                            }
                        }
                    }
                }
                match tls {
                    Some(acc) => {
                        if let Ok(s) = acc.accept(tcp).await {
                            pump(s, r, limit).await
                        }
                    }
                    None => pump(tcp, r, limit).await,
                }
            });
        }
    });
    (port, received, connections)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_megabytes_to_a_websocket_receiver() {
    if skip() {
        return;
    }
    let env = Env::start(&[]).await;
    let (port, received, _) = ws_server(None, None).await;
    env.flooding_vm("wvm", 1500, 20_000_000).await;
    env.stub
        .stream_create(
            "wvm",
            &Stream {
                id: "ws1".into(),
                namespace: String::new(),
                output: format!("ws://127.0.0.1:{port}/logs"),
            },
        )
        .await
        .unwrap();
    let printed = env.wait_flood_done("wvm").await;
    assert_received(&received, &printed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_megabytes_over_wss_with_a_private_ca() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (ca_file, acceptor) = vmd_tests::tls::private_ca(dir.path());
    let env = Env::start(&["--stream-ca-file", ca_file.to_str().unwrap()]).await;
    let (port, received, _) = ws_server(Some(acceptor), None).await;
    env.flooding_vm("svm", 1500, 20_000_000).await;
    env.stub
        .stream_create(
            "svm",
            &Stream {
                id: "wss1".into(),
                namespace: String::new(),
                output: format!("wss://127.0.0.1:{port}/logs"),
            },
        )
        .await
        .unwrap();
    let printed = env.wait_flood_done("svm").await;
    assert_received(&received, &printed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_goes_away_is_reconnected_and_the_gap_is_bounded() {
    if skip() {
        return;
    }
    let env = Env::start(&[]).await;
    // The first connection dies after 100 messages; the worker reconnects.
    let (port, received, connections) = ws_server(None, Some(100)).await;
    env.flooding_vm("gvm", 1500, 5_000_000).await;
    env.stub
        .stream_create(
            "gvm",
            &Stream {
                id: "gap".into(),
                namespace: String::new(),
                output: format!("ws://127.0.0.1:{port}/"),
            },
        )
        .await
        .unwrap();
    let printed = env.wait_flood_done("gvm").await;
    let last = *seqs(&printed).last().unwrap();
    let t0 = Instant::now();
    while seqs(&received.lock().unwrap()).last() != Some(&last) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the stream did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(*connections.lock().unwrap() >= 2, "never reconnected");
    let got = seqs(&received.lock().unwrap());
    // In order; what was in flight when the receiver died may be missing,
    // never more than the worker's buffer (4 MiB = 65 536 lines).
    assert!(got.windows(2).all(|w| w[1] > w[0]), "disorder or repeats");
    let missing = last as usize - got.len();
    assert!(missing <= 65_536, "{missing} lines lost");
    eprintln!("receiver restart: {missing} lines lost in flight (of {last})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_is_restarted_by_zinit_and_resumes() {
    if skip() {
        return;
    }
    let env = Env::start(&[]).await;
    let (port, received, _) = ws_server(None, None).await;
    env.flooding_vm("kvm", 1500, 3_000_000).await;
    env.stub
        .stream_create(
            "kvm",
            &Stream {
                id: "kw".into(),
                namespace: String::new(),
                output: format!("ws://127.0.0.1:{port}/"),
            },
        )
        .await
        .unwrap();
    let svc: zinit::ServiceName = "stream:kw".parse().unwrap();
    let t0 = Instant::now();
    while received.lock().unwrap().len() < 1_000_000 {
        if t0.elapsed() > Duration::from_secs(30) {
            let ring = env.zinit.client().service_log(&svc).await;
            panic!("the stream did not deliver: {ring:#?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = env.zinit.client().status(&svc).await.unwrap().pid;
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    let printed = env.wait_flood_done("kvm").await;
    let last = *seqs(&printed).last().unwrap();
    let t0 = Instant::now();
    while seqs(&received.lock().unwrap()).last() != Some(&last) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the stream did not resume"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_ne!(env.zinit.client().status(&svc).await.unwrap().pid, pid);
    // Nothing lost; what was sent but not yet recorded may come twice.
    let mut got = seqs(&received.lock().unwrap());
    let dups = got.len();
    got.sort();
    got.dedup();
    assert_eq!(
        got.len() as u64,
        last,
        "lines lost across the worker's restart"
    );
    eprintln!("worker restart: {} lines repeated", dups - got.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_streams_are_refused_and_nothing_is_left_behind() {
    let env = Env::start(&[]).await;
    env.stub.run(&env.vm("svm", &[])).await.unwrap();
    let s = |id: &str, out: &str, ns: &str| Stream {
        id: id.into(),
        namespace: ns.into(),
        output: out.into(),
    };
    let cases = [
        ("svm", s("", "redis://h:6379/c", ""), "missing stream id"),
        (
            "svm",
            s("../x", "redis://h:6379/c", ""),
            "invalid stream id",
        ),
        ("svm", s("a b", "redis://h:6379/c", ""), "invalid stream id"),
        (
            "svm",
            s("a\"b", "redis://h:6379/c", ""),
            "invalid stream id",
        ),
        (
            "svm",
            s("a\nb", "redis://h:6379/c", ""),
            "invalid stream id",
        ),
        ("svm", s("ok", "redis://h:6379", ""), "missing channel"),
        ("svm", s("ok", "redis://h:6379/", ""), "missing channel"),
        (
            "svm",
            s("ok", "redis://h:99999/c", ""),
            "invalid stream output",
        ),
        ("svm", s("ok", "ftp://h/x", ""), "unsupported scheme"),
        ("svm", s("ok", "not a url", ""), "invalid stream output"),
        (
            "svm",
            s("ok", "ws://h/x", "../etc"),
            "invalid network namespace",
        ),
        ("svm", s("ok", "ws://h/x", "no-such-ns"), "does not exist"),
        (
            "nope",
            s("ok", "ws://h/x", ""),
            "machine 'nope' does not exist",
        ),
    ];
    for (vm, stream, want) in cases {
        match env.stub.stream_create(vm, &stream).await {
            Err(ClientError::Method(m)) => {
                assert!(m.contains(want), "{stream:?}: {m:?} lacks {want:?}")
            }
            other => panic!("{stream:?}: {other:?}"),
        }
    }
    let services = env.zinit.client().list().await.unwrap();
    assert!(
        !services.keys().any(|k| k.starts_with("stream:")),
        "{services:?}"
    );
    let streams = env.vmd.runtime().join("streams");
    let mut left = files_in(&streams);
    left.retain(|f| f != "progress");
    left.extend(files_in(&streams.join("progress")));
    assert!(left.is_empty(), "stream files left: {left:?}");
    // Unknown or invalid ids delete fine; a taken id is refused, unless the
    // call is an identical retry (a caller that lost the reply).
    env.stub.stream_delete("never-existed").await.unwrap();
    env.stub.stream_delete("../x").await.unwrap();
    env.stub
        .stream_create("svm", &s("dup", "ws://127.0.0.1:9/x", ""))
        .await
        .unwrap();
    env.stub
        .stream_create("svm", &s("dup", "ws://127.0.0.1:9/x", ""))
        .await
        .unwrap();
    let e = env
        .stub
        .stream_create("svm", &s("dup", "ws://127.0.0.1:9/other", ""))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    // Deleting the VM removes its streams.
    env.stub.delete("svm").await.unwrap();
    assert!(!env
        .zinit
        .client()
        .list()
        .await
        .unwrap()
        .contains_key("stream:dup"));
    let mut left = files_in(&streams);
    left.retain(|f| f != "progress");
    left.extend(files_in(&streams.join("progress")));
    assert!(left.is_empty(), "stream files left: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_redis_receiver_is_reconnected_and_the_gap_is_counted() {
    if skip() {
        return;
    }
    let env = Env::start(&[]).await;
    let mut receiver = RedisServer::start_tcp();
    let port = receiver.tcp_port();
    let received = Arc::new(Mutex::new(Vec::new()));
    let url = format!("redis://127.0.0.1:{port}/");
    subscribe(&url, "ch", received.clone()).await;
    env.flooding_vm("rr", 1500, 2_000_000).await;
    env.stub
        .stream_create(
            "rr",
            &Stream {
                id: "rr".into(),
                namespace: String::new(),
                output: format!("redis://127.0.0.1:{port}/ch"),
            },
        )
        .await
        .unwrap();
    let t0 = Instant::now();
    while received.lock().unwrap().len() < 2_000_000 {
        assert!(t0.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The receiver dies and comes back empty; our subscriber comes back late.
    receiver.restart();
    // Late on purpose: what is published meanwhile reaches nobody.
    tokio::time::sleep(Duration::from_millis(700)).await;
    subscribe(&url, "ch", received.clone()).await;
    let printed = env.wait_flood_done("rr").await;
    let t0 = Instant::now();
    let (missing, unheard) = loop {
        let s = env
            .stub
            .inspect("rr")
            .await
            .unwrap()
            .streams
            .unwrap()
            .remove(0);
        let missing = printed.len() as u64 - received.lock().unwrap().len() as u64;
        if s.sent_bytes >= printed.len() as u64 - 10_000 && t0.elapsed() > Duration::from_secs(1) {
            break (missing, s.unheard_bytes);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "stream stuck: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("redis receiver restart: {missing} bytes missing, {unheard} counted unheard");
    assert!(unheard > 0, "the gap was not counted");
    // What is missing is what was counted (give or take what died inside the
    // old Redis with the subscriber's connection).
    assert!(
        missing >= unheard && missing - unheard <= 256 * 1024,
        "missing {missing}, counted {unheard}"
    );
}

/// `ip` as root, or None (then the namespace test skips itself).
fn ip(args: &[&str]) -> Option<()> {
    let ok = std::process::Command::new("ip")
        .args(args)
        .status()
        .ok()?
        .success();
    ok.then_some(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_sends_from_its_network_namespace() {
    if skip() {
        return;
    }
    let ns = format!("vmdtest-{}", std::process::id());
    if unsafe { libc::geteuid() } != 0 || ip(&["netns", "add", &ns]).is_none() {
        eprintln!("skipped: needs root and iproute2 to create a network namespace");
        return;
    }
    struct Cleanup(String, Option<std::process::Child>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            if let Some(c) = self.1.as_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
            let _ = ip(&["netns", "del", &self.0]);
        }
    }
    let mut guard = Cleanup(ns.clone(), None);
    ip(&["-n", &ns, "link", "set", "lo", "up"]).unwrap();
    // A Redis reachable on 127.0.0.1:<port> only inside the namespace; the
    // test subscribes through its unix socket (not namespaced).
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("r.sock");
    let port = 16379 + (std::process::id() % 1000) as u16;
    guard.1 = Some(
        std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "redis-server",
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .arg("--unixsocket")
            .arg(&sock)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(t0.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let received = Arc::new(Mutex::new(Vec::new()));
    subscribe(
        &format!("unix://{}", sock.display()),
        "ns",
        received.clone(),
    )
    .await;
    let env = Env::start(&["--netns-dir", "/run/netns"]).await;
    env.flooding_vm("nsvm", 1000, 20_000_000).await;
    env.stub
        .stream_create(
            "nsvm",
            &Stream {
                id: "ns".into(),
                namespace: ns.clone(),
                output: format!("redis://127.0.0.1:{port}/ns"),
            },
        )
        .await
        .unwrap();
    let printed = env.wait_flood_done("nsvm").await;
    assert_received(&received, &printed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_limited_per_vm_and_per_host_with_a_clear_error() {
    let env = Env::start(&["--max-streams-per-vm", "2", "--max-streams", "3"]).await;
    env.stub.run(&env.vm("lim-a", &[])).await.unwrap();
    env.stub.run(&env.vm("lim-b", &[])).await.unwrap();
    let s = |id: &str| Stream {
        id: id.into(),
        namespace: String::new(),
        output: "ws://127.0.0.1:9/x".into(),
    };
    let refusal = |r: Result<(), ClientError>| match r {
        Err(ClientError::Method(m)) => m,
        other => panic!("not refused: {other:?}"),
    };
    env.stub.stream_create("lim-a", &s("a1")).await.unwrap();
    env.stub.stream_create("lim-a", &s("a2")).await.unwrap();
    let m = refusal(env.stub.stream_create("lim-a", &s("a3")).await);
    assert!(
        m.contains("vm lim-a has 2 log streams already") && m.contains("(2)"),
        "{m}"
    );
    // A retry of a stream that exists is no new stream: the same success.
    env.stub.stream_create("lim-a", &s("a2")).await.unwrap();
    env.stub.stream_create("lim-b", &s("b1")).await.unwrap();
    let m = refusal(env.stub.stream_create("lim-b", &s("b2")).await);
    assert!(m.contains("the host has 3 log streams already"), "{m}");
    // Nothing of the refused ones is left; room again after a delete.
    let services = env.zinit.client().list().await.unwrap();
    for refused in ["stream:a3", "stream:b2"] {
        assert!(!services.contains_key(refused), "{services:?}");
    }
    env.stub.stream_delete("a1").await.unwrap();
    env.stub.stream_create("lim-b", &s("b2")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_create_died_half_way_is_finished_by_the_same_create() {
    // vmd killed inside StreamCreate, after the stream's record and before
    // its service: the request, served again by the next vmd, finds the
    // record of this very stream and must finish it — not call its own
    // stream a duplicate. Another stream under that id is still refused.
    let env = Env::start(&["--max-streams-per-vm", "1"]).await;
    env.stub.run(&env.vm("half", &[])).await.unwrap();
    let stream = Stream {
        id: "half-made".into(),
        namespace: String::new(),
        output: "ws://127.0.0.1:9/x".into(),
    };
    let record = env.vmd.runtime().join("streams").join("half-made.json");
    std::fs::create_dir_all(record.parent().unwrap()).unwrap();
    let spec = serde_json::json!({
        "id": "half-made", "vm": "half", "namespace": "", "output": "ws://127.0.0.1:9/x",
    });
    std::fs::write(&record, spec.to_string()).unwrap();
    let other = Stream {
        output: "ws://127.0.0.1:9/elsewhere".into(),
        ..stream.clone()
    };
    match env.stub.stream_create("half", &other).await {
        Err(ClientError::Method(m)) => assert!(m.contains("already exists"), "{m}"),
        r => panic!("another stream under the id was not refused: {r:?}"),
    }
    // The one at the per-VM limit is this one: no refusal for room either.
    env.stub.stream_create("half", &stream).await.unwrap();
    let services = env.zinit.client().list().await.unwrap();
    assert!(services.contains_key("stream:half-made"), "{services:?}");
    env.stub.stream_delete("half-made").await.unwrap();
    env.stub.delete("half").await.unwrap();
    env.assert_nothing_left().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receivers_credentials_appear_nowhere_but_in_the_record() {
    // The output URL is a user's: its password and token go to the worker
    // through the 0600 record, never a command line, a service file,
    // zinit's log, vmd's log, Inspect or `vmd ctl`.
    let env = Env::start(&[]).await;
    env.stub.run(&env.vm("secretive", &[])).await.unwrap();
    let stream = Stream {
        id: "with-secrets".into(),
        namespace: String::new(),
        output: "wss://user:hunter2@127.0.0.1:9/in?token=s3cr3t".into(),
    };
    env.stub.stream_create("secretive", &stream).await.unwrap();
    let info = env.stub.inspect("secretive").await.unwrap();
    let shown = &info.streams.unwrap()[0].output;
    assert_eq!(shown, "wss://***@127.0.0.1:9/in?***");
    // The worker runs (and fails to connect, saying so in zinit's log).
    let progress = format!(
        "{}/streams/progress/with-secrets.progress",
        env.vmd.runtime().display()
    );
    until(Duration::from_secs(10), "the worker runs", || {
        std::future::ready(!vmd_tests::supervisor::processes_with(&progress).is_empty())
    })
    .await;
    until(
        Duration::from_secs(10),
        "the worker says where it streams",
        || std::future::ready(env.zinit.output().contains("stream:with-secrets")),
    )
    .await;
    let (code, ctl, _) = env.vmd.ctl(&["inspect", "secretive"]);
    assert_eq!(code, 0);
    let unit =
        std::fs::read_to_string(env.zinit.config_path().join("stream:with-secrets.yaml")).unwrap();
    let mut seen = vec![
        ("vmd ctl inspect", ctl),
        ("the service file", unit),
        ("zinit's log", env.zinit.output()),
        ("vmd's log", env.vmd.stderr()),
    ];
    for pid in vmd_tests::supervisor::processes_with(&progress) {
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        seen.push(("a command line", String::from_utf8_lossy(&cmd).into_owned()));
    }
    for (where_, text) in seen {
        for secret in ["hunter2", "s3cr3t"] {
            assert!(!text.contains(secret), "{secret} in {where_}:\n{text}");
        }
    }
    // The record has it, for the worker alone.
    let record = env.vmd.runtime().join("streams").join("with-secrets.json");
    let mode = std::os::unix::fs::MetadataExt::mode(&std::fs::metadata(&record).unwrap());
    assert_eq!(mode & 0o777, 0o600);
    assert!(std::fs::read_to_string(&record)
        .unwrap()
        .contains("hunter2"));
    env.stub.delete("secretive").await.unwrap();
    env.assert_nothing_left().await;
}

/// Issue 26: a worker talks to a receiver a VM's user chose; once set up it
/// runs as the stream uid, in its VM's log group alone, with no capability
/// — it can read its own VM's console and no other's, and still ships it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_drops_root_and_reads_only_its_own_vms_log() {
    if skip() || unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root");
        return;
    }
    let env = Env::start(&[]).await;
    let (port, received, _) = ws_server(None, None).await;
    env.flooding_vm("mine", 1500, 200_000).await;
    env.flooding_vm("theirs", 1500, 200_000).await;
    env.stub
        .stream_create(
            "mine",
            &Stream {
                id: "dropped".into(),
                namespace: String::new(),
                output: format!("ws://127.0.0.1:{port}/"),
            },
        )
        .await
        .unwrap();
    let t0 = Instant::now();
    while received.lock().unwrap().len() < 100_000 {
        assert!(t0.elapsed() < Duration::from_secs(30), "nothing shipped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let progress = format!(
        "{}/streams/progress/dropped.progress",
        env.vmd.runtime().display()
    );
    let pids = vmd_tests::supervisor::processes_with(&progress);
    let pid = *pids.first().expect("the worker");
    let status = |f: &str| vmd_tests::vm::proc_status(pid as i32, f).unwrap_or_default();
    let logs = env.vmd.root().join("logs");
    let gid_of =
        |vm: &str| std::os::unix::fs::MetadataExt::gid(&std::fs::metadata(logs.join(vm)).unwrap());
    let (mine, theirs) = (gid_of("mine"), gid_of("theirs"));
    assert!(
        mine != 0 && theirs != 0 && mine != theirs,
        "{mine} {theirs}"
    );
    assert_eq!(
        status("Uid"),
        format!("{WORKER_UID}\t{WORKER_UID}\t{WORKER_UID}\t{WORKER_UID}")
    );
    assert_eq!(status("Gid"), format!("{mine}\t{mine}\t{mine}\t{mine}"));
    assert_eq!(status("Groups"), "");
    assert_eq!(status("CapEff"), "0000000000000000");
    assert_eq!(status("CapBnd"), "0000000000000000");
    assert_eq!(status("NoNewPrivs"), "1");
    // Another VM's log is in another group, closed to others.
    let mode =
        std::os::unix::fs::MetadataExt::mode(&std::fs::metadata(logs.join("theirs")).unwrap());
    assert_eq!(mode & 0o007, 0, "{mode:o}");
    env.stub.delete("mine").await.unwrap();
    env.stub.delete("theirs").await.unwrap();
    env.assert_nothing_left().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn where_a_new_stream_starts_is_recorded_for_its_worker_to_read() {
    // vmd (root) records where a new stream starts before zinit runs the
    // worker, which resumes from it. The worker runs as its own uid: a
    // record of root's, 0600, is one it cannot read, and a worker that
    // starts late (killed before its first save, say) then starts at a
    // later tail, and what the VM printed in between is never sent. A
    // worker that exits at once (`/bin/false`) leaves vmd's record as vmd
    // wrote it.
    if skip() || unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root");
        return;
    }
    let env = Env::start(&["--logstream", "/bin/false"]).await;
    env.flooding_vm("rec", 0, 100_000).await;
    env.stub
        .stream_create(
            "rec",
            &Stream {
                id: "rec-s".into(),
                namespace: String::new(),
                output: "ws://127.0.0.1:9/".into(),
            },
        )
        .await
        .unwrap();
    let record = env.vmd.runtime().join("streams/progress/rec-s.progress");
    let md = std::fs::metadata(&record).expect("vmd recorded where the stream starts");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        md.uid(),
        WORKER_UID,
        "the record is not the worker's to read"
    );
    assert_eq!(md.mode() & 0o777, 0o600);
    env.stub.stream_delete("rec-s").await.unwrap();
    env.stub.delete("rec").await.unwrap();
    env.assert_nothing_left().await;
}
