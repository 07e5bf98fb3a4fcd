//! Property tests of request decoding and dispatch (no Redis: the real
//! codec and the real `ModuleService` dispatch in-process, with a module
//! whose answers are derived from its arguments).
//!
//! * any bytes: decoding a request or a response never panics;
//! * any call (known or unknown method, any number of arguments, each valid
//!   or garbage): the reply encodes and decodes back unchanged, and is one a
//!   Go stub takes without panicking — a well-formed call to a known method
//!   is never answered with a protocol error, a protocol error carries no
//!   Data, a value-returning method always has a decodable Data (`Exists`
//!   exactly `c2`/`c3`), an error-only method has none;
//! * any VM (hostile strings, unicode, big numbers) survives the round trip
//!   from the encoder through dispatch to the method unchanged.
//!
//! `PROPTEST_CASES` raises the number of cases (default 512 per property).

use std::sync::Arc;

use proptest::prelude::*;
use serde_bytes::ByteBuf;
use vmd::api::{MachineInfo, MachineMetrics, Stream, Vm, VmDisk, VmInfo};
use vmd::module::{MethodError, MethodResult, ModuleService, VmModule, METHODS};
use vmd::zbus::codec;
use vmd::zbus::wire::{Request, Response};

/// Answers derived from the arguments, errors and a panic on some of them.
struct Echo;

fn summary(vm: &Vm) -> String {
    format!(
        "{}|{}|{}|{:?}|{:?}|{}",
        vm.name,
        vm.cpu,
        vm.memory,
        vm.kernel_args,
        vm.disks.iter().map(|d| &d.path).collect::<Vec<_>>(),
        vm.entrypoint
    )
}

impl VmModule for Echo {
    async fn run(&self, vm: Vm) -> MethodResult<MachineInfo> {
        if vm.name == "boom" {
            panic!("a method panics");
        }
        if vm.cpu == 0 {
            return Err(MethodError::new(format!("no cpu for {}", vm.name)));
        }
        Ok(MachineInfo {
            console_url: summary(&vm),
        })
    }
    async fn inspect(&self, name: String) -> MethodResult<VmInfo> {
        if name.len().is_multiple_of(3) {
            return Err(MethodError::new(format!("machine '{name}' does not exist")));
        }
        Ok(VmInfo {
            cpu: name.len() as _,
            ..Default::default()
        })
    }
    async fn delete(&self, name: String) -> MethodResult<()> {
        if name.is_empty() {
            return Err(MethodError::new("empty"));
        }
        Ok(())
    }
    async fn exists(&self, name: String) -> bool {
        if name == "boom" {
            panic!("a bool method panics");
        }
        name.len().is_multiple_of(2)
    }
    async fn logs(&self, name: String) -> MethodResult<String> {
        Ok(name)
    }
    async fn logs_full(&self, name: String) -> MethodResult<String> {
        if name.is_empty() {
            return Err(MethodError::new("no logs"));
        }
        Ok(name.repeat(2))
    }
    async fn list(&self) -> MethodResult<Vec<String>> {
        Ok(vec!["a".into(), "b".into()])
    }
    async fn metrics(&self) -> MethodResult<MachineMetrics> {
        Ok(MachineMetrics::new())
    }
    async fn usage(&self) -> MethodResult<MachineMetrics> {
        Ok(MachineMetrics::new())
    }
    async fn lock(&self, name: String, lock: bool) -> MethodResult<()> {
        if lock && name.is_empty() {
            return Err(MethodError::new("nothing to lock"));
        }
        Ok(())
    }
    async fn stream_create(&self, name: String, stream: Stream) -> MethodResult<()> {
        if stream.id != name {
            return Err(MethodError::new("id differs"));
        }
        Ok(())
    }
    async fn stream_delete(&self, id: String) -> MethodResult<()> {
        if !id.len().is_multiple_of(2) {
            return Err(MethodError::new("odd"));
        }
        Ok(())
    }
}

/// What a method takes, by position, for telling well-formed calls apart.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Arg {
    Str,
    Bool,
    Vm,
    Stream,
}

fn signature(method: &str) -> Option<&'static [Arg]> {
    Some(match method {
        "Run" => &[Arg::Vm],
        "Inspect" | "Delete" | "Exists" | "Logs" | "LogsFull" | "StreamDelete" => &[Arg::Str],
        "List" | "Metrics" | "Usage" => &[],
        "Lock" => &[Arg::Str, Arg::Bool],
        "StreamCreate" => &[Arg::Str, Arg::Stream],
        _ => return None,
    })
}

/// Whether `bytes` decode as what the Go side would send for `arg`.
fn decodes_as(arg: Arg, bytes: &[u8]) -> bool {
    match arg {
        Arg::Str => codec::decode::<String>(bytes).is_ok(),
        Arg::Bool => codec::decode::<bool>(bytes).is_ok(),
        Arg::Vm => codec::decode::<Vm>(bytes).is_ok(),
        Arg::Stream => codec::decode::<Stream>(bytes).is_ok(),
    }
}

fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9-]{0,12}",
        Just("../x".to_owned()),
        Just("a b".to_owned()),
        Just("a\"b".to_owned()),
        Just("line\nbreak".to_owned()),
        Just("boom".to_owned()),
        any::<String>(),
    ]
}

fn vm_strategy() -> impl Strategy<Value = Vm> {
    (
        hostile_string(),
        any::<u8>(),
        any::<u64>(),
        proptest::collection::btree_map(hostile_string(), hostile_string(), 0..4),
        proptest::collection::vec(hostile_string(), 0..3),
        hostile_string(),
    )
        .prop_map(|(name, cpu, memory, kernel_args, disks, entrypoint)| Vm {
            name,
            cpu,
            memory,
            kernel_args,
            disks: disks
                .into_iter()
                .map(|path| VmDisk {
                    path,
                    ..Default::default()
                })
                .collect(),
            entrypoint,
            ..Default::default()
        })
}

/// One argument: a valid encoding of some type, or garbage.
fn input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        hostile_string().prop_map(|s| codec::encode(&s).unwrap()),
        any::<bool>().prop_map(|b| codec::encode(&b).unwrap()),
        vm_strategy().prop_map(|v| codec::encode(&v).unwrap()),
        (hostile_string(), hostile_string(), hostile_string()).prop_map(
            |(id, namespace, output)| {
                codec::encode(&Stream {
                    id,
                    namespace,
                    output,
                })
                .unwrap()
            }
        ),
        any::<i64>().prop_map(|n| codec::encode(&n).unwrap()),
        Just(vec![0xc0]),
        proptest::collection::vec(any::<u8>(), 0..64),
    ]
}

fn method() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(METHODS.to_vec()).prop_map(str::to_owned),
        Just("run".to_owned()),
        Just("Nope".to_owned()),
        Just(String::new()),
        any::<String>(),
    ]
}

fn valid(arg: Arg) -> BoxedStrategy<Vec<u8>> {
    match arg {
        Arg::Str => hostile_string()
            .prop_map(|s| codec::encode(&s).unwrap())
            .boxed(),
        Arg::Bool => any::<bool>()
            .prop_map(|b| codec::encode(&b).unwrap())
            .boxed(),
        Arg::Vm => vm_strategy()
            .prop_map(|v| codec::encode(&v).unwrap())
            .boxed(),
        Arg::Stream => (hostile_string(), hostile_string(), hostile_string())
            .prop_map(|(id, namespace, output)| {
                codec::encode(&Stream {
                    id,
                    namespace,
                    output,
                })
                .unwrap()
            })
            .boxed(),
    }
}

/// A call: half well-formed for a known method, half anything.
fn call() -> impl Strategy<Value = (String, Vec<Vec<u8>>)> {
    let well_formed = proptest::sample::select(METHODS.to_vec()).prop_flat_map(|m| {
        let sig = signature(m).unwrap_or_default();
        let args: Vec<BoxedStrategy<Vec<u8>>> = sig.iter().map(|a| valid(*a)).collect();
        (Just(m.to_owned()), args)
    });
    prop_oneof![
        well_formed,
        (method(), proptest::collection::vec(input(), 0..4)),
    ]
}

/// The reply vmd would send for this call, as bytes on the wire.
fn reply(rt: &tokio::runtime::Runtime, method: &str, inputs: &[Vec<u8>]) -> Vec<u8> {
    let service = ModuleService(Arc::new(Echo));
    let inputs = inputs.iter().cloned().map(ByteBuf::from).collect();
    let result = rt.block_on(service.call(method.to_owned(), inputs));
    codec::encode(&Response::from_call("call-id", result)).expect("a reply always encodes")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(512);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn decoding_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = codec::decode::<Request>(&bytes);
        let _ = codec::decode::<Response>(&bytes);
        let _ = codec::decode::<Vm>(&bytes);
    }

    #[test]
    fn a_mutated_go_request_never_panics_the_decoder(
        seed in proptest::sample::select(
            vmd_tests::vectors().into_iter().filter(|(n, _)| n.starts_with("req_")).map(|(_, b)| b).collect::<Vec<_>>()
        ),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut b = seed;
        for (at, v) in flips {
            let i = at.index(b.len());
            b[i] = v;
        }
        b.truncate(cut.index(b.len() + 1));
        if let Ok(req) = codec::decode::<Request>(&b) {
            let inputs: Vec<Vec<u8>> = req.inputs.iter().map(|i| i.to_vec()).collect();
            let bytes = reply(&runtime(), &req.method, &inputs);
            prop_assert!(codec::decode::<Response>(&bytes).is_ok());
        }
    }

    #[test]
    fn every_call_gets_a_reply_a_go_stub_survives((method, inputs) in call()) {
        let bytes = reply(&runtime(), &method, &inputs);
        let resp: Response = codec::decode(&bytes).expect("the reply decodes");
        prop_assert_eq!(codec::encode(&resp).unwrap(), bytes.clone(), "reply does not round-trip");
        prop_assert_eq!(&resp.id, "call-id");
        let well_formed = signature(&method).is_some_and(|sig| {
            sig.len() == inputs.len() && sig.iter().zip(&inputs).all(|(a, b)| decodes_as(*a, b))
        });
        if well_formed {
            prop_assert!(resp.error.is_none(), "well-formed {} got a protocol error: {:?}", method, resp.error);
        }
        if resp.error.is_some() {
            prop_assert!(resp.output.data.is_none() && resp.output.error.is_none());
            return Ok(());
        }
        let data: Option<&[u8]> = resp.output.data.as_ref().map(|d| d.as_slice());
        match method.as_str() {
            "Exists" => prop_assert!(matches!(data, Some([0xc2]) | Some([0xc3])), "Exists data {:?}", data),
            "Run" => prop_assert!(codec::decode::<MachineInfo>(data.unwrap_or_default()).is_ok()),
            "Inspect" => prop_assert!(codec::decode::<VmInfo>(data.unwrap_or_default()).is_ok()),
            "Logs" | "LogsFull" => prop_assert!(codec::decode::<String>(data.unwrap_or_default()).is_ok()),
            "List" => prop_assert!(codec::decode::<Vec<String>>(data.unwrap_or_default()).is_ok()),
            "Metrics" | "Usage" => prop_assert!(codec::decode::<MachineMetrics>(data.unwrap_or_default()).is_ok()),
            _ => prop_assert!(data.is_none(), "{} returns only an error but got Data", method),
        }
        if let Some(e) = &resp.output.error {
            prop_assert!(!e.message.is_empty(), "an empty error message reads as success in Go");
        }
    }

    #[test]
    fn any_vm_reaches_the_method_unchanged(vm in vm_strategy()) {
        let bytes = reply(&runtime(), "Run", &[codec::encode(&vm).unwrap()]);
        let resp: Response = codec::decode(&bytes).unwrap();
        prop_assert!(resp.error.is_none());
        let info: MachineInfo = codec::decode(resp.output.data.as_ref().unwrap().as_slice()).unwrap();
        if vm.name == "boom" {
            let msg = resp.output.error.map(|e| e.message).unwrap_or_default();
            prop_assert!(msg.contains("panic"), "{}", msg);
            prop_assert_eq!(info, MachineInfo::default());
        } else if vm.cpu == 0 {
            prop_assert!(resp.output.error.is_some());
            prop_assert_eq!(info, MachineInfo::default());
        } else {
            prop_assert!(resp.output.error.is_none());
            prop_assert_eq!(info.console_url, summary(&vm));
        }
    }
}
