//! vmd and provisiond: VMs whose workload provisiond deleted are deleted
//! (while vmd runs, and found at its start), `error` workloads and names
//! that are not workloads are left alone and never asked about, and a dead
//! provisiond costs the callers of vmd nothing.

use std::time::{Duration, Instant};

use vmd_tests::provision_double::{ProvisionDouble, Workloads};
use vmd_tests::scrape::{free_port, scrape_sample};
use vmd_tests::stack::Stack;
use vmd_tests::until;

const FLAGS: &[&str] = &[
    "--reap-interval-secs",
    "1",
    "--provision-timeout-secs",
    "1",
    "--grace-secs",
    "5",
];

/// An address for `--metrics-listen`.
fn metrics_listen() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// [`FLAGS`] with the OpenMetrics endpoint on `listen`.
fn with_metrics(listen: &str) -> Vec<&str> {
    let mut f = FLAGS.to_vec();
    f.extend(["--metrics-listen", listen]);
    f
}

/// Until the sample `series` of the endpoint at `addr` satisfies `ok`.
async fn until_sample(addr: std::net::SocketAddr, series: &str, ok: impl Fn(f64) -> bool) {
    until(Duration::from_secs(20), series, || async {
        scrape_sample(addr, series).is_some_and(&ok)
    })
    .await;
}

async fn exists(env: &Stack, name: &str) -> bool {
    env.caller(Duration::from_secs(5))
        .exists(name)
        .await
        .unwrap()
}

/// Until `name` is gone (a graceful Delete of a cooperating guest, plus a
/// pass of the reaper).
async fn until_gone(env: &Stack, name: &str) {
    let t0 = Instant::now();
    while exists(env, name).await {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{name} still exists after {:?}",
            t0.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_of_deleted_workloads_are_deleted_and_nothing_else() {
    let env = Stack::start(FLAGS).await;
    let mut w = Workloads::default();
    for id in ["7-100-keep", "7-101-deleted", "7-102-missing", "7-103-err"] {
        w.states.insert(id.into(), "ok".into());
    }
    w.states.insert("7-103-err".into(), "error".into());
    let prov = ProvisionDouble::start(&env.redis.broker(), "provision", w).await;
    let names = [
        "7-100-keep",
        "7-101-deleted",
        "7-102-missing",
        "7-103-err",
        "healthcheck-vm-1764800000",
        "plainvm",
    ];
    for n in names {
        env.stub.run(&env.vm(n, &[])).await.unwrap();
    }
    // Every workload VM is asked about, the others never.
    until(
        Duration::from_secs(10),
        "every workload VM asked",
        || async {
            let asked = prov.calls_of("GetWorkloadStatus");
            names[..4].iter().all(|n| asked.iter().any(|a| a[0] == *n))
        },
    )
    .await;
    prov.set("7-101-deleted", Some("deleted"));
    prov.set("7-102-missing", None);
    until_gone(&env, "7-101-deleted").await;
    until_gone(&env, "7-102-missing").await;
    // Two more passes: what is left stays.
    let n = prov.calls_of("GetWorkloadStatus").len();
    until(Duration::from_secs(10), "two more passes", || async {
        prov.calls_of("GetWorkloadStatus").len() >= n + 4
    })
    .await;
    for n in [
        "7-100-keep",
        "7-103-err",
        "healthcheck-vm-1764800000",
        "plainvm",
    ] {
        assert!(exists(&env, n).await, "{n} was deleted");
    }
    let asked = prov.calls_of("GetWorkloadStatus");
    for n in ["healthcheck-vm-1764800000", "plainvm"] {
        assert!(!asked.iter().any(|a| a[0] == n), "{n} was asked about");
    }
    // Nothing but questions: no report for VMs that run.
    assert!(prov
        .calls
        .lock()
        .unwrap()
        .iter()
        .all(|c| c.method == "GetWorkloadStatus"));
    // The deleted VMs left nothing behind (a normal Delete).
    assert!(env.stub.inspect("7-101-deleted").await.is_err());
    assert!(!env.log("7-101-deleted").exists());
    assert!(!env.run_dir("7-102-missing").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_deleted_while_vmd_was_down_is_reaped_at_start() {
    let listen = metrics_listen();
    let mut env = Stack::start(&with_metrics(&listen)).await;
    let mut w = Workloads::default();
    w.states.insert("8-1-a".into(), "ok".into());
    w.states.insert("8-2-b".into(), "ok".into());
    let prov = ProvisionDouble::start(&env.redis.broker(), "provision", w).await;
    env.stub.run(&env.vm("8-1-a", &[])).await.unwrap();
    env.stub.run(&env.vm("8-2-b", &[])).await.unwrap();
    env.vmd.crash();
    prov.set("8-1-a", Some("deleted"));
    env.vmd.restart();
    env.vmd.wait_ready().await;
    until_gone(&env, "8-1-a").await;
    assert!(exists(&env, "8-2-b").await);
    // What the restarted vmd did, as its endpoint shows it: both VMs found
    // under zinit at its start, one reaped since.
    let addr = listen.parse().unwrap();
    until_sample(
        addr,
        r#"vmd_workload_actions_total{action="reaped"}"#,
        |v| v == 1.0,
    )
    .await;
    until_sample(
        addr,
        r#"vmd_reconcile_actions_total{action="adopted"}"#,
        |v| v == 2.0,
    )
    .await;
    assert_eq!(scrape_sample(addr, "vmd_reconcile_pending_vms"), Some(0.0));
    // Asked about each (counted since this vmd started).
    let status_ok =
        r#"vmd_peer_calls_total{module="provision",method="GetWorkloadStatus",outcome="ok"}"#;
    until_sample(addr, status_ok, |v| v >= 2.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_provisiond_costs_callers_nothing_and_is_asked_again_when_back() {
    let listen = metrics_listen();
    let env = Stack::start(&with_metrics(&listen)).await;
    let mut w = Workloads::default();
    w.states.insert("9-1-a".into(), "ok".into());
    let mut prov = ProvisionDouble::start(&env.redis.broker(), "provision", w).await;
    env.stub.run(&env.vm("9-1-a", &[])).await.unwrap();
    until(Duration::from_secs(10), "asked once", || async {
        !prov.calls_of("GetWorkloadStatus").is_empty()
    })
    .await;
    prov.kill();
    prov.set("9-1-a", Some("deleted"));
    // provisiond is dead for a few passes: calls are answered as ever.
    let caller = env.caller(Duration::from_secs(2));
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(4) {
        assert!(caller.exists("9-1-a").await.unwrap());
        caller.list().await.unwrap();
    }
    // Back: what waited in its queue is answered, the VM goes.
    prov.resume(&env.redis.broker(), "provision").await;
    until_gone(&env, "9-1-a").await;
    // The endpoint tells the calls that timed out from those answered, and
    // the passes that stopped at a dead provisiond.
    let addr = listen.parse().unwrap();
    let status = |outcome: &str| {
        format!(
            r#"vmd_peer_calls_total{{module="provision",method="GetWorkloadStatus",outcome="{outcome}"}}"#
        )
    };
    until_sample(
        addr,
        r#"vmd_workload_actions_total{action="reaped"}"#,
        |v| v == 1.0,
    )
    .await;
    assert!(scrape_sample(addr, &status("timeout")) >= Some(1.0));
    assert!(scrape_sample(addr, &status("ok")) >= Some(2.0));
    assert!(
        scrape_sample(addr, r#"vmd_workload_passes_total{outcome="unreachable"}"#) >= Some(1.0)
    );
    assert!(scrape_sample(addr, r#"vmd_workload_passes_total{outcome="done"}"#) >= Some(1.0));
    // Each timed-out call waited for its whole deadline (1 s).
    let slow = r#"vmd_peer_call_duration_seconds_bucket{le="0.5",module="provision",method="GetWorkloadStatus"}"#;
    let all =
        r#"vmd_peer_call_duration_seconds_count{module="provision",method="GetWorkloadStatus"}"#;
    let (fast, total) = (
        scrape_sample(addr, slow).unwrap(),
        scrape_sample(addr, all).unwrap(),
    );
    assert!(total - fast >= scrape_sample(addr, &status("timeout")).unwrap());
}

/// [`FLAGS`] and a crash-loop policy that gives up after two exits.
fn crashing() -> Vec<&'static str> {
    let mut f = FLAGS.to_vec();
    f.extend(["--restart-max", "2", "--restart-window-secs", "120"]);
    f
}
/// Runs `name` with a guest that crashes 300 ms after each boot, until its
/// shim gives up on it.
async fn run_crash_loop(env: &Stack, name: &str) {
    env.stub
        .run(&env.vm(name, &[("double.crash_after_ms", "300")]))
        .await
        .unwrap();
    until(
        Duration::from_secs(60),
        format!("{name} failed"),
        || async {
            let info = env.stub.inspect(name).await;
            matches!(info, Ok(i) if i.state.as_deref() == Some("failed"))
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_is_decommissioned_with_the_go_reason_and_its_log_kept() {
    // provisiond of zosbase main: no SetWorkloadError.
    let env = Stack::start(&crashing()).await;
    let mut w = Workloads::default();
    w.states.insert("5-1-crashy".into(), "ok".into());
    w.states.insert("5-2-fine".into(), "ok".into());
    let prov = ProvisionDouble::start(&env.redis.broker(), "provision", w).await;
    env.stub.run(&env.vm("5-2-fine", &[])).await.unwrap();
    run_crash_loop(&env, "5-1-crashy").await;
    until(Duration::from_secs(20), "decommissioned", || async {
        !prov.calls_of("DecommissionCached").is_empty()
    })
    .await;
    assert_eq!(
        prov.calls_of("DecommissionCached"),
        vec![vec![
            "5-1-crashy".to_owned(),
            "deleting vm due to so many crashes".to_owned()
        ]]
    );
    // Asked first whether it has SetWorkloadError, once: remembered.
    assert_eq!(prov.calls_of("SetWorkloadError").len(), 1);
    // provisiond uninstalled the workload: its VM goes, its console stays.
    until_gone(&env, "5-1-crashy").await;
    let kept = env.vmd.root().join("failed").join("5-1-crashy");
    // Exists says false as soon as the Delete begins; the log moves later.
    until(Duration::from_secs(20), "the console log kept", || async {
        !env.run_dir("5-1-crashy").exists()
    })
    .await;
    let console = std::fs::read_to_string(kept.join("console.log"))
        .unwrap_or_else(|e| panic!("{}: {e}; vmd said:\n{}", kept.display(), env.vmd.stderr()));
    assert!(!console.is_empty(), "the kept console log is empty");
    assert_eq!(
        std::fs::read_to_string(kept.join("reason")).unwrap(),
        "deleting vm due to so many crashes"
    );
    // Only the failed VM was reported, once.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(prov.calls_of("DecommissionCached").len(), 1);
    assert!(exists(&env, "5-2-fine").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_is_an_error_workload_where_provisiond_has_set_workload_error() {
    // provisiond with PR #96.
    let env = Stack::start(&crashing()).await;
    let mut w = Workloads {
        pr96: true,
        ..Default::default()
    };
    w.states.insert("6-1-crashy".into(), "ok".into());
    let mut prov = ProvisionDouble::start(&env.redis.broker(), "provision", w).await;
    // provisiond is dead when the VM fails: the report waits for it.
    prov.kill();
    run_crash_loop(&env, "6-1-crashy").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    prov.resume(&env.redis.broker(), "provision").await;
    until(Duration::from_secs(30), "reported", || async {
        prov.state("6-1-crashy").as_deref() == Some("error")
    })
    .await;
    let reports = prov.calls_of("SetWorkloadError");
    let message = &reports.last().unwrap()[1];
    assert!(message.contains("stopped 2 times"), "{message}");
    assert!(message.contains("console: "), "{message}");
    // Kept: the VM (failed, for Inspect), its log; not decommissioned.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(exists(&env, "6-1-crashy").await);
    assert!(env.log("6-1-crashy").exists());
    assert!(prov.calls_of("DecommissionCached").is_empty());
    // Reported once for this failure (replies that waited in the dead
    // provisiond's queue aside, every later pass finds the record).
    let n = prov.calls_of("SetWorkloadError").len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(prov.calls_of("SetWorkloadError").len(), n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_os_health_check_vms_run_delete_cleanly_and_are_never_reported() {
    // Zero-OS's own check: `healthcheck-vm-<unixtime>`, no network, 1 CPU,
    // 512 MiB, deleted after 30 s. Even when it fails, provisiond never hears
    // of it (it is no workload).
    let env = Stack::start(&crashing()).await;
    let prov = ProvisionDouble::start(&env.redis.broker(), "provision", Workloads::default()).await;
    let name = format!(
        "healthcheck-vm-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    );
    let mut vm = env.vm(&name, &[]);
    vm.memory = 512 << 20;
    env.stub.run(&vm).await.unwrap();
    env.stub.delete(&name).await.unwrap();
    assert!(!exists(&env, &name).await);
    run_crash_loop(&env, &name).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        prov.calls.lock().unwrap().is_empty(),
        "{:?}",
        prov.calls.lock().unwrap()
    );
    env.stub.delete(&name).await.unwrap();
    env.assert_nothing_left().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_vm_is_tried_again_after_its_cooldown_and_reported_ok_when_it_runs() {
    // PR #96: error, a retry after the cooldown (seconds here, 6 h on a
    // node), SetWorkloadOk once it runs again.
    let mut flags = crashing();
    flags.extend(["--failed-retry-secs", "2"]);
    let env = Stack::start(&flags).await;
    let mut w = Workloads {
        pr96: true,
        ..Default::default()
    };
    w.states.insert("6-2-flaky".into(), "ok".into());
    let prov = ProvisionDouble::start(&env.redis.broker(), "provision", w).await;
    // It crashes while its initrd reads `broken`: a cause outside the
    // guest (and a file the jailed VMM sees).
    let cause = env.sys.path().join("flaky-initrd");
    std::fs::write(&cause, "broken").unwrap();
    let cause_s = cause.to_string_lossy().into_owned();
    let mut vm = env.vm(
        "6-2-flaky",
        &[
            ("double.crash_after_ms", "300"),
            ("double.crash_while", &cause_s),
        ],
    );
    vm.initrd_image = cause_s.clone();
    env.stub.run(&vm).await.unwrap();
    until(Duration::from_secs(60), "reported as error", || async {
        prov.state("6-2-flaky").as_deref() == Some("error")
    })
    .await;
    // Still broken: the retry fails again, and is reported again.
    until(
        Duration::from_secs(60),
        "reported again after a retry",
        || async { prov.calls_of("SetWorkloadError").len() >= 2 },
    )
    .await;
    assert!(prov.calls_of("SetWorkloadOk").is_empty());
    // Fixed: the next retry runs, and provisiond hears it.
    std::fs::write(&cause, "fixed").unwrap();
    until(Duration::from_secs(60), "reported ok", || async {
        prov.state("6-2-flaky").as_deref() == Some("ok")
    })
    .await;
    assert_eq!(
        prov.calls_of("SetWorkloadOk"),
        vec![vec!["6-2-flaky".to_owned()]]
    );
    let info = env.stub.inspect("6-2-flaky").await.unwrap();
    assert_eq!(info.state.as_deref(), Some("running"), "{info:?}");
    assert!(prov.calls_of("DecommissionCached").is_empty());
    // Each retry was answered before its shim went (the shim exits after one).
    let said = env.vmd.stderr();
    assert!(said.contains("starting the failed VM again"), "{said}");
    assert!(!said.contains("cannot start the failed VM again"), "{said}");
}
