//! The `vmd` binary as an operator and a hostile caller see it.

use std::time::{Duration, Instant};

use redis::AsyncCommands;
use serde_bytes::ByteBuf;
use vmd::stub::VmdStub;
use vmd::zbus::codec;
use vmd::zbus::wire::{ObjectId, Request, Response};
use vmd_tests::{RedisServer, VmdProcess};

const QUEUE: &str = "vmd.manager@0.0.1";
const STATUS_QUEUE: &str = "vmd.zbus@1.0";

async fn wait_ready(redis: &RedisServer) -> VmdStub {
    let stub = VmdStub::new(redis.broker()).with_timeout(Duration::from_millis(500));
    let t0 = Instant::now();
    while stub.status().await.is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "vmd never answered status"
        );
    }
    VmdStub::new(redis.broker()).with_timeout(Duration::from_secs(5))
}

fn request(reply_to: &str, object: ObjectId, method: &str, inputs: Vec<Vec<u8>>) -> Vec<u8> {
    codec::encode(&Request {
        id: reply_to.into(),
        inputs: inputs.into_iter().map(ByteBuf::from).collect(),
        object,
        reply_to: reply_to.into(),
        method: method.into(),
    })
    .unwrap()
}

fn manager() -> ObjectId {
    ObjectId::new("manager", "0.0.1")
}

/// Deterministic garbage (xorshift), so a failure can be reproduced.
fn garbage(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_payloads_are_answered_or_dropped_and_vmd_keeps_serving() {
    let redis = RedisServer::start();
    let mut vmd = VmdProcess::start(&redis, &[]);
    let stub = wait_ready(&redis).await;
    let mut conn = redis.broker().connect().await.unwrap();

    // No reply address can be found in these: logged and dropped.
    let undecodable: Vec<Vec<u8>> = vec![
        b"not msgpack at all".to_vec(),
        vec![0x2a],
        vec![0xc1],
        vec![0xdd, 0xff, 0xff, 0xff, 0xff],
        vec![0xdf, 0xff, 0xff, 0xff, 0xff],
        vec![0xc6, 0xff, 0xff, 0xff, 0xff, 0x00],
        [vec![0x91; 100_000], vec![0xc0]].concat(),
        request(
            "lost",
            manager(),
            "Exists",
            vec![codec::encode("a").unwrap()],
        )[..60]
            .to_vec(),
        garbage(16 << 20, 0x9e37_79b9_7f4a_7c15),
        Vec::new(),
    ];
    for p in &undecodable {
        let _: () = conn.rpush(QUEUE, p).await.unwrap();
        let _: () = conn.rpush(STATUS_QUEUE, p).await.unwrap();
    }

    // Malformed but with a reply address: answered with a protocol error.
    let mut envelope_with_bad_inputs = Vec::new();
    rmp::encode::write_map_len(&mut envelope_with_bad_inputs, 3).unwrap();
    for (k, v) in [("ID", "bad-0"), ("ReplyTo", "bad-0"), ("Inputs", "oops")] {
        rmp::encode::write_str(&mut envelope_with_bad_inputs, k).unwrap();
        rmp::encode::write_str(&mut envelope_with_bad_inputs, v).unwrap();
    }
    let mut vm_with_string_cpu = Vec::new();
    rmp::encode::write_map_len(&mut vm_with_string_cpu, 2).unwrap();
    for (k, v) in [("Name", "x"), ("CPU", "four")] {
        rmp::encode::write_str(&mut vm_with_string_cpu, k).unwrap();
        rmp::encode::write_str(&mut vm_with_string_cpu, v).unwrap();
    }
    let s = |v: &str| codec::encode(v).unwrap();
    let answered: Vec<(&str, Vec<u8>, &str)> = vec![
        ("bad-0", envelope_with_bad_inputs, "invalid request"),
        (
            "bad-1",
            request("bad-1", manager(), "Exists", vec![s("a"), s("b")]),
            "invalid number of arguments expecting 1 got 2",
        ),
        (
            "bad-2",
            request(
                "bad-2",
                manager(),
                "Exists",
                vec![codec::encode(&42u8).unwrap()],
            ),
            "invalid argument type [0] expecting string got",
        ),
        (
            "bad-3",
            request("bad-3", manager(), "Frobnicate", vec![]),
            "not a function",
        ),
        (
            "bad-4",
            request(
                "bad-4",
                ObjectId::new("nope", "1.0"),
                "Exists",
                vec![s("a")],
            ),
            "unknown object",
        ),
        (
            "bad-5",
            request("bad-5", manager(), "Run", vec![garbage(4096, 7)]),
            "invalid argument type [0] expecting pkg.VM got",
        ),
        (
            "bad-6",
            request("bad-6", manager(), "Run", vec![vm_with_string_cpu]),
            "invalid argument type [0] expecting pkg.VM got",
        ),
        (
            "bad-7",
            request("bad-7", manager(), "Lock", vec![s("a"), s("yes")]),
            "invalid argument type [1] expecting bool got",
        ),
        (
            "bad-8",
            request("bad-8", manager(), "List", vec![s("extra")]),
            "invalid number of arguments expecting 0 got 1",
        ),
    ];
    for (_, payload, _) in &answered {
        let _: () = conn.rpush(QUEUE, payload).await.unwrap();
    }
    for (reply_to, _, want) in &answered {
        let got: Option<(String, Vec<u8>)> = conn.blpop(reply_to, 10.0).await.unwrap();
        let (_, bytes) = got.unwrap_or_else(|| panic!("no reply on {reply_to}"));
        let resp: Response = codec::decode(&bytes).unwrap();
        let err = resp.error.unwrap_or_default();
        assert!(
            err.starts_with(want),
            "{reply_to}: got {err:?}, want {want:?}"
        );
        assert_eq!(resp.output.data, None);
    }

    // A status request pushed on the object queue is still a status request
    // (Go dispatches on the Object inside the payload).
    let _: () = conn
        .rpush(QUEUE, request("st-1", ObjectId::status(), "", vec![]))
        .await
        .unwrap();
    let (_, bytes): (String, Vec<u8>) = conn.blpop("st-1", 10.0).await.unwrap();
    let resp: Response = codec::decode(&bytes).unwrap();
    assert_eq!(resp.error, None);

    // Replies expire like Go's (300 s), so abandoned ones do not pile up.
    let _: () = conn
        .rpush(QUEUE, request("ttl-1", manager(), "List", vec![]))
        .await
        .unwrap();
    let t0 = Instant::now();
    let ttl = loop {
        let ttl: i64 = conn.ttl("ttl-1").await.unwrap();
        if ttl > 0 {
            break ttl;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "no reply on ttl-1");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(ttl <= 300 && ttl > 290, "reply TTL {ttl}");

    // Every queued payload was consumed, and vmd still serves normally.
    let t0 = Instant::now();
    loop {
        let q: i64 = conn.llen(QUEUE).await.unwrap();
        let s: i64 = conn.llen(STATUS_QUEUE).await.unwrap();
        if q == 0 && s == 0 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "queues not drained");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!stub.exists("a").await.unwrap());
    assert_eq!(stub.list().await.unwrap(), Vec::<String>::new());
    assert!(vmd.exited().is_none(), "vmd died");
    let log = vmd.stderr();
    assert!(!log.contains("panicked"), "vmd panicked:\n{log}");
    assert!(
        log.contains("dropping a payload that is not a zbus request"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_cli_and_clean_shutdown() {
    let redis = RedisServer::start();
    let mut vmd = VmdProcess::start(&redis, &["--max-changes", "3"]);
    wait_ready(&redis).await;

    let (code, out, _) = vmd.ctl(&["list", "--json"]);
    assert_eq!((code, out.trim()), (0, "[]"));
    let (code, out, _) = vmd.ctl(&["status"]);
    assert_eq!(code, 0);
    assert!(out.contains("objects: manager@0.0.1"), "{out}");
    // Idle: no call running, room for more.
    assert_eq!(out.matches(" free ").count(), 1, "{out}");
    assert_eq!(out.matches(" busy ").count(), 0, "{out}");
    let (code, out, _) = vmd.ctl(&["--object", "vmd", "exists", "web"]);
    assert_eq!((code, out.trim()), (1, "false"));
    // A failing method is a clear method error, never a protocol one.
    let (code, _, err) = vmd.ctl(&["inspect", "web"]);
    assert_eq!(code, 1);
    assert!(err.contains("machine 'web' does not exist"), "{err}");

    let t0 = Instant::now();
    vmd.signal(libc::SIGTERM);
    let status = vmd
        .wait_exit(Duration::from_secs(5))
        .expect("vmd ignored SIGTERM");
    assert!(status.success(), "{status:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "shutdown took {:?}",
        t0.elapsed()
    );
    assert!(vmd.stderr().contains("vmd stopped"));
}

#[test]
fn bad_flags_are_refused_with_a_clear_message() {
    let out = std::process::Command::new(vmd_tests::bin("vmd"))
        .args(["--broker", "http://nope"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unsupported scheme"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_zinit_fails_calls_clearly_and_leaves_nothing() {
    let redis = RedisServer::start();
    // Its zinit socket leads nowhere.
    let vmd = VmdProcess::start(&redis, &[]);
    let stub = wait_ready(&redis).await;
    let kernel = vmd.dir.path().join("vmlinux");
    std::fs::write(&kernel, "x").unwrap();
    let vm = vmd::api::Vm {
        name: "orphan".into(),
        cpu: 1,
        memory: 256 << 20,
        kernel_image: kernel.to_string_lossy().into_owned(),
        ..Default::default()
    };
    let err = stub.run(&vm).await.unwrap_err().to_string();
    assert!(err.contains("zinit"), "{err}");
    assert!(!stub.exists("orphan").await.unwrap());
    assert!(stub.list().await.unwrap().is_empty());
    let vms = vmd.runtime().join("vms");
    assert!(
        std::fs::read_dir(&vms).map_or(true, |mut d| d.next().is_none()),
        "files of the failed Run left in {}",
        vms.display()
    );
    let services = vmd.dir.path().join("zinit");
    assert!(
        std::fs::read_dir(&services).map_or(true, |mut d| d.next().is_none()),
        "service file of the failed Run left"
    );
    // Reads and a Delete of what never existed still answer.
    assert_eq!(stub.logs("orphan").await.unwrap(), "no logs available");
    stub.delete("orphan").await.unwrap();
    assert!(!vmd.stderr().contains("panicked"));
    eprintln!("Run with zinit down: {err}");
}
