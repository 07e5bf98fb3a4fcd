//! vmd's own zinit unit, run under a zinit (double or real): vmd is
//! `Running` only once it answers the zbus status object.

use std::time::{Duration, Instant};

use vmd_tests::{bin, RedisServer, Supervisor};
use zinit::{Command, Service, ServiceName, State};

fn name(s: &str) -> ServiceName {
    s.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmd_unit_is_running_only_once_zbus_answers() {
    let unit = concat!(env!("CARGO_MANIFEST_DIR"), "/../zinit/etc/vmd.yaml");
    let mut svc = Service::from_yaml(&std::fs::read_to_string(unit).unwrap()).unwrap();
    let z = Supervisor::start();
    let mut redis = RedisServer::start();
    redis.kill();

    // The unit as shipped, with this test's paths: same flags, same test.
    let vmd = bin("vmd").to_string_lossy().into_owned();
    let rewrite = |cmd: &Command, extra: &[String]| {
        let mut argv: Vec<String> = cmd.argv().to_vec();
        argv[0] = vmd.clone();
        // `vmd ctl` relies on the default broker: name ours before `ctl`.
        match argv.iter().position(|a| a == "--broker") {
            Some(i) => argv[i + 1] = redis.url(),
            None => argv
                .splice(1..1, ["--broker".to_owned(), redis.url()])
                .for_each(drop),
        }
        argv.extend_from_slice(extra);
        Command::new(argv).unwrap()
    };
    let d = z.dir.path();
    let paths: Vec<String> = [
        ("--root", d.join("root")),
        ("--runtime-dir", d.join("run")),
        ("--zinit-socket", z.socket()),
        ("--zinit-dir", z.config_path()),
    ]
    .iter()
    .flat_map(|(f, p)| [f.to_string(), p.to_string_lossy().into_owned()])
    .collect();
    svc.exec = rewrite(&svc.exec, &paths);
    svc.test = Some(rewrite(svc.test.as_ref().unwrap(), &[]));

    // What vmd comes after on Zero-OS, as oneshots.
    let dir = z.config_dir();
    let c = z.client();
    for dep in ["boot", "networkd", "flistd"] {
        let mut s = Service::new(
            Command::new([
                bin("vmd-test-probe").to_string_lossy().as_ref(),
                "exit",
                "0",
            ])
            .unwrap(),
        );
        s.oneshot = true;
        dir.install(&name(dep), &s).unwrap();
        c.monitor(&name(dep)).await.unwrap();
    }
    dir.install(&name("vmd"), &svc).unwrap();
    c.monitor(&name("vmd")).await.unwrap();

    // No Redis: vmd runs (and retries the broker) but is never Running.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(5) {
        let st = c.status(&name("vmd")).await.unwrap();
        assert_ne!(st.state, State::Running, "Running without a broker");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let st = c.status(&name("vmd")).await.unwrap();
    assert_eq!(st.state, State::Spawned);
    assert!(st.pid > 0);

    // With Redis: Running at the next test poll.
    redis.restart();
    let t0 = Instant::now();
    loop {
        let st = c.status(&name("vmd")).await.unwrap();
        if st.state == State::Running {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "vmd never became Running: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // vmd's log lines are in the ring, as `zinit log vmd` shows them.
    let lines = c.service_log(&name("vmd")).await.unwrap();
    assert!(
        lines.iter().any(|l| l.contains("zbus server started")),
        "{lines:?}"
    );
    // And a stop is clean: vmd exits on SIGTERM by itself.
    c.stop_and_wait(&name("vmd"), Duration::from_secs(10))
        .await
        .unwrap();
    let st = c.status(&name("vmd")).await.unwrap();
    assert_eq!(st.state, State::Success, "vmd did not exit 0 on SIGTERM");
}
