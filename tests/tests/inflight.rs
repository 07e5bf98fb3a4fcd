//! No call lost: vmd killed (SIGKILL), stopped (SIGTERM) or restarted by
//! zinit while calls of every changing method of several VMs are in flight.
//! Every caller gets exactly one reply, the right one, within its deadline,
//! and every change happens once.

use std::time::{Duration, Instant};

use vmd::api::{Stream, Vm};
use vmd::zbus::client::ClientError;
use vmd_tests::redis_server::requests_in_flight;
use vmd_tests::stack::Stack;
use vmd_tests::supervisor::processes_with;
use vmd_tests::until;
use vmd_tests::vm::{ch_program_name, real_ch};

/// A graceful Delete of a guest that ignores its power button lasts this.
const GRACE_SECS: u64 = 1;
/// Each caller's deadline, as a Go caller's: past it, the call failed.
const DEADLINE: Duration = Duration::from_secs(60);

/// How a round interrupts vmd.
#[derive(Debug, Clone, Copy)]
enum Interrupt {
    /// SIGKILL and an immediate restart by the test.
    Kill,
    /// SIGTERM (vmd drains, then exits) and a restart once it exited.
    Term,
    /// `zinit restart` of vmd's service.
    ZinitRestart,
}

/// The calls of one round, each changing another VM.
struct Round {
    run: Vm,
    del: String,
    lock: String,
    create: (String, Stream),
    remove: (String, String),
}

fn stream(id: &str) -> Stream {
    Stream {
        id: id.into(),
        namespace: String::new(),
        // Nobody listens: the worker retries, which is all this needs.
        output: "redis://127.0.0.1:9/inflight".into(),
    }
}

async fn prepare(env: &Stack, r: usize) -> Round {
    let s = &env.stub;
    let del = format!("del-{r}");
    s.run(&env.vm(&del, &[("double.ignore_power_button", "1")]))
        .await
        .unwrap();
    let lock = format!("lock-{r}");
    s.run(&env.vm(&lock, &[])).await.unwrap();
    let create = format!("sc-{r}");
    s.run(&env.vm(&create, &[])).await.unwrap();
    let remove = format!("sd-{r}");
    s.run(&env.vm(&remove, &[])).await.unwrap();
    let gone_id = format!("sdx-{r}x");
    s.stream_create(&remove, &stream(&gone_id)).await.unwrap();
    Round {
        run: env.vm(&format!("run-{r}"), &[]),
        del,
        lock,
        create: (create, stream(&format!("scx-{r}x"))),
        remove: (remove, gone_id),
    }
}

type Pending = tokio::task::JoinHandle<(&'static str, Result<(), String>, Duration)>;

/// Sends the round's five calls at once, each from its own caller.
fn launch(env: &Stack, round: &Round) -> Vec<Pending> {
    fn go<F>(what: &'static str, call: F) -> Pending
    where
        F: std::future::Future<Output = Result<(), ClientError>> + Send + 'static,
    {
        tokio::spawn(async move {
            let t0 = Instant::now();
            let r = call.await.map_err(|e| e.to_string());
            (what, r, t0.elapsed())
        })
    }
    let c = || env.caller(DEADLINE);
    let (s, run) = (c(), round.run.clone());
    let run = go("Run", async move { s.run(&run).await.map(drop) });
    let (s, name) = (c(), round.del.clone());
    let del = go("Delete", async move { s.delete(&name).await });
    let (s, name) = (c(), round.lock.clone());
    let lock = go("Lock", async move { s.lock(&name, true).await });
    let (s, (name, st)) = (c(), round.create.clone());
    let create = go(
        "StreamCreate",
        async move { s.stream_create(&name, &st).await },
    );
    let (s, id) = (c(), round.remove.1.clone());
    let remove = go("StreamDelete", async move { s.stream_delete(&id).await });
    vec![run, del, lock, create, remove]
}

async fn interrupt(env: &mut Stack, how: Interrupt) {
    match how {
        Interrupt::Kill => env.vmd.crash_and_restart(),
        Interrupt::Term => {
            env.vmd.signal(libc::SIGTERM);
            let st = env.vmd.wait_exit(Duration::from_secs(15));
            assert!(
                st.is_some_and(|s| s.success()),
                "vmd did not stop cleanly on SIGTERM: {st:?}\n{}",
                env.vmd.stderr()
            );
            env.vmd.restart();
        }
        Interrupt::ZinitRestart => {
            let out = env.zinit.cli(&["restart", "vmd"]);
            assert!(
                out.status.success(),
                "zinit restart vmd: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// The processes of VM `name` running `program`.
fn programs_of(env: &Stack, name: &str, program: &str) -> usize {
    // Shims name the VM's run directory, VMMs its API socket.
    let run = format!("{}/", env.run_dir(name).display());
    let api = format!("path={}", env.api_socket(name).display());
    processes_with(&env.vmd.runtime().to_string_lossy())
        .into_iter()
        .filter(|p| {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            let ours = cmd.split(|&b| b == 0).any(|a| {
                let a = String::from_utf8_lossy(a);
                a == api || a.contains(&run) || a == run.trim_end_matches('/')
            });
            if !ours {
                return false;
            }
            let argv0 = cmd.split(|&b| b == 0).next().unwrap_or_default();
            std::path::Path::new(&*String::from_utf8_lossy(argv0))
                .file_name()
                .is_some_and(|f| f.to_string_lossy() == program)
        })
        .count()
}

fn workers_of(env: &Stack, id: &str) -> usize {
    processes_with(&format!(
        "{}/streams/progress/{id}.progress",
        env.vmd.runtime().display()
    ))
    .len()
}

/// Keys left in Redis that are not vmd's own: a reply list there is a reply
/// that nobody took — a second reply to a caller that already had one.
async fn stray_keys(env: &Stack) -> Vec<String> {
    let mut c = env.redis.broker().connect().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut c)
        .await
        .unwrap();
    keys.into_iter()
        .filter(|k| !k.starts_with("vmd.") && !k.starts_with("vmd:"))
        .collect()
}

async fn in_flight(env: &Stack) -> usize {
    let mut c = env.redis.broker().connect().await.unwrap();
    requests_in_flight(&mut c).await
}

/// Checks the round's answers and effects, then removes what it made.
/// Returns how long the slowest caller waited for its answer.
async fn settle(env: &Stack, round: &Round, pending: Vec<Pending>, what: &str) -> Duration {
    let mut slowest = Duration::ZERO;
    for p in pending {
        let (method, result, took) = p.await.unwrap();
        slowest = slowest.max(took);
        assert!(
            result.is_ok(),
            "{what}: {method} answered {result:?} after {took:?}\n{}",
            env.vmd.stderr()
        );
        assert!(took < DEADLINE, "{what}: {method} took {took:?}");
    }
    let s = &env.stub;
    let vmm = ch_program_name();
    // Run: the VM is there, with one VMM.
    assert!(s.exists(&round.run.name).await.unwrap(), "{what}: Run");
    assert_eq!(
        programs_of(env, &round.run.name, &vmm),
        1,
        "{what}: VMMs of the Run's VM"
    );
    // Delete: gone, and stays gone (a replay ran no Run again).
    assert!(!s.exists(&round.del).await.unwrap(), "{what}: Delete");
    env.wait_gone(&round.del).await;
    // Lock: paused.
    let st = s.inspect(&round.lock).await.unwrap().state;
    assert_eq!(st.as_deref(), Some("paused"), "{what}: Lock");
    // StreamCreate: one worker; StreamDelete: none.
    let created = round.create.1.id.clone();
    until(
        Duration::from_secs(10),
        format!("{what}: one worker of {created}"),
        || std::future::ready(workers_of(env, &created) == 1),
    )
    .await;
    assert_eq!(workers_of(env, &round.remove.1), 0, "{what}: StreamDelete");
    // Every reply taken by its caller, nothing left in flight.
    assert_eq!(
        stray_keys(env).await,
        Vec::<String>::new(),
        "{what}: replies nobody took"
    );
    assert_eq!(in_flight(env).await, 0, "{what}: requests left in flight");
    let deletes = [
        &round.run.name,
        &round.lock,
        &round.create.0,
        &round.remove.0,
    ]
    .map(|vm| {
        let (s, vm) = (env.caller(DEADLINE), vm.clone());
        tokio::spawn(async move { s.delete(&vm).await })
    });
    for d in deletes {
        d.await.unwrap().unwrap();
    }
    slowest
}

async fn rounds(how: Interrupt, kill_points_ms: &[u64]) {
    if real_ch() {
        eprintln!("skipped: needs the double's ignore_power_button knob");
        return;
    }
    let grace = GRACE_SECS.to_string();
    let mut env = Stack::start(&["--grace-secs", &grace]).await;
    if matches!(how, Interrupt::ZinitRestart) {
        env.vmd.move_under_zinit(&env.zinit, "vmd").await;
        env.vmd.wait_ready().await;
    }
    for (r, at) in kill_points_ms.iter().enumerate() {
        let round = prepare(&env, r).await;
        let pending = launch(&env, &round);
        tokio::time::sleep(Duration::from_millis(*at)).await;
        interrupt(&mut env, how).await;
        let what = format!("{how:?} {at} ms into the calls");
        let slowest = settle(&env, &round, pending, &what).await;
        eprintln!("{what}: all five answered once and right, the slowest after {slowest:?}");
    }
    if matches!(how, Interrupt::ZinitRestart) {
        // vmd's own unit is not something vmd left.
        let name = zinit::ServiceName::new("vmd").unwrap();
        let z = env.zinit.client();
        z.stop(&name).await.unwrap();
        until(Duration::from_secs(15), "vmd stopped", || async {
            z.status(&name).await.is_ok_and(|s| s.pid == 0)
        })
        .await;
        z.forget(&name).await.unwrap();
        env.zinit.config_dir().remove(&name).unwrap();
    }
    env.assert_nothing_left().await;
    let log = env.vmd.stderr();
    if matches!(how, Interrupt::Kill) {
        assert!(
            log.contains("serving a request an earlier run took"),
            "no kill point caught a call in flight: {log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_at_22_points_every_caller_gets_one_right_answer() {
    // From before the first call is taken to the graceful Delete waiting
    // out its grace (the other four take 10–40 ms with the double).
    rounds(
        Interrupt::Kill,
        &[
            0, 1, 2, 3, 4, 6, 8, 10, 13, 16, 20, 25, 30, 40, 50, 70, 100, 150, 250, 400, 600, 850,
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_leaves_nothing_unanswered() {
    rounds(Interrupt::Term, &[0, 5, 30, 300, 800]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn zinit_restart_leaves_nothing_unanswered() {
    rounds(Interrupt::ZinitRestart, &[0, 20, 600]).await;
}
