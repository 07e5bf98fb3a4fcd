//! The web console's placement: vmd asks the network module (a double that
//! answers byte-for-byte as the Go server does) where each VM's console goes,
//! by Zero-OS's rule, and records it in the VM's description.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use vmd::zbus::client::ClientError;
use vmd_runtime::spec::VmSpec;
use vmd_tests::browser::{Browser, Page};
use vmd_tests::network_double::{NetworkDouble, Subnets};
use vmd_tests::scrape::{free_port, get, sample, scrape_sample};
use vmd_tests::vm::boot_timeout;
use vmd_tests::web::{console_server, iface, shell_prompted, with_ifaces, Web};

const SHORT: Duration = Duration::from_secs(10);
use vmd_tests::stack::Stack;

fn method_err(e: ClientError) -> String {
    match e {
        ClientError::Method(m) => m,
        other => panic!("expected a method error, got {other}"),
    }
}

fn spec(env: &Stack, name: &str) -> VmSpec {
    VmSpec::load(&env.run_dir(name).join("vm.json")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_network_module_places_the_console_by_the_zero_os_rule() {
    let listen = format!("127.0.0.1:{}", free_port());
    let env = Stack::start(&[
        "--network-module",
        "net1",
        "--netns-dir",
        "/run/test-netns",
        "--metrics-listen",
        &listen,
    ])
    .await;
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

    // The endpoint counts each call to the module by its outcome.
    let (_, text) = get(listen.parse().unwrap(), "/metrics").unwrap();
    let calls = |method: &str, outcome: &str| {
        sample(
            &text,
            &format!(
                r#"vmd_peer_calls_total{{module="net1",method="{method}",outcome="{outcome}"}}"#
            ),
        )
        .unwrap_or(0.0)
    };
    // (A namespace is a name for any network; the unknown one fails at
    // its subnet.)
    assert_eq!(calls("Namespace", "ok"), 2.0, "{text}");
    assert_eq!(calls("GetSubnet", "ok"), 1.0, "{text}");
    assert_eq!(calls("GetSubnet", "error"), 1.0, "{text}");
    assert_eq!(calls("Namespace", "error"), 0.0, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_network_module_is_a_clear_error_within_its_budget() {
    let listen = format!("127.0.0.1:{}", free_port());
    let env = Stack::start(&[
        "--network-module",
        "nobody",
        "--network-timeout-secs",
        "2",
        "--metrics-listen",
        &listen,
    ])
    .await;
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
    let timeouts = r#"vmd_peer_calls_total{module="nobody",method="Namespace",outcome="timeout"}"#;
    assert_eq!(scrape_sample(listen.parse().unwrap(), timeouts), Some(1.0));

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_console_serves_the_page_and_the_session_in_the_namespace_only() {
    let mut web = match Web::start(Some("10.20.2.1/24")).await {
        Ok(w) => w,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    assert!(
        vmd_tests::console_assets()
            .join("node_modules/@xterm/xterm/lib/xterm.js")
            .exists(),
        "xterm.js is not installed: npm ci --prefix console/web (tests/scripts/test.sh does)"
    );
    let info = web.env.stub.run(&web.vm("12-3-a", 5)).await.unwrap();
    assert_eq!(info.console_url, "10.20.2.1:20005");
    let inspect = web.env.stub.inspect("12-3-a").await.unwrap();
    assert_eq!(inspect.console_url.as_deref(), Some("10.20.2.1:20005"));
    assert_eq!(inspect.console_error, None);

    // The page and xterm.js as npm pinned them, built into vmd-console
    // (vmd was given no --console-assets): a node needs only the binaries.
    let web_dir = vmd_tests::console_assets();
    for (path, file) in [
        ("/", "index.html"),
        ("/xterm.js", "node_modules/@xterm/xterm/lib/xterm.js"),
        ("/xterm.css", "node_modules/@xterm/xterm/css/xterm.css"),
    ] {
        let (status, body) = web.get(20005, path);
        assert_eq!(status, 200, "{path}");
        assert!(
            body == std::fs::read(web_dir.join(file)).unwrap(),
            "{path} is not the repository's {file}"
        );
    }
    assert_eq!(web.get(20005, "/nothing").0, 404);

    // Nothing listens in the host's namespace.
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap();
    assert!(
        !tcp.lines()
            .any(|l| l.contains(&format!(":{:04X} ", 20005)) && l.contains(" 0A ")),
        "something listens on port 20005 in the host namespace"
    );

    // The server runs as nobody, with nothing.
    let server = console_server("12-3-a").expect("a vmd-console for the VM");
    let status = |f: &str| vmd_tests::vm::proc_status(server, f).unwrap_or_default();
    assert!(status("Uid").starts_with("65534"), "Uid {}", status("Uid"));
    assert_eq!(status("CapEff"), "0000000000000000");
    assert_eq!(status("CapBnd"), "0000000000000000");
    assert_eq!(status("NoNewPrivs"), "1");

    // The session: the history first, typing, a second client sharing it.
    let mut a = web.ws(20005).await;
    assert!(a.wait_for("GUEST-HELLO", 1, SHORT).await);
    a.wait_shell_of_boot(1).await;
    let w = format!("web{}", std::process::id());
    a.type_line(&format!("echo {w}")).await;
    assert!(a.wait_for(&w, 2, boot_timeout()).await);
    let mut b = web.ws(20005).await;
    assert!(b.wait_for(&w, 2, SHORT).await);

    // A VMM killed: both stay and see the new boot.
    let run = vmd_runtime::RunDir::new(web.env.run_dir("12-3-a"));
    let vmm = vmd_runtime::state::ShimState::load(&run.state())
        .unwrap()
        .unwrap_or_default()
        .vmm
        .unwrap()
        .pid;
    unsafe {
        libc::kill(vmm, libc::SIGKILL);
    }
    assert!(a.wait_for("GUEST-HELLO", 2, boot_timeout() + SHORT).await);
    assert!(b.wait_for("GUEST-HELLO", 2, SHORT).await);

    // The shim killed: the clients are cut, a new one (the page reconnects)
    // gets the history and the new boot, and types into it.
    let shim = vmd_runtime::state::ShimState::load(&run.state())
        .unwrap()
        .unwrap_or_default()
        .shim_pid as i32;
    let old_server = console_server("12-3-a").expect("the console server");
    unsafe {
        libc::kill(shim, libc::SIGKILL);
    }
    assert!(
        !a.wait_for("never printed", 1, SHORT).await,
        "still open after the shim died"
    );
    // The server does not outlive its shim (it closes its clients a moment
    // before its death signal ends it: until then it still accepts, and
    // would reset a client that came in between).
    vmd_tests::until(SHORT, "the old console server gone", || async {
        !vmd_tests::vm::alive(old_server)
    })
    .await;
    let t0 = Instant::now();
    let mut c = loop {
        if let Ok(s) = web
            .ns
            .connect(SocketAddr::from((Ipv4Addr::new(10, 20, 2, 1), 20005)))
        {
            drop(s);
            break web.ws(20005).await;
        }
        assert!(t0.elapsed() < SHORT, "the console did not come back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(c.wait_for("GUEST-HELLO", 3, boot_timeout() + SHORT).await);
    let w2 = format!("again{}", std::process::id());
    c.wait_shell_of_boot(3).await;
    c.type_line(&format!("echo {w2}")).await;
    assert!(c.wait_for(&w2, 2, boot_timeout()).await);

    // vmd's own crash and restart do not touch the console.
    web.env.vmd.crash_and_restart();
    web.env.vmd.wait_ready().await;
    let w3 = format!("vmdgone{}", std::process::id());
    c.type_line(&format!("echo {w3}")).await;
    assert!(c.wait_for(&w3, 2, boot_timeout()).await);

    // Delete takes the console with the VM: the session ends, the server
    // is gone, nothing listens on the address any more.
    web.env.stub.delete("12-3-a").await.unwrap();
    assert!(
        !c.wait_for("never printed", 1, SHORT).await,
        "still open after Delete"
    );
    vmd_tests::until(SHORT, "vmd-console gone after Delete", || async {
        console_server("12-3-a").is_none()
    })
    .await;
    assert!(web
        .ns
        .connect(SocketAddr::from((Ipv4Addr::new(10, 20, 2, 1), 20005)))
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_page_replaces_the_built_in_one() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("index.html"), "<p>the operator's page</p>").unwrap();
    let assets = dir.path().to_str().unwrap();
    let web = match Web::start_with(Some("10.20.2.1/24"), &["--console-assets", assets]).await {
        Ok(w) => w,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    web.env.stub.run(&web.vm("12-4-a", 7)).await.unwrap();
    let (status, page) = web.get(20007, "/");
    assert_eq!(
        (status, page.as_slice()),
        (200, &b"<p>the operator's page</p>"[..])
    );
    // What the directory lacks is missing, not taken from the binary: one
    // page, never a mix of two versions.
    let (status, body) = web.get(20007, "/xterm.js");
    assert_eq!(
        (status, String::from_utf8_lossy(&body).as_ref()),
        (500, "the console page is not installed\n")
    );
    web.env.stub.delete("12-4-a").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_that_cannot_listen_does_not_fail_the_run() {
    // The namespace exists but lacks the subnet's address.
    let web = match Web::start(None).await {
        Ok(w) => w,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let info = web.env.stub.run(&web.vm("12-4-a", 9)).await.unwrap();
    assert_eq!(info.console_url, "");
    let inspect = web.env.stub.inspect("12-4-a").await.unwrap();
    assert_eq!(inspect.console_url, None);
    let e = inspect.console_error.unwrap();
    assert!(
        e.starts_with(&format!(
            "cannot listen on 10.20.2.1:20009 in {}",
            web.ns.name
        )),
        "{e}"
    );
}

/// What the page's terminal shows, scrollback included.
const SCREEN: &str = "(() => { if (typeof term === 'undefined') return ''; \
    const b = term.buffer.active; const out = []; \
    for (let i = 0; i < b.length; i++) out.push(b.getLine(i).translateToString(true)); \
    return out.join('\\n'); })()";

async fn screen_shows(
    b: &mut Browser,
    page: &Page,
    text: &str,
    times: usize,
    limit: Duration,
) -> String {
    let t0 = Instant::now();
    loop {
        let screen = b
            .eval(page, SCREEN)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if screen.matches(text).count() >= times {
            return screen;
        }
        assert!(
            t0.elapsed() < limit,
            "{text:?} x{times} not on the page within {limit:?}; it shows:\n{screen}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Types `line` and Enter into the page, a key at a time, each after the
/// guest echoed it.
async fn type_in(b: &mut Browser, page: &Page, line: &str) {
    for (i, c) in line.char_indices() {
        let typed = &line[..i + c.len_utf8()];
        let before = b
            .eval(page, SCREEN)
            .await
            .as_str()
            .unwrap_or_default()
            .matches(typed)
            .count();
        b.key(page, c).await;
        screen_shows(b, page, typed, before + 1, boot_timeout()).await;
    }
    b.key(page, '\r').await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_real_browsers_share_the_console_across_kills_of_the_vmm_and_the_shim() {
    let web = match Web::start(Some("10.20.2.1/24")).await {
        Ok(w) => w,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let info = web.env.stub.run(&web.vm("12-5-a", 7)).await.unwrap();
    assert_eq!(info.console_url, "10.20.2.1:20007");
    let url = format!("http://{}/", info.console_url);
    let mut one = Browser::launch(&web.ns);
    let p1 = one.open(&url).await;
    // The boot from the history, then the shell.
    screen_shows(&mut one, &p1, "GUEST-HELLO", 1, boot_timeout()).await;
    screen_shows(&mut one, &p1, "/ # ", 1, boot_timeout()).await;
    let w1 = format!("first{}", std::process::id());
    type_in(&mut one, &p1, &format!("echo {w1}")).await;
    screen_shows(&mut one, &p1, &w1, 2, boot_timeout()).await;

    // A second browser sees the same session, and types into it.
    let mut two = Browser::launch(&web.ns);
    let p2 = two.open(&url).await;
    screen_shows(&mut two, &p2, &w1, 2, SHORT).await;
    let w2 = format!("second{}", std::process::id());
    type_in(&mut two, &p2, &format!("echo {w2}")).await;
    screen_shows(&mut one, &p1, &w2, 2, boot_timeout()).await;

    // kill -9 of the VMM: both pages show the new boot and keep working.
    let run = vmd_runtime::RunDir::new(web.env.run_dir("12-5-a"));
    let vmm = vmd_runtime::state::ShimState::load(&run.state())
        .unwrap()
        .unwrap_or_default()
        .vmm
        .unwrap()
        .pid;
    unsafe {
        libc::kill(vmm, libc::SIGKILL);
    }
    screen_shows(&mut one, &p1, "GUEST-HELLO", 2, boot_timeout() + SHORT).await;
    screen_shows(&mut two, &p2, "GUEST-HELLO", 2, boot_timeout() + SHORT).await;
    let t0 = Instant::now();
    loop {
        let s = one
            .eval(&p1, SCREEN)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if shell_prompted(&s, 2) {
            break;
        }
        assert!(
            t0.elapsed() < boot_timeout(),
            "no shell after the VMM restart:\n{s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let w3 = format!("third{}", std::process::id());
    type_in(&mut one, &p1, &format!("echo {w3}")).await;
    screen_shows(&mut two, &p2, &w3, 2, boot_timeout()).await;

    // kill -9 of the shim: the pages reconnect by themselves to the new
    // shim's console, replay the history, and keep working.
    let shim = vmd_runtime::state::ShimState::load(&run.state())
        .unwrap()
        .unwrap_or_default()
        .shim_pid as i32;
    unsafe {
        libc::kill(shim, libc::SIGKILL);
    }
    // The new boot (the history replayed on reconnect holds all of them).
    let t0 = Instant::now();
    let limit = boot_timeout() + Duration::from_secs(30);
    for (b, p) in [(&mut one, &p1), (&mut two, &p2)] {
        loop {
            let s = b
                .eval(p, SCREEN)
                .await
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if shell_prompted(&s, 3) {
                break;
            }
            assert!(
                t0.elapsed() < limit,
                "no new boot after the shim's kill:\n{s}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let w4 = format!("fourth{}", std::process::id());
    type_in(&mut two, &p2, &format!("echo {w4}")).await;
    screen_shows(&mut one, &p1, &w4, 2, boot_timeout()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_and_slow_clients_are_bounded_and_harm_no_one() {
    if vmd_tests::vm::real_ch() {
        eprintln!(
            "skipped: needs the double's console flood (double.flood_bps), a real guest has none"
        );
        return;
    }
    let web = match Web::start(Some("10.20.2.1/24")).await {
        Ok(w) => w,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let mut vm = web.vm("12-6-a", 6);
    // 16 MiB of console output at 1 MB/s, starting 3 s after boot.
    for (k, v) in [
        ("gaction", "wait"),
        ("double.boot_ms", "3000"),
        ("double.flood_bps", "1000000"),
        ("double.flood_bytes", "16777216"),
    ] {
        vm.kernel_args.insert(k.into(), v.into());
    }
    let info = web.env.stub.run(&vm).await.unwrap();
    assert_eq!(info.console_url, "10.20.2.1:20006");
    let server = console_server("12-6-a").expect("a vmd-console for the VM");

    // 64 web clients at once; the 65th is refused with 503.
    let mut many = Vec::new();
    for _ in 0..64 {
        many.push(web.ws(20006).await);
    }
    let s = web
        .ns
        .connect(SocketAddr::from((Ipv4Addr::new(10, 20, 2, 1), 20006)))
        .unwrap();
    s.set_nonblocking(true).unwrap();
    let s = tokio::net::TcpStream::from_std(s).unwrap();
    match tokio_tungstenite::client_async("ws://10.20.2.1:20006/ws", s).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 503),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a 65th client was let in"),
    }
    drop(many);

    // Garbage instead of HTTP, a frame over the bound, a client gone in
    // the middle of a frame: each costs only its own connection.
    {
        use std::io::{Read, Write};
        let addr = SocketAddr::from((Ipv4Addr::new(10, 20, 2, 1), 20006));
        let mut g = web.ns.connect(addr).unwrap();
        g.write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n")
            .unwrap();
        g.set_read_timeout(Some(SHORT)).unwrap();
        let mut sink = Vec::new();
        let _ = g.read_to_end(&mut sink);
        // A WebSocket, then half a frame announcing 1000 bytes, then gone.
        let mut h = web.ns.connect(addr).unwrap();
        write!(
            h,
            "GET /ws HTTP/1.1\r\nHost: 10.20.2.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .unwrap();
        let mut head = [0u8; 12];
        h.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 101");
        h.write_all(&[0x82, 0xfe, 0x03, 0xe8, 1, 2, 3, 4, b'x', b'y'])
            .unwrap();
        drop(h);
    }
    let mut big = web.ws(20006).await;
    {
        use futures_util::SinkExt;
        let frame = vec![b'x'; 1 << 20];
        let _ = big
            .ws
            .send(tokio_tungstenite::tungstenite::Message::Binary(
                frame.into(),
            ))
            .await;
    }
    assert!(
        !big.wait_for("never printed", 1, SHORT).await,
        "a 1 MiB frame was taken"
    );
    assert_eq!(web.get(20006, "/").0, 200, "the server is still up");

    // A client that never reads and one that does, through the flood.
    let stuck = web.ws(20006).await;
    let mut reader = web.ws(20006).await;
    let rss0 = vmd_tests::vm::rss_kib(server);
    // It reads frames and counts bytes, nothing more (a reader slower
    // than the console would rightly be cut).
    let t0 = Instant::now();
    let mut received = 0usize;
    while received < 8 << 20 {
        use futures_util::StreamExt;
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the reader got {received} bytes"
        );
        match tokio::time::timeout(SHORT, reader.ws.next()).await {
            Ok(Some(Ok(m))) => received += m.len(),
            other => panic!("the reader was cut after {received} bytes: {other:?}"),
        }
    }
    let rss1 = vmd_tests::vm::rss_kib(server);
    assert!(
        rss1 < rss0 + 8 * 1024,
        "vmd-console rss {rss0} KiB -> {rss1} KiB"
    );
    // The stuck one was let go: its stream ends well before 16 MiB.
    let mut stuck = stuck;
    let mut got = 0usize;
    loop {
        use futures_util::StreamExt;
        match tokio::time::timeout(SHORT, stuck.ws.next()).await {
            Ok(Some(Ok(m))) => got += m.len(),
            Ok(Some(Err(_))) | Ok(None) => break,
            Err(_) => panic!("the stuck client is still served after {got} bytes"),
        }
    }
    assert!(got < 8 << 20, "the stuck client got {got} bytes");
}

/// A raw HTTP request for the WebSocket, with `origin` if any: the status
/// line's code.
fn upgrade_status(web: &Web, addr: SocketAddr, origin: Option<&str>) -> String {
    use std::io::{Read, Write};
    let mut s = web.ns.connect(addr).unwrap();
    s.set_read_timeout(Some(SHORT)).unwrap();
    let origin = origin
        .map(|o| format!("Origin: {o}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\n{origin}Upgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    String::from_utf8_lossy(&head[9..]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_sites_pages_and_silent_connections_get_nothing() {
    let web = match Web::start(Some("10.20.2.1/24")).await {
        Ok(w) => w,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let info = web.env.stub.run(&web.vm("12-7-a", 8)).await.unwrap();
    assert_eq!(info.console_url, "10.20.2.1:20008");
    let server = console_server("12-7-a").expect("a vmd-console for the VM");
    let addr = SocketAddr::from((Ipv4Addr::new(10, 20, 2, 1), 20008));

    // Cross-site WebSocket hijacking: a page of another site is refused,
    // the console's own page and a client that is no browser are served.
    assert_eq!(
        upgrade_status(&web, addr, Some("https://evil.example")),
        "403"
    );
    assert_eq!(upgrade_status(&web, addr, Some("null")), "403");
    assert_eq!(
        upgrade_status(&web, addr, Some("http://10.20.2.1:20008")),
        "101"
    );
    assert_eq!(upgrade_status(&web, addr, None), "101");

    // 150 connections that never send a byte (within the listening
    // socket's backlog, so that each connect completes): the server's fds
    // stay bounded (64 waiting heads, the rest in the backlog), and it closes
    // the silent ones after its header timeout (10 s).
    let fds = |pid: i32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let before = fds(server);
    let silent: Vec<std::net::TcpStream> =
        (0..150).map(|_| web.ns.connect(addr).unwrap()).collect();
    let t0 = Instant::now();
    let mut most = 0;
    let first = &silent[0];
    first
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let closed = loop {
        most = most.max(fds(server));
        let mut b = [0u8; 1];
        match std::io::Read::read(&mut &*first, &mut b) {
            Ok(0) => break t0.elapsed(),
            Ok(_) => panic!("the server sent something to a silent connection"),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            // A reset is a close too.
            Err(_) => break t0.elapsed(),
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "a silent connection is still open after 30 s"
        );
    };
    assert!(
        closed >= Duration::from_secs(5),
        "closed after {closed:?}: before its header timeout"
    );
    assert!(
        most <= before + 64 + 8,
        "vmd-console held {most} fds with 150 silent connections (from {before})"
    );
    drop(silent);
    // Served again as soon as the silent ones are gone.
    assert_eq!(web.get(20008, "/").0, 200);
    let mut ws = web.ws(20008).await;
    ws.type_line("echo hello-after-flood").await;
    assert!(ws.wait_for("hello-after-flood", 2, SHORT).await);
}
