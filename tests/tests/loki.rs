//! Log streams to Grafana Loki (`http://`, `https://`): a VM's console,
//! one entry per line, to a receiver faithful to Loki's push API
//! (`vmd_tests::loki`), through vmd, zinit and a real Redis.

use std::time::Duration;

use vmd::api::{Stream, StreamStatus};
use vmd_tests::flood::{self, seq, LINE};
use vmd_tests::loki::{LokiConfig, LokiReceiver};
use vmd_tests::stack::Stack;
use vmd_tests::until;
use vmd_tests::vm::real_ch;

fn skip() -> bool {
    if real_ch() {
        eprintln!("skipped: needs the double's flood knob");
    }
    real_ch()
}

/// Console logs big enough that nothing rotates away during a test.
async fn stack() -> Stack {
    Stack::start(&[
        "--log-rotate-bytes",
        "67108864",
        "--log-keep-bytes",
        "33554432",
    ])
    .await
}

async fn create(stack: &Stack, vm: &str, id: &str, output: String) {
    stack
        .stub
        .stream_create(
            vm,
            &Stream {
                id: id.into(),
                namespace: String::new(),
                output,
            },
        )
        .await
        .unwrap();
}

/// The flood's sequence numbers as Loki keeps them, in timestamp order.
fn kept_seqs(r: &LokiReceiver) -> Vec<u64> {
    r.entries().iter().filter_map(|e| seq(&e.line)).collect()
}

/// Every line from 1 to `last` once, in order; else where it went wrong.
fn assert_each_once(got: &[u64], last: u64) {
    let want: Vec<u64> = (1..=last).collect();
    if got != want.as_slice() {
        let at = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
        let around = &got[at.saturating_sub(3)..(at + 5).min(got.len())];
        panic!(
            "{} lines for {last}: lost or repeated from index {at} ({around:?})",
            got.len()
        );
    }
}

/// Waits until Loki holds the flood's last line.
async fn wait_last(r: &LokiReceiver, last: u64) {
    until(
        Duration::from_secs(60),
        "the flood's last line in Loki",
        || std::future::ready(kept_seqs(r).last() == Some(&last)),
    )
    .await;
}

async fn stream_status(stack: &Stack, vm: &str) -> StreamStatus {
    stack.stub.inspect(vm).await.unwrap().streams.unwrap()[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_lines_reach_loki_with_basic_auth_and_a_tenant() {
    if skip() {
        return;
    }
    const BYTES: u64 = 2_000_000;
    let env = stack().await;
    let loki = LokiReceiver::start(LokiConfig {
        basic_auth: Some(("grid".into(), "s3cr:t@".into())),
        multi_tenant: true,
        path: Some("/proxy/loki/api/v1/push".into()),
        tls: None,
    })
    .await;
    flood::run_flooding(&env, "lvm", 1500, 4_000_000, BYTES).await;
    create(
        &env,
        "lvm",
        "lk",
        format!(
            "http://grid:s3cr%3At%40@127.0.0.1:{}/proxy?tenant_id=twin-42",
            loki.port
        ),
    )
    .await;
    let printed = flood::wait_done(&env, "lvm", BYTES).await;
    let last = BYTES.div_ceil(LINE);
    wait_last(&loki, last).await;
    // Every line once, in order, as the console printed it.
    let printed: Vec<String> = String::from_utf8_lossy(&printed)
        .lines()
        .filter(|l| seq(l).is_some())
        .map(str::to_owned)
        .collect();
    let kept: Vec<String> = loki
        .entries()
        .into_iter()
        .filter(|e| seq(&e.line).is_some())
        .map(|e| e.line)
        .collect();
    assert_eq!(kept.len(), printed.len());
    assert!(kept == printed, "Loki's lines differ from the console's");
    let entries = loki.entries();
    assert!(entries
        .iter()
        .all(|e| e.tenant == "twin-42" && e.labels == "job=tailstream"));
    let pushes = loki.pushes();
    // Loki's own format, as Promtail and Alloy send it.
    assert!(pushes
        .iter()
        .all(|p| p.content_type == "application/x-protobuf" && p.content_encoding.is_none()));
    assert!(pushes
        .iter()
        .all(|p| p.authorization.as_deref() == Some("Basic Z3JpZDpzM2NyOnRA")));
    assert!(
        pushes.len() < last as usize / 10,
        "{} pushes for {last} lines: entries are not batched",
        pushes.len()
    );
    let s = stream_status(&env, "lvm").await;
    assert!(s.connected);
    assert_eq!(s.rejected_bytes, 0);
    // The credentials are nowhere but in the record.
    assert!(!s.output.contains("s3cr"), "{}", s.output);
    assert!(!s.output.contains("twin-42"), "{}", s.output);
    // Deleted: the worker and all its files go.
    env.stub.stream_delete("lk").await.unwrap();
    let progress = env.vmd.runtime().join("streams/progress");
    let left: Vec<_> = std::fs::read_dir(&progress)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left in {}: {left:?}", progress.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_private_ca() {
    if skip() {
        return;
    }
    const BYTES: u64 = 500_000;
    let dir = tempfile::tempdir().unwrap();
    let (ca_file, acceptor) = vmd_tests::tls::private_ca(dir.path());
    let env = Stack::start(&["--stream-ca-file", ca_file.to_str().unwrap()]).await;
    let loki = LokiReceiver::start(LokiConfig {
        tls: Some(acceptor),
        ..Default::default()
    })
    .await;
    flood::run_flooding(&env, "tvm", 500, 2_000_000, BYTES).await;
    create(
        &env,
        "tvm",
        "lt",
        format!("https://127.0.0.1:{}", loki.port),
    )
    .await;
    flood::wait_done(&env, "tvm", BYTES).await;
    let last = BYTES.div_ceil(LINE);
    wait_last(&loki, last).await;
    assert_each_once(&kept_seqs(&loki), last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_are_retried_and_nothing_is_lost() {
    if skip() {
        return;
    }
    const BYTES: u64 = 200_000;
    let env = stack().await;
    let loki = LokiReceiver::start(LokiConfig {
        basic_auth: Some(("grid".into(), "new".into())),
        ..Default::default()
    })
    .await;
    flood::run_flooding(&env, "avm", 500, 2_000_000, BYTES).await;
    create(
        &env,
        "avm",
        "la",
        format!("http://grid:old@127.0.0.1:{}", loki.port),
    )
    .await;
    flood::wait_done(&env, "avm", BYTES).await;
    until(Duration::from_secs(30), "the worker trying again", || {
        std::future::ready(loki.unauthorized() >= 3)
    })
    .await;
    let svc: zinit::ServiceName = "stream:la".parse().unwrap();
    let log = env.zinit.client().service_log(&svc).await.unwrap();
    assert!(log.iter().any(|l| l.contains("401")), "{log:#?}");
    let s = stream_status(&env, "avm").await;
    assert!(!s.connected);
    assert_eq!(s.sent_bytes, 0);
    assert!(loki.entries().is_empty());
    // The proxy's owner goes back to the password the deployment has.
    loki.set_basic_auth("grid", "old");
    let last = BYTES.div_ceil(LINE);
    wait_last(&loki, last).await;
    assert_each_once(&kept_seqs(&loki), last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_fails_then_recovers_loses_and_repeats_nothing() {
    if skip() {
        return;
    }
    const BYTES: u64 = 1_000_000;
    let env = stack().await;
    let loki = LokiReceiver::start(LokiConfig::default()).await;
    // Down, overloaded, down again: 5xx and 429, then fine.
    loki.fail_next(&[500, 502, 429, 503, 429, 500]);
    flood::run_flooding(&env, "fvm", 500, 2_000_000, BYTES).await;
    create(
        &env,
        "fvm",
        "lf",
        format!("http://127.0.0.1:{}/", loki.port),
    )
    .await;
    flood::wait_done(&env, "fvm", BYTES).await;
    let last = BYTES.div_ceil(LINE);
    wait_last(&loki, last).await;
    assert_each_once(&kept_seqs(&loki), last);
    assert!(loki.pushes().len() >= 7);
    let s = stream_status(&env, "fvm").await;
    assert_eq!((s.dropped_bytes, s.rejected_bytes), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_with_a_push_unanswered_resumes_without_repeats() {
    if skip() {
        return;
    }
    const BYTES: u64 = 3_000_000;
    let env = stack().await;
    let loki = LokiReceiver::start(LokiConfig::default()).await;
    flood::run_flooding(&env, "kvm", 1500, 400_000, BYTES).await;
    create(&env, "kvm", "lk", format!("http://127.0.0.1:{}", loki.port)).await;
    let svc: zinit::ServiceName = "stream:lk".parse().unwrap();
    let last = BYTES.div_ceil(LINE);
    let mut killed = 0;
    for round in 0..3 {
        // Loki keeps a push and the worker dies before hearing so: the
        // one window in which a resumed worker sends again what Loki has.
        loki.hold_after(3);
        until(Duration::from_secs(30), "a push held", || {
            std::future::ready(loki.held() > round)
        })
        .await;
        let pid = env.zinit.client().status(&svc).await.unwrap().pid;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::SIGKILL,
        )
        .unwrap();
        killed += 1;
        loki.release();
        until(Duration::from_secs(30), "the worker restarted", || async {
            env.zinit
                .client()
                .status(&svc)
                .await
                .is_ok_and(|s| s.pid != pid && s.pid != 0)
        })
        .await;
    }
    flood::wait_done(&env, "kvm", BYTES).await;
    wait_last(&loki, last).await;
    // Each line kept once: what the restarted worker sent again carried
    // the same timestamps, which Loki keeps once.
    assert_each_once(&kept_seqs(&loki), last);
    let repeated = loki.received() - loki.entries().len();
    assert!(
        repeated > 0,
        "no push was repeated: the test missed its window"
    );
    eprintln!("{killed} kills: {repeated} entries sent again, each kept once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_loki_rejects_are_dropped_and_counted() {
    if skip() {
        return;
    }
    const BYTES: u64 = 640_000;
    let env = stack().await;
    let loki = LokiReceiver::start(LokiConfig::default()).await;
    loki.reject_lines_with("FLOOD 000000005000 ");
    flood::run_flooding(&env, "rvm", 500, 2_000_000, BYTES).await;
    create(&env, "rvm", "lr", format!("http://127.0.0.1:{}", loki.port)).await;
    flood::wait_done(&env, "rvm", BYTES).await;
    let last = BYTES.div_ceil(LINE);
    wait_last(&loki, last).await;
    let got = kept_seqs(&loki);
    let missing: Vec<u64> = (1..=last).filter(|n| !got.contains(n)).collect();
    // One push's lines are gone, around the one Loki refuses; no other.
    assert!(missing.contains(&5000), "{missing:?}");
    assert_eq!(
        missing.last().unwrap() - missing[0] + 1,
        missing.len() as u64,
        "not one run of lines: {missing:?}"
    );
    let s = until_rejected(&env).await;
    assert_eq!(s.rejected_bytes, missing.len() as u64 * LINE);
}

async fn until_rejected(env: &Stack) -> StreamStatus {
    vmd_tests::until_some(
        Duration::from_secs(10),
        "rejected bytes in Inspect",
        || async {
            let s = stream_status(env, "rvm").await;
            (s.rejected_bytes > 0).then_some(s)
        },
    )
    .await
}
