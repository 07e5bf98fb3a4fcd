//! Lifecycle events: what the shims push, vmd publishes on the broker as a
//! zbus stream (`vmd.manager@0.0.1.Events`), in order, without a gap — also
//! across a kill -9 of vmd, whose replacement publishes what happened
//! meanwhile — and `vmd ctl events` replays and follows.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use vmd::api::{events_channel, VmEvent};
use vmd::events::subscribe::{Filter, Subscription};
use vmd_runtime::state::ShimState;
use vmd_tests::stack::Stack;
use vmd_tests::vm::{alive, boot_timeout};

/// A subscriber that keeps every event it got, per VM.
struct Heard {
    sub: Subscription,
    by_vm: BTreeMap<String, Vec<VmEvent>>,
}

impl Heard {
    async fn start(env: &Stack) -> Heard {
        let sub = Subscription::start(&env.redis.broker(), Filter::default(), true)
            .await
            .expect("subscribe");
        Heard {
            sub,
            by_vm: BTreeMap::new(),
        }
    }

    fn kinds(&self, vm: &str) -> Vec<String> {
        self.by_vm
            .get(vm)
            .map(|v| v.iter().map(|e| e.event.clone()).collect())
            .unwrap_or_default()
    }

    /// Waits until `vm` has had `event` `times` times in all.
    async fn until(&mut self, vm: &str, event: &str, times: usize) {
        // A real guest boots in minutes on an emulated KVM.
        let limit = Duration::from_secs(30).max(boot_timeout());
        let t0 = Instant::now();
        while self.kinds(vm).iter().filter(|k| *k == event).count() < times {
            let left = limit.saturating_sub(t0.elapsed());
            match tokio::time::timeout(left, self.sub.next()).await {
                Ok(Some(e)) => self.by_vm.entry(e.name.clone()).or_default().push(e),
                Ok(None) => panic!("the subscription ended"),
                Err(_) => panic!(
                    "{vm}: no {event} #{times} within {limit:?}; heard {:?}",
                    self.kinds(vm)
                ),
            }
        }
    }
}

fn vmm_of(env: &Stack, vm: &str) -> Option<i32> {
    let st = ShimState::load(&env.run_dir(vm).join("state.json")).ok()??;
    st.vmm.filter(|v| v.alive()).map(|v| v.pid)
}

async fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn kill(pid: i32) {
    // SAFETY: kill has no memory effects.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

/// Every event of `vm`, numbered 1, 2, 3… without a gap or a repeat.
fn assert_numbered(vm: &str, evs: &[VmEvent]) {
    let seqs: Vec<u64> = evs.iter().map(|e| e.seq).collect();
    let want: Vec<u64> = (1..=evs.len() as u64).collect();
    assert_eq!(seqs, want, "{vm}: sequence numbers");
    for e in evs {
        assert!(e.at > 1_700_000_000, "{vm}: time of {e:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_sees_every_transition_in_order_across_a_vmd_kill() {
    let mut env = Stack::start(&["--restart-max", "3", "--restart-window-secs", "120"]).await;
    let mut heard = Heard::start(&env).await;
    let s = env.caller(Duration::from_secs(90));

    // Run answers only once the guest booted: `booted` is out by then.
    s.run(&env.vm("ev1", &[("gaction", "wait")])).await.unwrap();
    heard.until("ev1", "booted", 1).await;

    s.lock("ev1", true).await.unwrap();
    heard.until("ev1", "paused", 1).await;
    s.lock("ev1", false).await.unwrap();
    heard.until("ev1", "resumed", 1).await;

    let vmm = vmm_of(&env, "ev1").expect("a VMM");
    kill(vmm);
    heard.until("ev1", "booted", 2).await;

    let shim = env
        .zinit
        .client()
        .status(&"vm:ev1".parse().unwrap())
        .await
        .unwrap()
        .pid;
    kill(shim as i32);
    heard.until("ev1", "booted", 3).await;

    // vmd dies; the VM crashes and comes back while nobody publishes.
    env.vmd.crash();
    let vmm = wait_for("the third VMM", || vmm_of(&env, "ev1")).await;
    kill(vmm);
    wait_for("the fourth boot", || {
        let st = ShimState::load(&env.run_dir("ev1").join("state.json")).ok()??;
        let boots = st
            .events
            .recent
            .iter()
            .filter(|e| e.kind == vmd_runtime::events::EventKind::Booted)
            .count();
        (boots == 4 && st.vmm.is_some_and(|v| v.alive() && v.pid != vmm)).then_some(())
    })
    .await;
    assert!(!alive(vmm));
    env.vmd.restart();
    env.vmd.wait_ready().await;
    // What happened while vmd was down is published by the next one.
    heard.until("ev1", "booted", 4).await;

    s.delete("ev1").await.unwrap();
    heard.until("ev1", "deleted", 1).await;

    let want = [
        "created",
        "starting",
        "booted",
        "paused",
        "resumed",
        "crashed",
        "restarting",
        "booted",
        "crashed",
        "restarting",
        "booted",
        "crashed",
        "restarting",
        "booted",
        "stopping",
        "stopped",
        "deleted",
    ];
    assert_eq!(heard.kinds("ev1"), want);
    let evs = &heard.by_vm["ev1"];
    assert_numbered("ev1", evs);
    assert!(evs[5].reason.starts_with("signal 9"), "{:?}", evs[5]);
    assert!(evs[8].reason.contains("shim exited"), "{:?}", evs[8]);
    assert_eq!(evs[6].reason, "restart 1");

    // The history replays the same, and `--since` what followed.
    let (code, out, err) = env.vmd.ctl(&["events", "--no-follow", "--json", "ev1"]);
    assert_eq!(code, 0, "{err}");
    let replayed: Vec<String> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["event"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(replayed, want);
    let (code, out, err) = env
        .vmd
        .ctl(&["events", "--no-follow", "ev1", "--since", "14"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[0].contains("#15") && lines[0].contains("stopping"),
        "{out}"
    );
    assert!(
        lines[2].contains("#17") && lines[2].contains("deleted"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_ends_in_failed_with_its_reason_and_streams_are_events_too() {
    let env = Stack::start(&["--restart-max", "3", "--restart-window-secs", "120"]).await;
    let mut heard = Heard::start(&env).await;
    let s = env.caller(Duration::from_secs(90));
    s.run(&env.vm("loop", &[("double.crash_after_ms", "400")]))
        .await
        .unwrap();
    s.stream_create(
        "loop",
        &vmd::api::Stream {
            id: "loop-s".into(),
            output: format!("redis://{}/chan", "127.0.0.1:1"),
            namespace: String::new(),
        },
    )
    .await
    .unwrap();
    heard.until("loop", "failed", 1).await;
    // Its receiver is unreachable: the worker says so, and so do the events.
    heard.until("loop", "stream-failing", 1).await;
    s.stream_delete("loop-s").await.unwrap();
    heard.until("loop", "stream-stopped", 1).await;
    let kinds = heard.kinds("loop");
    // Streams interleave with the loop wherever they happened; the VM's own
    // events are in order.
    let own: Vec<&str> = kinds
        .iter()
        .map(String::as_str)
        .filter(|k| !k.starts_with("stream-"))
        .collect();
    assert_eq!(
        own,
        [
            "created",
            "starting",
            "booted",
            "crashed",
            "restarting",
            "booted",
            "crashed",
            "restarting",
            "booted",
            "crashed",
            "failed"
        ]
    );
    assert!(kinds.contains(&"stream-started".to_owned()), "{kinds:?}");
    let evs = &heard.by_vm["loop"];
    assert_numbered("loop", evs);
    let failed = evs.iter().find(|e| e.event == "failed").unwrap();
    assert!(failed.reason.contains("3 times"), "{failed:?}");
    let started = evs.iter().find(|e| e.event == "stream-started").unwrap();
    assert_eq!(started.reason, "loop-s");
    let failing = evs.iter().find(|e| e.event == "stream-failing").unwrap();
    assert!(failing.reason.starts_with("loop-s: "), "{failing:?}");
    assert_eq!(
        evs.iter().filter(|e| e.event == "stream-failing").count(),
        1,
        "a failing stream is said once, not at every retry"
    );
    s.delete("loop").await.unwrap();
    heard.until("loop", "deleted", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_receiver_goes_away_is_failing_then_delivering_again() {
    let env = Stack::start(&[]).await;
    let mut heard = Heard::start(&env).await;
    let s = env.caller(Duration::from_secs(90));
    let mut receiver = vmd_tests::RedisServer::start_tcp();
    let port = receiver.tcp_port();
    s.run(&env.vm("talker", &[("gaction", "wait"), ("gtick", "1")]))
        .await
        .unwrap();
    s.stream_create(
        "talker",
        &vmd::api::Stream {
            id: "talk".into(),
            output: format!("redis://127.0.0.1:{port}/ch"),
            namespace: String::new(),
        },
    )
    .await
    .unwrap();
    heard.until("talker", "stream-started", 1).await;
    receiver.kill();
    heard.until("talker", "stream-failing", 1).await;
    receiver.restart();
    heard.until("talker", "stream-started", 2).await;
    let evs = &heard.by_vm["talker"];
    let again = evs.iter().rfind(|e| e.event == "stream-started").unwrap();
    assert_eq!(again.reason, "talk: delivering again");
    assert_eq!(
        evs.iter().filter(|e| e.event == "stream-failing").count(),
        1,
        "{evs:?}"
    );
    assert_numbered("talker", evs);
}

/// With the double or a real cloud-hypervisor and guest (`VMD_TEST_CH`…):
/// a boot, a VMM killed, a graceful delete, and a guest that powers itself
/// off, each as its events, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_life_boot_kill_delete_and_power_off() {
    let env = Stack::start(&["--grace-secs", "20"]).await;
    let mut heard = Heard::start(&env).await;
    let s = env.caller(Duration::from_secs(30) + boot_timeout());
    s.run(&env.vm("life", &[("gaction", "wait")]))
        .await
        .unwrap();
    heard.until("life", "booted", 1).await;
    let vmm = vmm_of(&env, "life").expect("a VMM");
    // The next VMM starts a second after the kill: its output follows this.
    let before = s.logs_full("life").await.unwrap().len();
    kill(vmm);
    heard.until("life", "booted", 2).await;
    // Only once the guest can take the power button (its acpid is armed).
    env.wait_logs_since("life", "GUEST-READY", before).await;
    s.delete("life").await.unwrap();
    heard.until("life", "deleted", 1).await;
    assert_eq!(
        heard.kinds("life"),
        [
            "created",
            "starting",
            "booted",
            "crashed",
            "restarting",
            "booted",
            "stopping",
            "stopped",
            "deleted"
        ]
    );
    assert_numbered("life", &heard.by_vm["life"]);
    let stopped = &heard.by_vm["life"][7];
    eprintln!("life: stopped: {}", stopped.reason);

    // A guest that powers itself off, not kept alive.
    let mut bye = env.vm("bye", &[("gaction", "poweroff")]);
    bye.no_keep_alive = true;
    // Run answers on the boot; the power-off follows.
    let _ = s.run(&bye).await;
    heard.until("bye", "powered-off", 1).await;
    assert_eq!(
        heard.kinds("bye"),
        ["created", "starting", "booted", "powered-off"]
    );
    s.delete("bye").await.unwrap();
    heard.until("bye", "deleted", 1).await;
}

#[test]
fn the_channel_is_where_a_go_zbus_server_publishes_the_events_stream() {
    assert_eq!(events_channel(), "vmd.manager@0.0.1.Events");
}
