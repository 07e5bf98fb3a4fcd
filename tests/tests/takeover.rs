//! Taking over a live node from the Go VM module: VMs it started (the
//! cloud-hypervisor double run the way it runs cloud-hypervisor: `setsid`,
//! `argv[0]` `cloud-hypervisor`, `--serial pty`, its flags, output appended
//! to the log; its config in its tmpfs; a stand-in for its `cloud-console`
//! appending the guest's serial port to the same log; a `stream:<id>`
//! service of its own) exist for vmd once it starts, and every method works
//! on them without their guests restarting; when such a VMM dies, vmd
//! starts the VM again its own way, the console log going on.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use vmd_runtime::state::{Phase, ProcessIdentity, ShimState};
use vmd_tests::stack::Stack;
use vmd_tests::until;

const NAME: &str = "12-34-gone";
const TAP: &str = "t-go1";

/// A VMM the Go module started (on a node its parent is zinit, once the Go
/// module restarted; here the test reaps it): killed at the end whatever
/// happened.
struct GoVmm(i32, std::process::Child);

impl GoVmm {
    fn kill(&mut self) {
        let _ = self.1.kill();
        let _ = self.1.wait();
    }
}

impl Drop for GoVmm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The kernel command line the Go module would have built (the test
/// guest's own needs on an emulated KVM added with a real VMM).
fn go_cmdline() -> String {
    let mut c = "console=ttyS0 reboot=k panic=1".to_owned();
    if vmd_tests::vm::real_ch() {
        c.push_str(" clearcpuid=141,151,158,306,308,145,298,59,534 noxsave nofsgsbase");
    }
    c
}

/// A tap: a fake one in the sysfs vmd reads, which the double takes as it
/// is; a real cloud-hypervisor would create it on the host, so it gets none.
fn tap() -> Option<&'static str> {
    (!vmd_tests::vm::real_ch()).then_some(TAP)
}

fn initrd() -> Option<String> {
    std::env::var("VMD_TEST_INITRD").ok()
}

/// Starts a VM the way the Go VM module does (zosbase `vm/ch.go`).
fn start_the_go_way(env: &Stack, cidata: &Path, log: &Path) -> GoVmm {
    let api = env.api_socket(NAME);
    std::fs::create_dir_all(api.parent().unwrap()).unwrap();
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut cmd = std::process::Command::new(vmd_tests::vm::ch_binary());
    cmd.arg0("cloud-hypervisor")
        .args(["--kernel", &env.kernel()])
        .args(["--cmdline", &go_cmdline()])
        .args(["--cpus", "boot=1"])
        .args(["--memory", "size=512M,shared=on"])
        .args(["--console", "off"])
        .args(["--serial", "pty"])
        .arg("--api-socket")
        .arg(&api)
        .arg("--disk")
        .arg(format!("path={},readonly=on", cidata.display()))
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    if let Some(t) = tap() {
        cmd.args(["--net", &format!("tap={t},mac=52:54:00:12:34:56")]);
    }
    if let Some(i) = initrd() {
        cmd.args(["--initramfs", &i]);
    }
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    GoVmm(child.id() as i32, child)
}

/// What the Go module writes in its tmpfs for that VM (`vm/machine.go`).
fn go_config(env: &Stack, cidata: &Path) -> Value {
    json!({
        "id": NAME,
        "boot-source": {
            "kernel_image_path": env.kernel(),
            "initrd_path": initrd().unwrap_or_default(),
            "boot_args": go_cmdline()
        },
        "drives": [{
            "drive_id": "1",
            "path_on_host": cidata,
            "is_root_device": false,
            "is_read_only": true
        }],
        "fs": null,
        "network-interfaces": tap().map(|t| vec![json!({
            "iface_id": "eth0",
            "host_dev_name": t,
            "guest_mac": "52:54:00:12:34:56"
        })]).unwrap_or_default(),
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 512, "ht_enabled": false},
        "devices": null,
        "no-keep-alive": false
    })
}

async fn vm_info(api: &Path) -> Value {
    let body = vmd_runtime::vmm::api::expect_ok(api, "GET", "vm.info", Duration::from_secs(5))
        .await
        .unwrap();
    serde_json::from_slice(&body).unwrap()
}

/// The Go module's `cloud-console`: the guest's serial port, from the pty
/// `vm.info` names, appended to the log; it ends when the pty does.
fn console_stand_in(pty: PathBuf, log: PathBuf) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let Ok(mut tty) = std::fs::File::open(&pty) else {
            return;
        };
        let mut out = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        let mut buf = [0u8; 4096];
        while let Ok(n) = tty.read(&mut buf) {
            if n == 0 || out.write_all(&buf[..n]).is_err() {
                return;
            }
        }
    })
}

/// Subscribes to `channel` at `url` and appends every message, gunzipped,
/// to `into`.
async fn subscribe(url: &str, channel: &str, into: Arc<Mutex<Vec<u8>>>) {
    use futures_util::StreamExt;
    let client = redis::Client::open(url).unwrap();
    let mut pubsub = loop {
        match client.get_async_pubsub().await {
            Ok(p) => break p,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    pubsub.subscribe(channel).await.unwrap();
    tokio::spawn(async move {
        let mut msgs = pubsub.on_message();
        while let Some(m) = msgs.next().await {
            let payload: Vec<u8> = m.get_payload().unwrap();
            into.lock().unwrap().extend(vmd_tests::gunzip(&payload));
        }
    });
}

fn state(env: &Stack) -> Option<ShimState> {
    ShimState::load(&env.run_dir(NAME).join("state.json"))
        .ok()
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_go_modules_vms_are_taken_over_live_and_restarted_the_vmd_way() {
    let mut env = Stack::start(&["--grace-secs", "3"]).await;
    // A node where the Go module ran: vmd is not there yet.
    env.vmd.crash();
    let root = env.vmd.root();
    let cidata = root.join("cloud-init").join(NAME);
    std::fs::create_dir_all(cidata.parent().unwrap()).unwrap();
    std::fs::write(&cidata, vec![0u8; 64 << 10]).unwrap();
    let log = env.log(NAME);
    std::fs::create_dir_all(log.parent().unwrap()).unwrap();
    env.tap(TAP, [1000, 10, 2000, 20]);
    let config = env.go_config(NAME);
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    std::fs::write(&config, format!("{}\n", go_config(&env, &cidata))).unwrap();
    let mut go = start_the_go_way(&env, &cidata, &log);
    let api = env.api_socket(NAME);
    until(
        Duration::from_secs(10),
        "the Go-started VMM answers",
        || async {
            vmd_runtime::vmm::api::expect_ok(&api, "GET", "vm.info", Duration::from_secs(1))
                .await
                .is_ok()
        },
    )
    .await;
    let info = vm_info(&api).await;
    assert_eq!(info["config"]["serial"]["mode"], "Pty", "{info}");
    let pty = PathBuf::from(info["config"]["serial"]["file"].as_str().unwrap());
    let console = console_stand_in(pty, log.clone());
    until(
        vmd_tests::vm::boot_timeout(),
        "the guest's boot in the log",
        || async {
            String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default())
                .contains("GUEST-READY")
        },
    )
    .await;
    let vmm = ProcessIdentity::of(go.0).unwrap();
    // Its log stream: a zinit service of the Go module's.
    let stream = zinit::ServiceName::new("stream:go-logs".to_owned()).unwrap();
    let tail = zinit::Command::new(["sh", "-c", "exec sleep 100000"]).unwrap();
    env.zinit
        .config_dir()
        .install(&stream, &zinit::Service::new(tail))
        .unwrap();
    env.zinit.client().monitor(&stream).await.unwrap();

    // vmd starts on that node.
    env.vmd.restart();
    env.vmd.wait_ready().await;
    // Served once its shim watched it: heard, not waited out.
    let said = env.vmd.stderr();
    assert!(said.contains("took over the Go VM module's VM"), "{said}");
    assert!(!said.contains("has not reported yet"), "{said}");
    let s = &env.stub;
    assert!(s.exists(NAME).await.unwrap());
    assert_eq!(s.list().await.unwrap(), vec![NAME.to_owned()]);
    let i = s.inspect(NAME).await.unwrap();
    assert_eq!((i.cpu, i.memory), (1, 512), "{i:?}");
    assert_eq!(i.state.as_deref(), Some("running"), "{i:?}");
    assert_eq!(i.pid, Some(i64::from(go.0)), "{i:?}");
    assert!(s.logs(NAME).await.unwrap().contains("GUEST-READY"));
    assert!(s.logs_full(NAME).await.unwrap().contains("GUEST-HELLO"));
    if tap().is_some() {
        let m = &s.metrics().await.unwrap()[NAME];
        assert_eq!(
            (m.private.net_rx_bytes, m.private.net_tx_bytes),
            (1000, 2000)
        );
    }
    // A Run of it: it exists.
    let again = s.run(&env.vm(NAME, &[])).await.unwrap_err().to_string();
    assert!(again.contains("already exists"), "{again}");
    // Lock and unlock, through its API.
    s.lock(NAME, true).await.unwrap();
    assert_eq!(vm_info(&api).await["state"], "Paused");
    assert_eq!(
        s.inspect(NAME).await.unwrap().state.as_deref(),
        Some("paused")
    );
    s.lock(NAME, false).await.unwrap();
    assert_eq!(vm_info(&api).await["state"], "Running");
    // A stream of vmd's ships its console from the start of the log.
    let receiver = vmd_tests::RedisServer::start_tcp();
    let received = Arc::new(Mutex::new(Vec::new()));
    subscribe(
        &format!("redis://127.0.0.1:{}/", receiver.tcp_port()),
        "go-vm",
        received.clone(),
    )
    .await;
    s.stream_create(
        NAME,
        &vmd::api::Stream {
            id: "vmd-logs".into(),
            namespace: String::new(),
            output: format!("redis://127.0.0.1:{}/go-vm", receiver.tcp_port()),
        },
    )
    .await
    .unwrap();
    let heard = |marker: &'static str, times: usize| {
        let received = received.clone();
        move || {
            let received = received.clone();
            async move {
                String::from_utf8_lossy(&received.lock().unwrap())
                    .matches(marker)
                    .count()
                    >= times
            }
        }
    };
    until(
        Duration::from_secs(30),
        "the stream ships the Go-era console",
        heard("GUEST-READY", 1),
    )
    .await;
    // Its guest never restarted: the same process all along, and the Go
    // module's stream still runs.
    assert!(vmm.alive());
    let running = |st: zinit::State| matches!(st, zinit::State::Running | zinit::State::Spawned);
    assert!(running(
        env.zinit.client().status(&stream).await.unwrap().state
    ));
    // Operators see it as any VM of vmd's.
    let svc = zinit::ServiceName::new(format!("vm:{NAME}")).unwrap();
    assert!(running(
        env.zinit.client().status(&svc).await.unwrap().state
    ));
    // A restart of vmd, or of its shim, changes nothing for it.
    env.vmd.crash_and_restart();
    env.vmd.wait_ready().await;
    let shim = state(&env).unwrap().shim_pid as i32;
    // SAFETY: kill has no memory effects.
    unsafe {
        libc::kill(shim, libc::SIGKILL);
    }
    until(Duration::from_secs(10), "a new shim watches it", || async {
        state(&env).is_some_and(|st| st.shim_pid as i32 != shim && st.phase == Phase::Running)
    })
    .await;
    assert!(vmm.alive(), "a shim restart killed the Go module's VMM");
    assert_eq!(s.inspect(NAME).await.unwrap().pid, Some(i64::from(go.0)));
    // Reconciliation (done by now: the shim's restart came after it
    // started) left the Go module's stream alone.
    assert!(running(
        env.zinit.client().status(&stream).await.unwrap().state
    ));

    // The Go module's VMM dies: the console process goes with its pty, and
    // vmd starts the VM its own way, the log going on where it was.
    let before = std::fs::read(&log).unwrap();
    go.kill();
    console.join().unwrap();
    until(
        vmd_tests::vm::boot_timeout() + Duration::from_secs(15),
        "the VM runs again under its shim",
        || async {
            let st = state(&env);
            st.is_some_and(|st| st.booted() && st.vmm.is_some_and(|v| v.pid != go.0))
        },
    )
    .await;
    env.wait_logs_since(NAME, "GUEST-READY", before.len()).await;
    let after = std::fs::read(&log).unwrap();
    assert!(
        after.starts_with(&before),
        "the console log lost what it had"
    );
    let i = s.inspect(NAME).await.unwrap();
    assert_eq!(i.restarts, Some(1), "{i:?}");
    let new = state(&env).unwrap().vmm.unwrap();
    // The shim's child, named as the Go module's rule wants, on the same
    // socket and disks, its serial port the shim's own.
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", new.pid)).unwrap();
    let ppid: u32 = stat[stat.rfind(')').unwrap() + 2..]
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(ppid, state(&env).unwrap().shim_pid);
    let info = vm_info(&api).await;
    assert_eq!(info["config"]["disks"][0]["path"], json!(cidata), "{info}");
    assert_ne!(info["config"]["serial"]["mode"], "Pty", "{info}");
    if let Some(t) = tap() {
        // Handed over open by the shim now, attached to the same tap.
        assert_eq!(info["config"]["net"][0]["fds"], json!([-1]), "{info}");
        let fdinfo = std::fs::read_to_string(format!("/proc/{}/fdinfo/4", new.pid)).unwrap();
        assert!(fdinfo.contains(&format!("iff:\t{t}")), "{fdinfo}");
        let m = &s.metrics().await.unwrap()[NAME];
        assert_eq!(m.private.net_rx_bytes, 1000);
    }
    // The stream goes on with the new boot, nothing repeated.
    until(
        Duration::from_secs(30),
        "the stream ships the new boot",
        heard("GUEST-READY", 2),
    )
    .await;
    let shipped = received.lock().unwrap().clone();
    let log_now = std::fs::read(&log).unwrap();
    // A new stream starts with the log's tail (`tailstream`'s rule), then
    // follows: what it shipped is one stretch of the log, nothing repeated.
    let head = &shipped[..shipped.len().min(64)];
    let at = (0..log_now.len().saturating_sub(shipped.len()) + 1)
        .filter(|&i| log_now[i..].starts_with(head))
        .find(|&i| log_now[i..].starts_with(&shipped));
    assert!(
        at.is_some(),
        "the stream repeated or lost console bytes: {} shipped, not one stretch of the log's {}",
        shipped.len(),
        log_now.len()
    );
    s.stream_delete("vmd-logs").await.unwrap();

    // The Go module's stream goes with a StreamDelete of its id.
    s.stream_delete("go-logs").await.unwrap();
    assert!(env.zinit.client().status(&stream).await.is_err());
    assert!(!env.zinit.config_dir().exists(&stream));

    // Deleted: everything of it goes, the Go module's files included.
    s.delete(NAME).await.unwrap();
    assert!(!s.exists(NAME).await.unwrap());
    assert!(!config.exists(), "the Go config stayed");
    assert!(!cidata.exists(), "the Go module's cloud-init image stayed");
    env.assert_nothing_left().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmm_without_a_go_config_or_elsewhere_is_not_taken_over() {
    let mut env = Stack::start(&[]).await;
    env.vmd.crash();
    let root = env.vmd.root();
    let cidata = root.join("cloud-init").join(NAME);
    std::fs::create_dir_all(cidata.parent().unwrap()).unwrap();
    std::fs::write(&cidata, vec![0u8; 64 << 10]).unwrap();
    let log = env.log(NAME);
    std::fs::create_dir_all(log.parent().unwrap()).unwrap();
    env.tap(TAP, [0; 4]);
    // No config in the Go module's directory: the Go module itself would
    // kill it; vmd neither adopts nor kills it.
    let go = start_the_go_way(&env, &cidata, &log);
    let api = env.api_socket(NAME);
    until(
        Duration::from_secs(10),
        "the Go-started VMM answers",
        || async {
            vmd_runtime::vmm::api::expect_ok(&api, "GET", "vm.info", Duration::from_secs(1))
                .await
                .is_ok()
        },
    )
    .await;
    let vmm = ProcessIdentity::of(go.0).unwrap();
    env.vmd.restart();
    env.vmd.wait_ready().await;
    assert!(!env.stub.exists(NAME).await.unwrap());
    assert!(env.stub.list().await.unwrap().is_empty());
    assert!(vmm.alive());
    assert!(!env.run_dir(NAME).exists());
}
