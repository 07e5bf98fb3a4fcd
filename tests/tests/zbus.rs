//! zbus client ↔ server over a real `redis-server` on a private unix socket.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmd::api::{Stream, Vm};
use vmd::stub::VmdStub;
use vmd::zbus::client::ClientError;
use vmd::zbus::wire::{ObjectId, WorkerState};
use vmd_tests::fixture::{Fixture, Serving};
use vmd_tests::redis_server::{leave_in_flight, requests_in_flight};
use vmd_tests::{until, RedisServer};

fn stub(redis: &RedisServer) -> VmdStub {
    VmdStub::new(redis.broker()).with_timeout(Duration::from_secs(10))
}

fn vm(name: &str) -> Vm {
    Vm {
        name: name.into(),
        cpu: 1,
        memory: 512 << 20,
        kernel_image: "/k".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn every_method_round_trips() {
    let redis = RedisServer::start();
    let fixture = Arc::new(Fixture::with_vms(&["1-2-vm", "3-4-vm"]));
    let server = Serving::start(redis.broker(), fixture.clone(), 64);
    let c = stub(&redis);

    let info = c.run(&vm("1-2-vm")).await.unwrap();
    assert_eq!(info.console_url, "10.20.2.1:20001");
    let err = c.run(&vm("boom")).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Method(m) if m == "boom"),
        "{err}"
    );

    let i = c.inspect("1-2-vm").await.unwrap();
    assert_eq!((i.memory, i.cpu, i.ht_enabled), (512, 1, false));
    let err = c.inspect("nope").await.unwrap_err();
    assert_eq!(err.to_string(), "machine 'nope' does not exist");

    c.delete("1-2-vm").await.unwrap();
    assert_eq!(
        c.delete("x").await.unwrap_err().to_string(),
        "machine 'x' does not exist"
    );
    assert!(c.exists("3-4-vm").await.unwrap());
    assert!(!c.exists("5-6-vm").await.unwrap());
    assert_eq!(c.logs("3-4-vm").await.unwrap(), "last lines of 3-4-vm\n");
    assert_eq!(
        c.logs_full("3-4-vm").await.unwrap(),
        "all lines of 3-4-vm\n".repeat(3)
    );
    assert_eq!(c.list().await.unwrap(), ["1-2-vm", "3-4-vm"]);
    assert_eq!(c.metrics().await.unwrap(), Fixture::metrics_two());
    c.lock("3-4-vm", true).await.unwrap();
    c.lock("3-4-vm", false).await.unwrap();
    assert!(c.lock("nope", true).await.is_err());
    let s = Stream {
        id: "s1".into(),
        namespace: "n-1".into(),
        output: "redis://10.0.0.1:6379/ch".into(),
    };
    c.stream_create("3-4-vm", &s).await.unwrap();
    c.stream_delete("s1").await.unwrap();

    // A panic inside a method is a method error with a decodable zero value,
    // never a protocol error (which would make a Go caller panic too).
    let err = c.run(&vm("panic")).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Method(m) if m.contains("panicked")),
        "{err}"
    );

    // The module's documented name is served too.
    let alias = stub(&redis).with_object(ObjectId::new("vmd", "0.0.1"));
    assert!(alias.exists("3-4-vm").await.unwrap());

    let st = c.status().await.unwrap();
    assert_eq!(st.objects, [ObjectId::new("manager", "0.0.1")]);
    // Idle: no call running, one free worker (room for another call).
    assert_eq!(st.workers.len(), 1, "{st:?}");
    assert_eq!(st.workers[0].state, WorkerState::Free);

    let calls = fixture.calls.lock().unwrap().clone();
    assert_eq!(
        calls,
        [
            "Run(1-2-vm)",
            "Run(boom)",
            "Inspect(1-2-vm)",
            "Inspect(nope)",
            "Delete(1-2-vm)",
            "Delete(x)",
            "Exists(3-4-vm)",
            "Exists(5-6-vm)",
            "Logs(3-4-vm)",
            "LogsFull(3-4-vm)",
            "List()",
            "Metrics()",
            "Lock(3-4-vm, true)",
            "Lock(3-4-vm, false)",
            "Lock(nope, true)",
            "StreamCreate(3-4-vm, s1, n-1, redis://10.0.0.1:6379/ch)",
            "StreamDelete(s1)",
            "Run(panic)",
            "Exists(3-4-vm)",
        ]
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_calls_from_16_tasks() {
    let redis = RedisServer::start();
    let fixture = Arc::new(Fixture::default());
    let server = Serving::start(redis.broker(), fixture.clone(), 64);
    let c = Arc::new(stub(&redis));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..16 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            // 1000 calls in all: tasks 0..8 make 63, the others 62.
            let n = if t < 8 { 63 } else { 62 };
            for i in 0..n {
                let name = format!("vm-{t}-{i}");
                let got = c.logs(&name).await.unwrap();
                // Each reply must be the answer to this very call.
                assert_eq!(got, format!("last lines of {name}\n"));
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert_eq!(total, 1000);
    assert_eq!(fixture.calls.lock().unwrap().len(), 1000);
    eprintln!("1000 calls from 16 tasks in {:?}", t0.elapsed());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_of_different_vms_run_at_once_and_status_shows_each() {
    let redis = RedisServer::start();
    let fixture = Arc::new(Fixture::default());
    let server = Serving::start(redis.broker(), fixture.clone(), 64);
    let c = Arc::new(stub(&redis));
    let mut slow = Vec::new();
    for i in 0..12 {
        let c = c.clone();
        slow.push(tokio::spawn(async move {
            c.run(&vm(&format!("sleep-{}", 3000 + i))).await
        }));
    }
    // Each waits for its own "guest" only: all twelve run together.
    until(
        Duration::from_secs(5),
        "the Runs never ran together",
        || std::future::ready(fixture.running_total.load(Ordering::SeqCst) == 12),
    )
    .await;
    let asked = Instant::now();
    let st = c.status().await.unwrap();
    let took = asked.elapsed();
    assert!(
        took < Duration::from_millis(1500),
        "status took {took:?} while calls ran"
    );
    let busy: Vec<_> = st
        .workers
        .iter()
        .filter(|w| w.state == WorkerState::Busy)
        .collect();
    assert_eq!(busy.len(), 12, "{st:?}");
    assert!(busy.iter().all(|w| w.action == "[manager@0.0.1].Run()"));
    assert_eq!(
        st.workers.last().unwrap().state,
        WorkerState::Free,
        "{st:?}"
    );
    // The status was answered while every Run still ran.
    assert_eq!(fixture.running_total.load(Ordering::SeqCst), 12);
    for s in slow {
        s.await.unwrap().unwrap();
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_never_wait_for_changes_and_a_change_past_the_bound_is_refused_at_once() {
    let redis = RedisServer::start();
    let names = ["sleep-4000", "sleep-4001", "sleep-4002", "sleep-4003"];
    let fixture = Arc::new(Fixture::with_vms(&names));
    let server = Serving::start(redis.broker(), fixture.clone(), 4);
    let c = Arc::new(stub(&redis));
    let mut deletes = Vec::new();
    for name in names {
        let c = c.clone();
        deletes.push(tokio::spawn(async move { c.delete(name).await }));
    }
    until(Duration::from_secs(5), "the Deletes never ran", || {
        std::future::ready(fixture.running_total.load(Ordering::SeqCst) == 4)
    })
    .await;
    // A Go caller's deadline: reads of every kind, of the VMs being deleted
    // too, are answered while all four Deletes still hold their VMs.
    let go = stub(&redis).with_timeout(Duration::from_secs(1));
    assert!(go.exists("sleep-4000").await.unwrap());
    assert_eq!(go.list().await.unwrap(), names);
    assert_eq!(go.inspect("sleep-4001").await.unwrap().cpu, 1);
    assert_eq!(
        go.logs("sleep-4002").await.unwrap(),
        "last lines of sleep-4002\n"
    );
    assert!(go.logs_full("sleep-4003").await.is_ok());
    assert!(go.metrics().await.is_ok());
    // The bound is reached: one more change is refused at once, with a
    // method error (the reply a Go stub takes: Run still carries its zero
    // MachineInfo), never queued past the caller's deadline.
    let err = go.run(&vm("another")).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Method(m) if m.contains("vmd is busy")),
        "{err}"
    );
    let err = go.delete("another").await.unwrap_err();
    assert!(matches!(&err, ClientError::Method(_)), "{err}");
    let st = go.status().await.unwrap();
    assert_eq!(
        st.workers
            .iter()
            .filter(|w| w.state == WorkerState::Busy)
            .count(),
        4,
        "{st:?}"
    );
    assert!(
        st.workers.iter().all(|w| w.state == WorkerState::Busy),
        "no room left, no free worker shown: {st:?}"
    );
    assert_eq!(
        fixture.running_total.load(Ordering::SeqCst),
        4,
        "the reads were answered only after a Delete ended"
    );
    for d in deletes {
        d.await.unwrap().unwrap();
    }
    // Room again.
    go.delete("another").await.unwrap();
    let calls = fixture.calls.lock().unwrap().clone();
    assert!(
        !calls.contains(&"Run(another)".to_owned()),
        "a refused call ran: {calls:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_to_one_vm_are_serialised_others_run_alongside() {
    let redis = RedisServer::start();
    let fixture = Arc::new(Fixture::default());
    let server = Serving::start(redis.broker(), fixture.clone(), 64);
    let c = Arc::new(stub(&redis));
    let mut tasks = Vec::new();
    // Five Deletes of the same VM, and one Delete each of four others.
    for name in ["slow-a"; 5]
        .into_iter()
        .chain(["slow-b", "slow-c", "slow-d", "slow-e"])
    {
        let c = c.clone();
        tasks.push(tokio::spawn(async move { c.delete(name).await }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(
        fixture.max_concurrent("slow-a"),
        1,
        "same VM ran concurrently"
    );
    assert!(
        fixture.max_running_total.load(Ordering::SeqCst) >= 2,
        "different VMs never ran concurrently"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_by_itself_after_a_redis_restart() {
    let mut redis = RedisServer::start();
    let fixture = Arc::new(Fixture::with_vms(&["a"]));
    let server = Serving::start(redis.broker(), fixture.clone(), 64);
    let c = stub(&redis).with_timeout(Duration::from_secs(2));
    for _ in 0..20 {
        assert!(c.exists("a").await.unwrap());
    }
    redis.restart();
    let restarted = Instant::now();
    // The server reconnects with back-off; calls succeed again shortly.
    let mut recovered = None;
    while restarted.elapsed() < Duration::from_secs(15) {
        if let Ok(true) = c.exists("a").await {
            recovered = Some(restarted.elapsed());
            break;
        }
    }
    let recovered = recovered.expect("no successful call within 15 s of the restart");
    eprintln!("first successful call {recovered:?} after the restart");
    for _ in 0..100 {
        assert!(c.exists("a").await.unwrap());
    }
    // And it survives a second one.
    redis.restart();
    let t0 = Instant::now();
    loop {
        if let Ok(true) = c.exists("a").await {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "no recovery after second restart"
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_redis_without_blmove_is_served_too() {
    // Redis before 6.2 has no BLMOVE (nor LMOVE, BLMPOP, LPOP with a count).
    // vmd notices and waits the older way; without that it would never take
    // a request.
    for without in [&["BLMOVE", "LMOVE", "BLMPOP"][..]] {
        let redis = RedisServer::start_without(without);
        let fixture = Arc::new(Fixture::default());
        let server = Serving::start(redis.broker(), fixture.clone(), 64);
        let c = Arc::new(stub(&redis));
        // Concurrent callers, so requests queue up behind each pop.
        let mut tasks = Vec::new();
        for t in 0..8 {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..25 {
                    let name = format!("vm-{t}-{i}");
                    assert_eq!(
                        c.logs(&name).await.unwrap(),
                        format!("last lines of {name}\n")
                    );
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            fixture.calls.lock().unwrap().len(),
            200,
            "without {without:?}"
        );
        server.stop().await;
    }
}

#[tokio::test]
async fn a_dead_broker_is_a_clear_client_error() {
    let mut redis = RedisServer::start();
    let c = stub(&redis);
    redis.kill();
    let err = c.list().await.unwrap_err();
    assert!(
        err.to_string().contains("cannot connect to the broker"),
        "{err}"
    );
}

#[tokio::test]
async fn no_server_is_a_timeout_not_a_hang() {
    let redis = RedisServer::start();
    let c = stub(&redis).with_timeout(Duration::from_millis(300));
    let t0 = Instant::now();
    let err = c.exists("a").await.unwrap_err();
    assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(2));
}

/// A request as a Go stub encodes it, for `method(name)`.
fn raw_request(id: &str, reply_to: &str, method: &str, name: &str) -> Vec<u8> {
    use vmd::zbus::wire::RequestRef;
    let arg = serde_bytes::ByteBuf::from(vmd::zbus::codec::encode(&name).unwrap());
    let object = ObjectId::new("manager", "0.0.1");
    let req = RequestRef {
        id,
        inputs: &[arg],
        object: &object,
        reply_to,
        method,
    };
    vmd::zbus::codec::encode(&req).unwrap()
}

/// Sends a raw request for `Exists(name)` with the given reply address.
async fn raw_exists(
    c: &mut redis::aio::MultiplexedConnection,
    id: &str,
    reply_to: &str,
    name: &str,
) {
    let payload = raw_request(id, reply_to, "Exists", name);
    let _: () = redis::cmd("RPUSH")
        .arg("vmd.manager@0.0.1")
        .arg(payload)
        .query_async(c)
        .await
        .unwrap();
}

/// Waits (up to 5 s) until every request taken was answered.
async fn until_nothing_in_flight(c: &redis::aio::MultiplexedConnection) {
    until(Duration::from_secs(5), "nothing in flight", || {
        let mut c = c.clone();
        async move { requests_in_flight(&mut c).await == 0 }
    })
    .await;
}

async fn reply_of(
    c: &mut redis::aio::MultiplexedConnection,
    list: &str,
    wait_secs: f64,
) -> Option<vmd::zbus::wire::Response> {
    let got: Option<(String, Vec<u8>)> = redis::cmd("BLPOP")
        .arg(list)
        .arg(wait_secs)
        .query_async(c)
        .await
        .unwrap();
    got.map(|(_, b)| vmd::zbus::codec::decode(&b).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_an_earlier_run_left_are_answered_unless_too_old() {
    // What a killed server held: a Delete taken 2 s ago, one taken 10 min
    // ago (its caller gave up: the change must not happen now), and an
    // Exists.
    let redis = RedisServer::start();
    let mut c = redis.broker().connect().await.unwrap();
    let fresh = raw_request("fresh", "fresh-reply", "Delete", "young");
    leave_in_flight(&mut c, Duration::from_secs(2), &fresh).await;
    let stale = raw_request("stale", "stale-reply", "Delete", "old");
    leave_in_flight(&mut c, Duration::from_secs(600), &stale).await;
    let read = raw_request("read", "read-reply", "Exists", "young");
    leave_in_flight(&mut c, Duration::from_millis(10), &read).await;
    let fixture = Arc::new(Fixture::default());
    let server = Serving::start(redis.broker(), fixture.clone(), 64);
    let r = reply_of(&mut c, "fresh-reply", 5.0)
        .await
        .expect("fresh Delete answered");
    assert_eq!(
        (r.id.as_str(), r.error, r.output.error),
        ("fresh", None, None)
    );
    let r = reply_of(&mut c, "read-reply", 5.0)
        .await
        .expect("Exists answered");
    assert_eq!(r.id, "read");
    until_nothing_in_flight(&c).await;
    assert_eq!(
        reply_of(&mut c, "stale-reply", 0.2).await,
        None,
        "a stale request was answered"
    );
    let calls = fixture.calls.lock().unwrap().clone();
    assert!(calls.contains(&"Delete(young)".to_owned()), "{calls:?}");
    assert!(
        !calls.iter().any(|c| c.contains("old")),
        "a stale change ran: {calls:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_change_that_was_applied_gets_its_reply_without_running_again() {
    // A Delete applied and recorded, then the process died before its reply
    // went out: the next one answers with the recorded reply.
    let redis = RedisServer::start();
    let mut c = redis.broker().connect().await.unwrap();
    let fixture = Arc::new(Fixture::default());
    let server = Serving::start(redis.broker(), fixture.clone(), 64);
    // A first server applies it, and records its reply.
    let payload = raw_request("d-1", "d-1-reply", "Delete", "x");
    let _: () = redis::cmd("RPUSH")
        .arg("vmd.manager@0.0.1")
        .arg(&payload)
        .query_async(&mut c)
        .await
        .unwrap();
    let first = reply_of(&mut c, "d-1-reply", 5.0).await.expect("answered");
    // The fixture says "x" is missing: the recorded reply is that error.
    assert!(first.output.error.is_some(), "{first:?}");
    server.stop().await;
    assert_eq!(fixture.calls.lock().unwrap().len(), 1);
    // As if the reply had been lost with the process: the request is in
    // flight again. The next server answers it as the first did, without
    // running it.
    leave_in_flight(&mut c, Duration::from_secs(1), &payload).await;
    let server = Serving::start(redis.broker(), fixture.clone(), 64);
    let again = reply_of(&mut c, "d-1-reply", 5.0)
        .await
        .expect("replay answered");
    assert_eq!(again, first);
    assert_eq!(
        fixture.calls.lock().unwrap().len(),
        1,
        "the change ran twice: {:?}",
        fixture.calls.lock().unwrap()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_address_naming_a_key_of_another_type_delays_no_one() {
    // ReplyTo is the caller's word: it may name a string, a stream, vmd's
    // own keys. The reply to it fails; every other reply goes out at once,
    // and nothing stays in flight.
    let redis = RedisServer::start();
    let fixture = Arc::new(Fixture::default());
    let server = Serving::start(redis.broker(), fixture.clone(), 64);
    let c = stub(&redis).with_timeout(Duration::from_secs(2));
    let mut conn = redis.broker().connect().await.unwrap();
    let _: () = redis::cmd("SET")
        .arg("a-string")
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    // A refused reply is not a broken connection: vmd keeps its own.
    c.exists("a").await.unwrap();
    let connections = |info: String| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .and_then(|n| n.trim().parse().ok())
            .expect("INFO stats has total_connections_received")
    };
    let info = || {
        let mut c = redis::cmd("INFO");
        c.arg("stats");
        c
    };
    let before = connections(info().query_async(&mut conn).await.unwrap());
    for round in 0..3 {
        raw_exists(&mut conn, &format!("hostile-{round}"), "a-string", "a").await;
        let t0 = Instant::now();
        c.exists("a").await.unwrap();
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "round {round}: an honest caller waited {:?}",
            t0.elapsed()
        );
    }
    let after = connections(info().query_async(&mut conn).await.unwrap());
    assert_eq!(after, before, "vmd reconnected after a refused reply");
    // No honest reply went out twice (a failed batch sent again would leave
    // the second copy behind), the string is untouched and nothing is left
    // in flight.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    let strays: Vec<&String> = keys
        .iter()
        .filter(|k| *k != "a-string" && !k.starts_with("vmd.") && !k.starts_with("vmd:"))
        .collect();
    assert!(strays.is_empty(), "replies nobody took: {strays:?}");
    let v: String = redis::cmd("GET")
        .arg("a-string")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(v, "x");
    until_nothing_in_flight(&conn).await;
    server.stop().await;
}

/// A proxy between vmd and Redis that breaks the connection carrying the
/// first answer holding `marker`, instead of forwarding it: what Redis did
/// for that command is done, and vmd never hears of it.
struct CuttingProxy {
    path: std::path::PathBuf,
    cuts: Arc<std::sync::atomic::AtomicUsize>,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl CuttingProxy {
    fn start(redis: &RedisServer, marker: &'static [u8]) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let upstream = redis.socket();
        let cuts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let armed = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let task = tokio::spawn({
            let cuts = cuts.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let server = tokio::net::UnixStream::connect(&upstream).await.unwrap();
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut cr, &mut sw).await;
                    });
                    let (cuts, armed) = (cuts.clone(), armed.clone());
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match sr.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            let hit = buf[..n].windows(marker.len()).any(|w| w == marker);
                            if hit && armed.swap(false, Ordering::SeqCst) {
                                cuts.fetch_add(1, Ordering::SeqCst);
                                return; // both halves dropped: the connection breaks
                            }
                            if cw.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        CuttingProxy {
            path,
            cuts,
            _dir: dir,
            task,
        }
    }

    fn broker(&self) -> vmd::zbus::broker::Broker {
        vmd::zbus::broker::Broker::unix(&self.path)
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_whose_answer_was_lost_with_its_connection_is_served_after_reconnecting() {
    // Redis moved the request to the take's in-flight list; the answer that
    // carried it to vmd never arrived. Nothing else will ever serve it: vmd
    // must find it again by its take after reconnecting.
    let redis = RedisServer::start();
    let proxy = CuttingProxy::start(&redis, b"lost-take-id");
    let fixture = Arc::new(Fixture::default());
    let server = Serving::start(proxy.broker(), fixture.clone(), 64);
    let mut c = redis.broker().connect().await.unwrap();
    // Served at all (its popper is connected and waiting) before the cut.
    stub(&redis).exists("before").await.unwrap();
    raw_exists(&mut c, "lost-take-id", "lost-take-reply", "a").await;
    let r = reply_of(&mut c, "lost-take-reply", 10.0)
        .await
        .expect("the request of the lost take was answered");
    assert_eq!(r.id, "lost-take-id");
    assert_eq!(
        proxy.cuts.load(Ordering::SeqCst),
        1,
        "the take's answer was cut"
    );
    until_nothing_in_flight(&c).await;
    assert_eq!(
        reply_of(&mut c, "lost-take-reply", 0.3).await,
        None,
        "answered twice"
    );
    stub(&redis).exists("after").await.unwrap();
    server.stop().await;
}
