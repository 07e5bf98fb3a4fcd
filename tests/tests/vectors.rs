//! The Go vectors of `shared/vectors/`: every message decodes into our types,
//! every request dispatches to the right method with the right arguments, and
//! every reply the Go server sent is produced byte for byte by vmd's own
//! dispatch path (`ModuleService::call` → `Response::from_call` → encode).

use std::net::IpAddr;
use std::sync::Arc;

use serde_bytes::ByteBuf;
use vmd::api::{MachineMetrics, Vm, VmEvent, VmInfo};
use vmd::module::ModuleService;
use vmd::zbus::codec::{self, GoTime};
use vmd::zbus::server::status_reply;
use vmd::zbus::wire::{ObjectId, Request, Response, Status, WorkerState, WorkerStatus};
use vmd_tests::fixture::Fixture;
use vmd_tests::{hex, vectors};

const ID: &str = "0b8e5c3a-6a5f-4a7e-9c55-1f2e3d4c5b6a";

fn vector(name: &str) -> Vec<u8> {
    vectors()
        .remove(name)
        .unwrap_or_else(|| panic!("no vector {name}"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Runs a request through the dispatch path and encodes the reply.
async fn reply(fixture: Fixture, method: &str, inputs: Vec<Vec<u8>>) -> Vec<u8> {
    let svc = ModuleService(Arc::new(fixture));
    let inputs = inputs.into_iter().map(ByteBuf::from).collect();
    let result = svc.call(method.to_owned(), inputs).await;
    codec::encode(&Response::from_call(ID, result)).unwrap()
}

fn arg<T: serde::Serialize + ?Sized>(v: &T) -> Vec<u8> {
    codec::encode(v).unwrap()
}

fn assert_bytes(name: &str, ours: &[u8]) {
    let go = vector(name);
    assert_eq!(hex(ours), hex(&go), "{name}: our bytes differ from Go's");
}

#[test]
fn every_vector_decodes() {
    let all = vectors();
    assert_eq!(all.len(), 53, "vectors.txt holds 53 messages");
    for (name, bytes) in &all {
        let ok = if name.starts_with("req_") {
            codec::decode::<Request>(bytes).map(|_| ())
        } else if name.starts_with("resp_") {
            codec::decode::<Response>(bytes).map(|_| ())
        } else if name.starts_with("arg_vm") {
            codec::decode::<Vm>(bytes).map(|_| ())
        } else if name == "data_metrics" {
            codec::decode::<MachineMetrics>(bytes).map(|_| ())
        } else if name == "data_vminfo" {
            codec::decode::<VmInfo>(bytes).map(|_| ())
        } else if name.starts_with("event_") {
            codec::decode::<VmEvent>(bytes).map(|_| ())
        } else {
            panic!("unknown vector {name}");
        };
        ok.unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[tokio::test]
async fn requests_dispatch_with_their_arguments() {
    let cases = [
        ("req_exists", "Exists(1-2-vm)"),
        ("req_list", "List()"),
        ("req_run", "Run(11-22-vm)"),
        ("req_run_full", "Run(7-42-web)"),
        (
            "req_stream_create",
            "StreamCreate(11-22-vm, 11-22-logs, n-NetID, ws://10.20.2.7:8883/logs)",
        ),
        (
            "req_stream_create_vm",
            "StreamCreate(vm, vm-stream-1, n-6nYQVSMdPtJVCMX, redis://10.20.2.7:6379/logs)",
        ),
        ("req_delete", "Delete(1-2-vm)"),
        ("req_lock", "Lock(1-2-vm, true)"),
        ("req_metrics", "Metrics()"),
        ("req_logsfull", "LogsFull(1-2-vm)"),
    ];
    for (name, want) in cases {
        let req: Request = codec::decode(&vector(name)).unwrap();
        assert_eq!(req.id, ID, "{name}");
        assert_eq!(req.reply_to, ID, "{name}");
        assert_eq!(req.object, ObjectId::new("manager", "0.0.1"), "{name}");
        let fixture = Arc::new(Fixture::with_vms(&["1-2-vm"]));
        let svc = ModuleService(fixture.clone());
        let out = svc.call(req.method.clone(), req.inputs).await;
        assert!(out.is_ok(), "{name}: protocol error {out:?}");
        assert_eq!(
            *fixture.calls.lock().unwrap(),
            vec![want.to_owned()],
            "{name}"
        );
    }
    let status: Request = codec::decode(&vector("req_status")).unwrap();
    assert_eq!(status.object, ObjectId::status());
    assert_eq!(status.method, "");
    assert!(status.inputs.is_empty());
}

#[test]
fn arg_vm_decodes_field_by_field() {
    let vm: Vm = codec::decode(&vector("arg_vm")).unwrap();
    assert_eq!(vm.name, "11-22-vm");
    assert_eq!(vm.cpu, 2);
    assert_eq!(vm.memory, 2 << 30);
    assert_eq!(vm.kernel_image, "/path/kernel");
    assert_eq!(vm.initrd_image, "");
    assert!(vm.kernel_args.is_empty());
    assert_eq!(vm.entrypoint, "/sbin/zinit init");
    assert!(vm.disks.is_empty() && vm.shared.is_empty() && vm.devices.is_empty());
    assert_eq!((vm.boot.kind, vm.boot.path.as_str()), (1, "/mnt/rootfs"));
    assert_eq!(vm.environment["SSH_KEY"], "ssh-ed25519 AAAA");
    assert!(!vm.no_keep_alive);
    assert_eq!(vm.hostname, "vm");
    let nic = &vm.network.ifaces[0];
    assert_eq!(vm.network.ifaces.len(), 1);
    assert_eq!(
        (nic.tap.as_str(), nic.mac.as_str()),
        ("t-abcdefgh", "aa:bb:cc:dd:ee:ff")
    );
    assert_eq!(nic.ips[0].ip.addr(), Some(ip("10.20.2.5")));
    assert_eq!(nic.ips[0].mask.addr(), Some(ip("255.255.255.0")));
    assert_eq!(nic.routes[0].net.ip.addr(), Some(ip("10.20.0.0")));
    assert_eq!(nic.routes[0].gateway.addr(), Some(ip("10.20.2.1")));
    assert_eq!(nic.ip4_default_gateway.addr(), Some(ip("10.20.2.1")));
    assert!(nic.ip6_default_gateway.is_nil());
    assert_eq!(nic.net_id, "NetIDbase58");
    // net.ParseIP gives the 16-byte ::ffff: form; it reads as IPv4.
    assert_eq!(vm.network.nameservers[0].0.len(), 16);
    assert_eq!(vm.network.nameservers[0].addr(), Some(ip("8.8.8.8")));
}

#[test]
fn arg_vm_full_decodes_field_by_field() {
    let vm: Vm = codec::decode(&vector("arg_vm_full")).unwrap();
    assert_eq!(
        (vm.name.as_str(), vm.cpu, vm.memory),
        ("7-42-web", 4, 4 << 30)
    );
    assert_eq!(
        vm.kernel_args.get("root").map(String::as_str),
        Some("/dev/vda")
    );
    assert_eq!(vm.kernel_args.get("rw").map(String::as_str), Some(""));
    assert_eq!(vm.disks.len(), 2);
    assert_eq!(vm.disks[1].path, "/mnt/vdisks/7-42-disk2");
    assert_eq!(vm.disks[1].target, "/var/lib");
    assert_eq!(vm.shared[0].id, "7-42-qsfs");
    assert_eq!(vm.shared[0].target, "/qsfs");
    assert_eq!(
        (vm.boot.kind, vm.boot.path.as_str()),
        (0, "/mnt/vdisks/7-42-root")
    );
    assert_eq!(vm.environment["ZOS"], "1");
    assert_eq!(vm.devices, vec!["0000:01:00.0".to_owned()]);
    let [private, public] = &vm.network.ifaces[..] else {
        panic!("two interfaces expected")
    };
    assert_eq!(private.tap, "b-abcdefgh1234");
    assert_eq!(private.ips[1].ip.addr(), Some(ip("fd00:1:2:3::5")));
    assert_eq!(private.routes[1].net.ip.addr(), Some(ip("100.64.0.0")));
    assert!(private.ip4_default_gateway.is_nil());
    assert!(public.public_ipv4 && public.public_ipv6);
    assert!(public.routes.is_empty());
    assert_eq!(public.ip4_default_gateway.addr(), Some(ip("185.69.166.1")));
    assert_eq!(
        public.ip6_default_gateway.addr(),
        Some(ip("2a02:1802:5e::1"))
    );
    let ns: Vec<_> = vm
        .network
        .nameservers
        .iter()
        .map(|n| n.addr().unwrap())
        .collect();
    assert_eq!(
        ns,
        [ip("8.8.8.8"), ip("1.1.1.1"), ip("2001:4860:4860::8888")]
    );
}

#[test]
fn vm_survives_our_encoding() {
    // Our encoding of a VM is read back as the same VM (what a Go server
    // decoding our client's requests relies on: same keys, same types).
    for name in ["arg_vm", "arg_vm_full"] {
        let vm: Vm = codec::decode(&vector(name)).unwrap();
        let again: Vm = codec::decode(&codec::encode(&vm).unwrap()).unwrap();
        assert_eq!(vm, again, "{name}");
    }
}

#[test]
fn data_vectors_are_reproduced() {
    let m: MachineMetrics = codec::decode(&vector("data_metrics")).unwrap();
    assert_eq!(m["11-22-vm"].public.net_tx_bytes, 4);
    assert_bytes("data_metrics", &codec::encode(&m).unwrap());
    let info: VmInfo = codec::decode(&vector("data_vminfo")).unwrap();
    assert_eq!((info.memory, info.cpu), (2048, 2));
    assert_bytes("data_vminfo", &codec::encode(&info).unwrap());
}

#[tokio::test]
async fn replies_are_byte_equal_to_go() {
    let vm: Vm = codec::decode(&vector("arg_vm")).unwrap();
    let boom = Vm {
        name: "boom".into(),
        ..vm.clone()
    };
    let one = || Fixture::with_vms(&["1-2-vm"]);
    let two = || Fixture::with_vms(&["1-2-vm", "3-4-vm"]);
    let cases: Vec<(&str, Fixture, &str, Vec<Vec<u8>>)> = vec![
        ("resp_exists_true", one(), "Exists", vec![arg("1-2-vm")]),
        ("resp_exists_false", one(), "Exists", vec![arg("3-4-vm")]),
        ("resp_error_only_ok", one(), "Delete", vec![arg("1-2-vm")]),
        ("resp_error_only_err", one(), "Delete", vec![arg("x")]),
        ("resp_run_ok", one(), "Run", vec![arg(&vm)]),
        ("resp_run_err", one(), "Run", vec![arg(&boom)]),
        ("resp_proto_err", one(), "Reboot", vec![]),
        ("resp_inspect", one(), "Inspect", vec![arg("1-2-vm")]),
        ("resp_inspect_err", one(), "Inspect", vec![arg("x")]),
        ("resp_lock_err", one(), "Lock", vec![arg("x"), arg(&true)]),
        ("resp_logs", one(), "Logs", vec![arg("1-2-vm")]),
        ("resp_list_two", two(), "List", vec![]),
        ("resp_list_empty", Fixture::default(), "List", vec![]),
        ("resp_bad_argc", one(), "Exists", vec![]),
        ("resp_bad_argtype", one(), "Exists", vec![arg(&42u8)]),
        ("resp_metrics_two", one(), "Metrics", vec![]),
    ];
    for (name, fixture, method, inputs) in cases {
        let ours = reply(fixture, method, inputs).await;
        assert_bytes(name, &ours);
    }
}

#[test]
fn list_nil_reads_as_empty() {
    // Go sends c0 for a nil slice; vmd never does (it sends 90), but as a
    // client it must read both as "no VMs".
    for name in ["resp_list_nil", "resp_list_empty"] {
        let resp: Response = codec::decode(&vector(name)).unwrap();
        let names: Vec<String> = codec::decode::<Option<Vec<String>>>(&resp.output.data.unwrap())
            .unwrap()
            .unwrap_or_default();
        assert!(names.is_empty(), "{name}");
    }
}

#[test]
fn status_replies_are_byte_equal_to_go() {
    let st = Status {
        objects: vec![ObjectId::new("manager", "0.0.1")],
        workers: vec![WorkerStatus {
            state: WorkerState::Free,
            start_time: GoTime {
                secs: 1_704_067_200,
                nanos: 0,
            },
            action: String::new(),
        }],
    };
    assert_bytes(
        "resp_status",
        &codec::encode(&status_reply(ID, &st)).unwrap(),
    );

    // Three workers: 64-bit time with nanoseconds, busy, Go's zero time.
    let resp: Response = codec::decode(&vector("resp_status_3workers")).unwrap();
    let go: Status = codec::decode(&resp.output.data.unwrap()).unwrap();
    assert_eq!(go.workers.len(), 3);
    assert_eq!(go.workers[0].start_time.nanos, 123_456_789);
    assert_eq!(go.workers[1].state, WorkerState::Busy);
    assert_eq!(go.workers[1].action, "[manager@0.0.1].Run()");
    assert_eq!(go.workers[2].start_time, GoTime::ZERO);
    assert_bytes(
        "resp_status_3workers",
        &codec::encode(&status_reply(ID, &go)).unwrap(),
    );
}

#[test]
fn requests_we_send_are_byte_equal_to_go() {
    // The client encodes a borrowed request; it must be Go's bytes exactly.
    let all = vectors();
    let mut n = 0;
    for (name, bytes) in all.iter().filter(|(n, _)| n.starts_with("req_")) {
        let req: Request = codec::decode(bytes).unwrap();
        let ours = codec::encode(&vmd::zbus::wire::RequestRef {
            id: &req.id,
            inputs: &req.inputs,
            object: &req.object,
            reply_to: &req.reply_to,
            method: &req.method,
        })
        .unwrap();
        assert_bytes(name, &ours);
        n += 1;
    }
    assert!(n >= 10, "only {n} request vectors");
}

/// The network module double answers as the Go server did, byte for byte,
/// and vmd's client reads those replies as the Go stub does.
#[test]
fn the_network_module_double_and_client_match_go() {
    use std::net::Ipv4Addr;
    use vmd::api::IpNet;
    use vmd::zbus::client::{value, ClientError};
    use vmd_tests::network_double::{answer, Subnets};

    let mut subnets = Subnets::default();
    subnets
        .nets
        .insert("zosnet1".into(), (Ipv4Addr::new(10, 20, 2, 0), 24));
    let req_ns = vector("req_net_namespace");
    let req_sub = vector("req_net_getsubnet");
    assert_bytes("resp_net_namespace", &answer(&subnets, &req_ns).unwrap());
    assert_bytes("resp_net_getsubnet", &answer(&subnets, &req_sub).unwrap());
    subnets.ip16 = true;
    assert_bytes(
        "resp_net_getsubnet_ip16",
        &answer(&subnets, &req_sub).unwrap(),
    );
    let unknown = Subnets::default();
    assert_bytes(
        "resp_net_getsubnet_err",
        &answer(&unknown, &req_sub).unwrap(),
    );

    // The client side, on the Go server's own replies.
    let out = |name: &str| codec::decode::<Response>(&vector(name)).unwrap().output;
    let ns: String = value(out("resp_net_namespace")).unwrap();
    assert_eq!(ns, "n-zosnet1");
    for name in ["resp_net_getsubnet", "resp_net_getsubnet_ip16"] {
        let net: IpNet = value(out(name)).unwrap();
        assert_eq!(
            vmd::network::console_address(&net),
            Some(Ipv4Addr::new(10, 20, 2, 1)),
            "{name}"
        );
    }
    match value::<IpNet>(out("resp_net_getsubnet_err")) {
        Err(ClientError::Method(m)) => assert_eq!(m, "network not found"),
        other => panic!("{other:?}"),
    }
}

/// The event as a Go zbus server publishes `VMEvent{Name: "vm1", Event:
/// "booted", Seq: 7, At: 1764800000}`: vmd's encoding is byte-equal (no
/// reason: omitted, as Go's `omitempty` does), and decodes back.
#[test]
fn events_are_byte_equal_to_the_go_publisher() {
    let go = vector("event_vm_booted");
    let ours = VmEvent {
        name: "vm1".into(),
        event: "booted".into(),
        seq: 7,
        at: 1_764_800_000,
        reason: String::new(),
    };
    assert_bytes("event_vm_booted", &codec::encode(&ours).unwrap());
    assert_eq!(codec::decode::<VmEvent>(&go).unwrap(), ours);
    // With a reason: one more key, which a Go subscriber with the four-field
    // type skips and one with `Reason` reads.
    let crashed = VmEvent {
        event: "crashed".into(),
        reason: "signal 9 (SIGKILL)".into(),
        ..ours
    };
    let bytes = codec::encode(&crashed).unwrap();
    assert_eq!(bytes[0], 0x85, "a map of five keys");
    assert_eq!(codec::decode::<VmEvent>(&bytes).unwrap(), crashed);
}

/// vmd's provisiond client sends what the Go `ProvisionStub` sends, byte for
/// byte; the provisiond double answers as the Go server did; and the client
/// reads the Go server's own replies as the Go stub does — except that
/// "not a function" is a remembered lack, not a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_provisiond_client_and_double_match_go() {
    use std::time::Duration;
    use vmd::provision::{Call, Provision, ProvisionError, WorkloadId, WorkloadStatus};
    use vmd::zbus::client::encode_request;
    use vmd_tests::provision_double::{answer, Workloads};

    let object = ObjectId::new("provision", "0.0.1");
    let request =
        |call: Call| encode_request(ID, &object, call.method(), call.inputs().unwrap()).unwrap();
    let wid = |s: &str| WorkloadId::of_vm(s).unwrap();
    let vm1 = wid("12-345-vm1");
    assert_bytes("req_prov_status", &request(Call::Status(&vm1)));
    assert_bytes(
        "req_prov_decommission",
        &request(Call::Decommission(
            &vm1,
            "deleting vm due to so many crashes",
        )),
    );
    assert_bytes(
        "req_prov_set_error",
        &request(Call::SetError(&vm1, "vm detected as down")),
    );
    assert_bytes("req_prov_set_ok", &request(Call::SetOk(&vm1)));

    // The double, on requests for the ids the Go server was asked about.
    let mut w = Workloads::default();
    w.states.insert("12-345-vm1".into(), "ok".into());
    w.states.insert("12-345-vm2".into(), "deleted".into());
    let raw_status = |id: &str| {
        encode_request(
            ID,
            &object,
            "GetWorkloadStatus",
            vec![codec::encode(&id).unwrap()],
        )
        .unwrap()
    };
    let ans = |w: &mut Workloads, req: &[u8]| answer(w, req).unwrap().0;
    assert_bytes(
        "resp_prov_status_ok",
        &ans(&mut w, &vector("req_prov_status")),
    );
    assert_bytes(
        "resp_prov_status_deleted",
        &ans(&mut w, &raw_status("12-345-vm2")),
    );
    assert_bytes(
        "resp_prov_status_missing",
        &ans(&mut w, &raw_status("12-345-vm3")),
    );
    assert_bytes("resp_prov_status_err", &ans(&mut w, &raw_status("vm1")));
    assert_bytes(
        "resp_prov_unknown_method",
        &ans(&mut w, &vector("req_prov_set_error")),
    );
    assert_bytes(
        "resp_prov_decommission_ok",
        &ans(&mut w, &vector("req_prov_decommission")),
    );
    let gone = request(Call::Decommission(&wid("12-999-vm1"), "x"));
    assert_bytes("resp_prov_decommission_err", &ans(&mut w, &gone));
    w.pr96 = true;
    assert_bytes(
        "resp_prov_set_ok_ok",
        &ans(&mut w, &vector("req_prov_set_ok")),
    );

    // The client, answered with the Go server's bytes through a real Redis.
    let redis = vmd_tests::RedisServer::start();
    let replies: std::sync::Arc<std::sync::Mutex<Vec<&'static str>>> = Default::default();
    let server = {
        let broker = redis.broker();
        let replies = replies.clone();
        tokio::spawn(async move {
            let mut c = broker.connect().await.unwrap();
            loop {
                let (_, bytes): (String, Vec<u8>) = redis::cmd("BLPOP")
                    .arg("provision.provision@0.0.1")
                    .arg(0)
                    .query_async(&mut c)
                    .await
                    .unwrap();
                let req: Request = codec::decode(&bytes).unwrap();
                let name = replies.lock().unwrap().remove(0);
                let _: () = redis::cmd("RPUSH")
                    .arg(&req.reply_to)
                    .arg(vector(name))
                    .query_async(&mut c)
                    .await
                    .unwrap();
            }
        })
    };
    let p = Provision::new(
        redis.broker(),
        "provision",
        Duration::from_secs(5),
        Default::default(),
    );
    let next = |name: &'static str| replies.lock().unwrap().push(name);
    let status = |state: &str, exists| WorkloadStatus {
        state: state.into(),
        exists,
    };
    next("resp_prov_status_ok");
    assert_eq!(p.workload_status(&vm1).await.unwrap(), status("ok", true));
    next("resp_prov_status_deleted");
    assert!(p.workload_status(&vm1).await.unwrap().gone());
    next("resp_prov_status_missing");
    assert_eq!(p.workload_status(&vm1).await.unwrap(), status("", false));
    next("resp_prov_status_err");
    match p.workload_status(&vm1).await {
        Err(ProvisionError::Failed(m)) => assert_eq!(m, "expected integer"),
        other => panic!("{other:?}"),
    }
    next("resp_prov_decommission_ok");
    p.decommission(&vm1, "r").await.unwrap();
    next("resp_prov_decommission_err");
    let e = p.decommission(&vm1, "r").await.unwrap_err();
    assert!(e.deployment_gone(), "{e}");
    next("resp_prov_set_ok_ok");
    p.set_ok(&vm1).await.unwrap();
    assert!(!p.lacks_set_methods());
    next("resp_prov_unknown_method");
    assert!(matches!(
        p.set_error(&vm1, "m").await,
        Err(ProvisionError::Lacks("SetWorkloadError"))
    ));
    // Remembered: the next optional call is not even sent (no reply queued).
    assert!(p.lacks_set_methods());
    assert!(matches!(
        p.set_ok(&vm1).await,
        Err(ProvisionError::Lacks("SetWorkloadOk"))
    ));
    assert!(replies.lock().unwrap().is_empty());
    server.abort();
}
