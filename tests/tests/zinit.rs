//! The `zinit` crate against a zinit: the double by default, the real one
//! with `VMD_TEST_ZINIT=/path/to/zinit`. Same tests, same expectations.

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use vmd_tests::supervisor::processes_with;
use vmd_tests::{bin, until, until_some, Supervisor};
use zinit::{
    Command, Log, Service, ServiceName, SignalName, Signals, State, Target, WaitStatus, ZinitError,
};

fn name(s: &str) -> ServiceName {
    s.parse().unwrap()
}

fn probe(args: &[&str]) -> Command {
    let p = bin("vmd-test-probe");
    Command::new(
        std::iter::once(p.to_string_lossy().into_owned()).chain(args.iter().map(|s| s.to_string())),
    )
    .unwrap()
}

/// A marker unique to this test run, to find its processes in /proc.
fn marker(z: &Supervisor, what: &str) -> String {
    let dir = z
        .dir
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    format!("{dir}-{what}")
}

async fn install(z: &Supervisor, n: &str, svc: &Service) {
    z.config_dir().install(&name(n), svc).unwrap();
    z.client().monitor(&name(n)).await.unwrap();
}

async fn running_pid(z: &Supervisor, n: &str) -> u32 {
    let c = z.client();
    let n = name(n);
    until_some(Duration::from_secs(10), "Running", || async {
        let st = c.status(&n).await.unwrap();
        (st.state == State::Running && st.pid > 0).then_some(st.pid)
    })
    .await
}

#[tokio::test]
async fn monitor_runs_the_service() {
    let z = Supervisor::start();
    let m = marker(&z, "run");
    install(&z, "svc:a", &Service::new(probe(&["sleep", &m]))).await;
    let pid = running_pid(&z, "svc:a").await;
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    assert_eq!(processes_with(&m), vec![pid as i32]);
    // Its own process group, led by itself.
    assert_eq!(unsafe { libc::getpgid(pid as i32) }, pid as i32);
    let list = z.client().list().await.unwrap();
    assert_eq!(list.get("svc:a"), Some(&State::Running));
    let st = z.client().status(&name("svc:a")).await.unwrap();
    assert_eq!((st.name.as_str(), st.target), ("svc:a", Target::Up));
    // The CLI sees it too.
    let out = z.cli(&["list"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("svc:a"));
}

#[tokio::test]
async fn a_killed_service_is_respawned_about_two_seconds_later() {
    let z = Supervisor::start();
    let m = marker(&z, "respawn");
    install(&z, "svc:r", &Service::new(probe(&["sleep", &m]))).await;
    let first = running_pid(&z, "svc:r").await;
    let killed = Instant::now();
    unsafe {
        libc::kill(first as i32, libc::SIGKILL);
    }
    let c = z.client();
    // First the exit is recorded…
    let st = until_some(Duration::from_secs(2), "the exit", || async {
        let st = c.status(&name("svc:r")).await.unwrap();
        (st.pid == 0).then_some(st)
    })
    .await;
    assert_eq!(
        st.state,
        State::Error(WaitStatus::Signaled {
            pid: first as i32,
            signal: "SIGKILL".into(),
            core_dumped: false
        })
    );
    // …then a new process after the respawn delay.
    let second = until_some(Duration::from_secs(6), "the respawn", || async {
        let st = c.status(&name("svc:r")).await.unwrap();
        (st.pid != 0 && st.pid != first).then_some(st.pid)
    })
    .await;
    let after = killed.elapsed();
    assert!(
        after >= Duration::from_millis(1800) && after <= Duration::from_millis(3500),
        "respawned {after:?} after the kill, zinit waits 2 s"
    );
    assert_ne!(first, second);
    assert_eq!(processes_with(&m), vec![second as i32]);
}

#[tokio::test]
async fn stop_then_forget() {
    let z = Supervisor::start();
    let m = marker(&z, "stop");
    install(&z, "svc:s", &Service::new(probe(&["sleep", &m]))).await;
    running_pid(&z, "svc:s").await;
    let c = z.client();
    // Forgetting a running service is refused.
    assert!(matches!(c.forget(&name("svc:s")).await, Err(ZinitError::IsUp(n)) if n == "svc:s"));
    c.stop_and_wait(&name("svc:s"), Duration::from_secs(5))
        .await
        .unwrap();
    let st = c.status(&name("svc:s")).await.unwrap();
    assert_eq!((st.pid, st.target), (0, Target::Down));
    // Stopped means not respawned: watched for longer than zinit's 2 s
    // respawn delay (an observation window, not a wait for an event).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(c.status(&name("svc:s")).await.unwrap().pid, 0);
    assert!(processes_with(&m).is_empty());
    c.forget(&name("svc:s")).await.unwrap();
    assert!(!c.list().await.unwrap().contains_key("svc:s"));
    assert!(matches!(
        c.forget(&name("svc:s")).await,
        Err(ZinitError::UnknownService(_))
    ));
    // remove() of what is already gone succeeds (crash recovery repeats it).
    c.remove(&name("svc:s"), Duration::from_secs(1))
        .await
        .unwrap();
}

/// zinit signals the pid it last knew: a process that died a moment before
/// `stop` makes zinit answer ESRCH, with the target already down. Removing
/// such a service must still succeed (found by the soak: a Delete failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_service_whose_process_just_died_succeeds() {
    let z = Supervisor::start();
    let c = z.client();
    let m = marker(&z, "dying");
    let mut esrch = 0;
    for i in 0..40 {
        let n = format!("svc:d{i}");
        install(&z, &n, &Service::new(probe(&["sleep", &m]))).await;
        let pid = running_pid(&z, &n).await;
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
        if i % 2 == 0 {
            // The raw call shows the race is there …
            if let Err(ZinitError::NoSuchProcess(_)) = c.stop(&name(&n)).await {
                esrch += 1;
            }
        }
        // … and remove() gets through it.
        c.remove(&name(&n), Duration::from_secs(2))
            .await
            .unwrap_or_else(|e| panic!("remove {n}: {e}"));
        assert!(!c.list().await.unwrap().contains_key(&n));
    }
    eprintln!("stop right after kill -9: ESRCH {esrch} of 20 times");
    assert!(processes_with(&m).is_empty());
}

#[tokio::test]
async fn stop_and_wait_escalates_to_sigkill() {
    let z = Supervisor::start();
    let m = marker(&z, "stubborn");
    let ready = z.dir.path().join("stubborn.ready");
    let ready_arg = ready.to_string_lossy().into_owned();
    install(
        &z,
        "svc:k",
        &Service::new(probe(&["ignore-term", &m, &ready_arg])),
    )
    .await;
    running_pid(&z, "svc:k").await;
    // Stopped only once it ignores SIGTERM (a stop before that kills it at
    // once: seen on a loaded machine).
    until(
        Duration::from_secs(10),
        "the probe ignoring SIGTERM",
        || std::future::ready(ready.exists()),
    )
    .await;
    let t0 = Instant::now();
    z.client()
        .stop_and_wait(&name("svc:k"), Duration::from_millis(700))
        .await
        .unwrap();
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(700),
        "returned after {took:?}, before the grace period"
    );
    assert!(took < Duration::from_secs(4), "took {took:?}");
    assert!(processes_with(&m).is_empty());
}

#[tokio::test]
async fn the_configured_stop_signal_is_sent() {
    let z = Supervisor::start();
    let file = z.dir.path().join("signal");
    let mut svc = Service::new(probe(&["signal-log", file.to_str().unwrap()]));
    svc.signal = Some(Signals {
        stop: SignalName(Signal::SIGINT),
    });
    install(&z, "svc:sig", &svc).await;
    running_pid(&z, "svc:sig").await;
    // Stop it once it catches its signals (before, SIGINT would just kill it).
    let ready = z.dir.path().join("signal.ready");
    until_some(
        Duration::from_secs(5),
        "the probe to block its signals",
        || std::future::ready(ready.exists().then_some(())),
    )
    .await;
    z.client()
        .stop_and_wait(&name("svc:sig"), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "SIGINT");
}

#[tokio::test]
async fn oneshots_are_not_respawned() {
    let z = Supervisor::start();
    let mut ok = Service::new(probe(&["exit", "0"]));
    ok.oneshot = true;
    let mut bad = Service::new(probe(&["exit", "3"]));
    bad.oneshot = true;
    install(&z, "once:ok", &ok).await;
    install(&z, "once:bad", &bad).await;
    let c = z.client();
    until_some(Duration::from_secs(5), "both oneshots to end", || async {
        let l = c.list().await.unwrap();
        (l["once:ok"] == State::Success && matches!(l["once:bad"], State::Error(_))).then_some(())
    })
    .await;
    // Oneshots are not respawned: watched for longer than zinit's 2 s
    // respawn delay (an observation window, not a wait for an event).
    tokio::time::sleep(Duration::from_millis(2600)).await;
    let st = c.status(&name("once:bad")).await.unwrap();
    assert!(
        matches!(st.state, State::Error(WaitStatus::Exited { code: 3, .. })),
        "{st:?}"
    );
    assert_eq!(
        c.status(&name("once:ok")).await.unwrap().state,
        State::Success
    );
    // Each started exactly once.
    for n in ["once:ok", "once:bad"] {
        let starts = c
            .service_log(&name(n))
            .await
            .unwrap()
            .iter()
            .filter(|l| l.contains("[start]"))
            .count();
        assert_eq!(starts, 1, "{n}");
    }
}

#[tokio::test]
async fn test_gates_running() {
    let z = Supervisor::start();
    let m = marker(&z, "gated");
    let flag = z.dir.path().join("ready");
    let mut svc = Service::new(probe(&["sleep", &m]));
    svc.test = Some(Command::new(["/usr/bin/test", "-e", flag.to_str().unwrap()]).unwrap());
    install(&z, "svc:t", &svc).await;
    let c = z.client();
    until_some(Duration::from_secs(5), "Spawned", || async {
        let st = c.status(&name("svc:t")).await.unwrap();
        (st.state == State::Spawned && st.pid > 0).then_some(())
    })
    .await;
    // A failing test keeps it Spawned: watched for longer than zinit's 2 s
    // retry delay (an observation window, not a wait for an event).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        c.status(&name("svc:t")).await.unwrap().state,
        State::Spawned
    );
    std::fs::write(&flag, "").unwrap();
    let t0 = Instant::now();
    running_pid(&z, "svc:t").await;
    // The test is polled every 2 s.
    assert!(
        t0.elapsed() <= Duration::from_millis(2600),
        "{:?}",
        t0.elapsed()
    );
}

#[tokio::test]
async fn after_is_respected() {
    let z = Supervisor::start();
    let flag = z.dir.path().join("dep-ready");
    let mut dep = Service::new(probe(&["sleep", &marker(&z, "dep")]));
    dep.test = Some(Command::new(["/usr/bin/test", "-e", flag.to_str().unwrap()]).unwrap());
    let mut later = Service::new(probe(&["sleep", &marker(&z, "later")]));
    later.after = vec![name("svc:dep")];
    let mut init = Service::new(probe(&["exit", "0"]));
    init.oneshot = true;
    let mut after_init = Service::new(probe(&["sleep", &marker(&z, "after-init")]));
    after_init.after = vec![name("svc:init")];
    install(&z, "svc:later", &later).await;
    install(&z, "svc:dep", &dep).await;
    let c = z.client();
    // `dep` is spawned but its test keeps failing: `later` waits for it.
    let st = until_some(Duration::from_secs(5), "svc:dep to be spawned", || async {
        let st = c.status(&name("svc:later")).await.unwrap();
        (st.after.get("svc:dep") == Some(&State::Spawned)).then_some(st)
    })
    .await;
    assert_eq!((st.state, st.pid), (State::Blocked, 0));
    std::fs::write(&flag, "").unwrap();
    running_pid(&z, "svc:dep").await;
    running_pid(&z, "svc:later").await;
    // After a oneshot: starts once it succeeded.
    install(&z, "svc:after-init", &after_init).await;
    let st = c.status(&name("svc:after-init")).await.unwrap();
    assert_eq!((&st.state, st.pid), (&State::Blocked, 0), "{st:?}");
    assert_eq!(st.after.get("svc:init"), Some(&State::Unknown), "{st:?}");
    install(&z, "svc:init", &init).await;
    running_pid(&z, "svc:after-init").await;
}

#[tokio::test]
async fn errors_are_typed() {
    let z = Supervisor::start();
    let c = z.client();
    let m = marker(&z, "err");
    assert!(
        matches!(c.status(&name("nope")).await, Err(ZinitError::UnknownService(n)) if n == "nope")
    );
    assert!(
        matches!(c.monitor(&name("nope")).await, Err(ZinitError::ConfigLoad(n)) if n == "nope")
    );
    std::fs::write(z.config_path().join("broken.yaml"), "exec: [unterminated").unwrap();
    assert!(matches!(
        c.monitor(&name("broken")).await,
        Err(ZinitError::ConfigLoad(_))
    ));
    install(&z, "svc:e", &Service::new(probe(&["sleep", &m]))).await;
    assert!(
        matches!(c.monitor(&name("svc:e")).await, Err(ZinitError::AlreadyMonitored(n)) if n == "svc:e")
    );
    running_pid(&z, "svc:e").await;
    c.stop_and_wait(&name("svc:e"), Duration::from_secs(5))
        .await
        .unwrap();
    assert!(matches!(
        c.kill(&name("svc:e"), Signal::SIGTERM).await,
        Err(ZinitError::IsDown(_))
    ));
    assert!(matches!(
        c.stop(&name("ghost")).await,
        Err(ZinitError::UnknownService(_))
    ));
    // A dead zinit is a clear connection error, not a hang.
    let dead = zinit::Client::new(z.dir.path().join("no.sock"));
    assert!(matches!(dead.list().await, Err(ZinitError::Connect { .. })));
}

#[tokio::test]
async fn the_log_ring_carries_stdout_stderr_and_start_markers() {
    let z = Supervisor::start();
    let mut svc = Service::new(probe(&["print", "to stdout", "to stderr"]));
    svc.log = Log::Ring;
    install(&z, "svc:log", &svc).await;
    let c = z.client();
    let lines = until_some(Duration::from_secs(5), "the service's lines", || async {
        let l = c.service_log(&name("svc:log")).await.unwrap();
        (l.len() >= 3).then_some(l)
    })
    .await;
    assert_eq!(lines[0], "[-] svc:log: ------------ [start] ------------");
    assert!(
        lines.contains(&"[+] svc:log: to stdout".to_owned()),
        "{lines:?}"
    );
    assert!(
        lines.contains(&"[-] svc:log: to stderr".to_owned()),
        "{lines:?}"
    );
    // `zinit log -s svc:log` filters the same way.
    let out = z.cli(&["log", "-s", "svc:log"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("[+] svc:log: to stdout"), "{text}");
}

#[tokio::test]
async fn hostile_argv_and_env_reach_the_process_intact() {
    let z = Supervisor::start();
    let out = z.dir.path().join("record.json");
    let hostile = [
        "a b",
        "it's",
        "say \"hi\"",
        "back\\slash",
        "$(id)",
        "`id`",
        "# hash",
        "key: value",
        "- dash",
        "{x}",
        "yes",
        "007",
        "tab\there",
        "ünï",
    ];
    let mut args = vec!["record", out.to_str().unwrap()];
    args.extend(hostile);
    let mut svc = Service::new(probe(&args));
    for (i, v) in hostile.iter().enumerate() {
        svc.env.insert(format!("HOSTILE_{i}"), (*v).to_owned());
    }
    svc.env.insert("MULTI".into(), "line one\nline two".into());
    svc.dir = Some(z.dir.path().to_path_buf());
    install(&z, "svc:hostile", &svc).await;
    let rec = until_some(Duration::from_secs(5), "the record", || async {
        let text = std::fs::read_to_string(&out).ok()?;
        serde_json::from_str::<serde_json::Value>(&text).ok()
    })
    .await;
    let argv: Vec<&str> = rec["argv"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(&argv[3..], &hostile[..]);
    for (i, v) in hostile.iter().enumerate() {
        assert_eq!(
            rec["env"][format!("HOSTILE_{i}")].as_str(),
            Some(*v),
            "HOSTILE_{i}"
        );
    }
    assert_eq!(rec["env"]["MULTI"].as_str(), Some("line one\nline two"));
    assert_eq!(rec["cwd"].as_str(), z.dir.path().to_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_services_leave_nothing_behind() {
    let z = Supervisor::start();
    let m = marker(&z, "many");
    let dir = z.config_dir();
    let c = z.client();
    let names: Vec<ServiceName> = (0..200).map(|i| name(&format!("many:{i}"))).collect();
    let t0 = Instant::now();
    for chunk in names.chunks(20) {
        for n in chunk {
            dir.install(n, &Service::new(probe(&["sleep", &m])))
                .unwrap();
            c.monitor(n).await.unwrap();
        }
        for n in chunk {
            running_pid(&z, n.as_str()).await;
        }
        assert_eq!(processes_with(&m).len(), chunk.len());
        let removals = chunk.iter().map(|n| {
            let (c, dir) = (c.clone(), dir.clone());
            async move {
                c.remove(n, Duration::from_secs(5)).await.unwrap();
                dir.remove(n).unwrap();
            }
        });
        futures_join_all(removals).await;
    }
    eprintln!(
        "200 services monitored, stopped and forgotten in {:?}",
        t0.elapsed()
    );
    assert!(processes_with(&m).is_empty(), "leftover processes");
    assert!(c
        .list()
        .await
        .unwrap()
        .keys()
        .all(|k| !k.starts_with("many:")));
    assert!(dir.list().unwrap().is_empty(), "leftover files");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

async fn futures_join_all<F: Future<Output = ()>>(futs: impl IntoIterator<Item = F>) {
    let handles: Vec<_> = futs.into_iter().collect();
    for f in handles {
        f.await;
    }
}
