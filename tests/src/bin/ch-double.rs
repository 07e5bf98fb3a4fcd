//! A cloud-hypervisor double for tests: the command line (for the flags vmd
//! uses), the REST API on `--api-socket` with the JSON of real replies,
//! serial output with the markers of the test guest in `shared/guest/`, the
//! event monitor, and the real exit codes.
//!
//! It plays one release, v39 to v53, chosen by the name it is run as:
//! `…/ch-double-v39` is v39, plain `ch-double` is v53 (the environment is
//! cleared by the shim, the name is not). What differs by release is what
//! `docs/cloud-hypervisor-versions.md` lists: `--version`, `image_type`
//! (v51) and the sector-0 refusal of auto-detected raw disks (v51), the
//! error shapes (JSON chains since v47, one plain line before), `vm.info`
//! without a VM (404 since v53, 500 before), disk image locks (v46), the
//! `api.sock.lock` left behind (v53), the serial socket (output without a
//! client lost before v50, buffered after; a second client hangs the VMM
//! at power-off before v50), and the `vmm shutdown` event v39 may skip
//! (the double always skips it there: the worst case).
//!
//! The guest is steered like the real test guest, by the kernel command line
//! (`gaction=wait|poweroff|reboot|panic`, `gtick=N`), plus knobs of the double
//! (a real guest ignores them):
//!
//! | knob | effect |
//! |---|---|
//! | `double.boot_ms=N` | time from start to `GUEST-READY` (default 300) |
//! | `double.api_delay_ms=N` | bind the API socket only after N ms |
//! | `double.boot_fail=1` | the kernel cannot be loaded: error chain on stderr, exit 1 (API socket left behind, as v53) |
//! | `double.crash_after_ms=N` | the guest dies after N ms: `VCPU generated error` on stderr, exit 0 (as v53) |
//! | `double.crash_code=C` | with crash_after_ms: exit C instead, without the vCPU message |
//! | `double.crash_while=PATH` | with crash_after_ms: only while PATH reads `broken` (a cause outside the guest that goes away; a file of the VM's own, such as its initrd: a jailed VMM sees no other) |
//! | `double.ignore_power_button=1` | the guest never reacts to the power button |
//! | `double.flood_bps=N` | after GUEST-READY, print 64-byte lines `FLOOD <seq> b<boot id> x…` at N bytes/s (0: as fast as possible) |
//! | `double.flood_bytes=N` | stop flooding after N bytes |
//! | `double.exec_log=PATH` | append `<pid> <unix ns>` to PATH first thing (benchmarks time the exec); `stderr`: print `DOUBLE-EXEC <pid> <unix ns>` there (into the console log: a jailed VMM reaches no other file) |
//! | `double.net_send=N` | at boot the guest sends N Ethernet frames of 100 bytes on each tap handed over (`fd=`), as a guest's traffic: the host counts them as the tap's `rx` |
//! | `double.try_write=PATH[,PATH…]` | at boot the VMM process itself (not the guest) opens each PATH to append: `GUEST-WRITE PATH ok`, or `GUEST-WRITE PATH <error>` (what a guest that escaped into the VMM could do) |
//! | `double.write_sector0=1` | at boot the guest writes sector 0 of each writable disk: `GUEST-SECTOR0 vdX written` (the bytes really land in the image), or the kernel's `I/O error, dev vdX, sector 0` where the VMM refuses it |
//!
//! With `--serial tty` the serial input is read from stdin when it is a
//! terminal (as cloud-hypervisor does). With `gaction=shell` the guest runs
//! a shell on the console, as the real test guest does (busybox `sh`: a
//! `/ # ` prompt, bytes echoed, `echo X` prints `X`, other commands are not
//! found; no ACPI handler, so the power button is ignored); otherwise
//! nothing reads the console and input is dropped.
//!
//! With `--serial pty` (how the Go VM module runs it) the guest's output
//! goes to the master of a new pty whose other side `vm.info` names
//! (`config.serial.file`, as cloud-hypervisor does); what no one reads
//! fills the pty's buffer and the rest is dropped.
//!
//! Deviations: no real guest, nothing read from a `--serial pty`'s pty
//! (no shell on it), counters are zeros, a
//! `--fs` socket is connected to but no vhost-user message is exchanged
//! (so v39's failure with virtiofsd 1.14, `VhostUserGetProtocolFeatures(
//! InvalidMessage)`, is not played),
//! the v50+ serial socket buffer is drained at once rather than a byte
//! per guest write, and a configuration error lacks the `Fatal error:
//! <Debug of the error>` log line v47+ prints before the chain.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

const USAGE: &str = "Usage: cloud-hypervisor [OPTIONS]\n\nFor more information, try '--help'.";

/// The release played: from the name run as (`ch-double-v39`), or the
/// first such name along the symlinks from it (`cloud-hypervisor` →
/// `ch-double-v39`, as a node switches releases), or the executable's own
/// name, else 53.
fn release() -> u16 {
    static RELEASE: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
    *RELEASE.get_or_init(|| {
        let named = |p: &std::path::Path| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .and_then(|n| n.rsplit_once("-v").and_then(|(_, v)| v.parse().ok()))
        };
        // The path it was executed by (the kernel's AT_EXECFN): works in a
        // jail without /proc, where the name run as is a bind mount.
        // SAFETY: getauxval has no preconditions; AT_EXECFN, where present,
        // points to a NUL-terminated string that lives as long as the process.
        let execfn = unsafe { libc::getauxval(libc::AT_EXECFN) };
        if execfn != 0 {
            // SAFETY: see above.
            let s = unsafe { std::ffi::CStr::from_ptr(execfn as *const libc::c_char) };
            let p = PathBuf::from(std::ffi::OsStr::from_bytes(s.to_bytes()));
            if let Some(r) = named(&p) {
                return r;
            }
        }
        let mut p = std::env::args_os().next().map(PathBuf::from);
        for _ in 0..8 {
            let Some(path) = p else { break };
            if let Some(r) = named(&path) {
                return r;
            }
            p = std::fs::read_link(&path)
                .ok()
                .map(|t| path.parent().map_or(t.clone(), |d| d.join(&t)));
        }
        // Run under another argv[0] (vmd's shim names every VMM
        // `cloud-hypervisor`): the executable itself says.
        std::env::current_exe()
            .ok()
            .and_then(|e| named(&e))
            .unwrap_or(53)
    })
}

/// Error chains (JSON arrays in the API, numbered lines on exit) since v47.
fn has_error_chains() -> bool {
    release() >= 47
}

#[derive(Default, Debug)]
struct Cli {
    api_socket: Option<String>,
    kernel: Option<PathBuf>,
    initramfs: Option<PathBuf>,
    cmdline: String,
    cpus: String,
    memory: String,
    disks: Vec<String>,
    nets: Vec<String>,
    fs: Vec<String>,
    devices: Vec<String>,
    serial: String,
    console: String,
    event_monitor: Option<String>,
}

/// `flag` takes one value; `multi` flags take values up to the next flag.
fn parse_cli(args: &[String]) -> Result<Cli, String> {
    let mut cli = Cli {
        cpus: "boot=1".into(),
        memory: "size=512M".into(),
        serial: "null".into(),
        console: "tty".into(),
        ..Default::default()
    };
    let mut i = 0;
    // clap's two forms: `--flag value` (a value may not look like a flag)
    // and `--flag=value` (anything after the `=`, dashes included).
    let one = |i: &mut usize, flag: &str, inline: Option<&str>| -> Result<String, String> {
        if let Some(v) = inline {
            return Ok(v.to_owned());
        }
        *i += 1;
        args.get(*i)
            .filter(|v| !v.starts_with("--"))
            .cloned()
            .ok_or_else(|| {
                format!(
                    "error: a value is required for '{flag} <{}>' but none was supplied",
                    flag.trim_start_matches('-')
                )
            })
    };
    while i < args.len() {
        let (flag, inline) = match args[i].split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v)),
            _ => (args[i].as_str(), None),
        };
        match flag {
            "--api-socket" => cli.api_socket = Some(one(&mut i, flag, inline)?),
            "--kernel" => cli.kernel = Some(one(&mut i, flag, inline)?.into()),
            "--initramfs" => cli.initramfs = Some(one(&mut i, flag, inline)?.into()),
            "--cmdline" => cli.cmdline = one(&mut i, flag, inline)?,
            "--cpus" => cli.cpus = one(&mut i, flag, inline)?,
            "--memory" => cli.memory = one(&mut i, flag, inline)?,
            "--serial" => cli.serial = one(&mut i, flag, inline)?,
            "--console" => cli.console = one(&mut i, flag, inline)?,
            "--event-monitor" => cli.event_monitor = Some(one(&mut i, flag, inline)?),
            "--seccomp" | "--log-file" => {
                one(&mut i, flag, inline)?;
            }
            "-v" | "-vv" | "-vvv" => {}
            "--disk" | "--net" | "--fs" | "--device" => {
                let mut values: Vec<String> = inline.map(str::to_owned).into_iter().collect();
                while args.get(i + 1).is_some_and(|v| !v.starts_with("--")) {
                    i += 1;
                    values.push(args[i].clone());
                }
                if values.is_empty() {
                    return Err(format!(
                        "error: a value is required for '{flag}' but none was supplied"
                    ));
                }
                match flag {
                    "--disk" => cli.disks.extend(values),
                    "--net" => cli.nets.extend(values),
                    "--fs" => cli.fs.extend(values),
                    _ => cli.devices.extend(values),
                }
            }
            other => return Err(format!("error: unexpected argument '{other}' found")),
        }
        i += 1;
    }
    Ok(cli)
}

/// `k=v,k=v` as cloud-hypervisor's option parser reads it.
fn options(flag: &str, s: &str, known: &[&str]) -> Result<HashMap<String, String>, Vec<String>> {
    let mut m = HashMap::new();
    for part in s.split(',') {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        if !known.contains(&k) {
            return Err(vec![
                "Error parsing config".into(),
                format!("Error parsing --{flag}"),
                format!("unknown option: {k}"),
            ]);
        }
        m.insert(k.to_owned(), v.to_owned());
    }
    Ok(m)
}

fn parse_size(flag: &str, key: &str, v: &str) -> Result<u64, Vec<String>> {
    let bad = || {
        vec![
            format!("Error parsing --{flag}"),
            format!("unable to convert {v} for {key}"),
        ]
    };
    let (num, mul) = match v.chars().last() {
        Some('K') => (&v[..v.len() - 1], 1u64 << 10),
        Some('M') => (&v[..v.len() - 1], 1 << 20),
        Some('G') => (&v[..v.len() - 1], 1 << 30),
        _ => (v, 1),
    };
    num.parse::<u64>().map(|n| n * mul).map_err(|_| bad())
}

fn on_off(flag: &str, key: &str, v: Option<&String>) -> Result<bool, Vec<String>> {
    match v.map(String::as_str) {
        None | Some("off") | Some("false") => Ok(false),
        Some("on") | Some("true") | Some("") => Ok(true),
        Some(x) => Err(vec![
            format!("Error parsing --{flag}"),
            format!("unable to convert {x} for {key}"),
        ]),
    }
}

#[derive(Debug, Clone)]
struct DiskConfig {
    path: String,
    readonly: bool,
    sector0_refused: bool,
}

#[derive(Debug, Clone)]
struct Config {
    vcpus: u8,
    memory: u64,
    shared: bool,
    disks: Vec<DiskConfig>,
    nets: Vec<NetConfig>,
    serial: Serial,
}

/// A `--net`: a tap the VMM opens by name, or taps handed over open.
#[derive(Debug, Clone)]
struct NetConfig {
    tap: Option<String>,
    /// The fds handed over (`vm.info` shows each as -1).
    fds: Option<Vec<i32>>,
    mac: String,
}

/// `fd=N` or `fd=[N,M]`: checked as cloud-hypervisor checks them — above
/// the standard streams (config validation), then each really a tap
/// (`Tap::from_tap_fd`: `TUNGETIFF` at device creation).
fn tap_fds(v: &str) -> Result<Vec<i32>, Vec<String>> {
    let list: Vec<&str> = v
        .trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .collect();
    let mut fds = Vec::new();
    for f in list {
        let fd: i32 = f.trim().parse().map_err(|_| {
            vec![
                "Error parsing --net".into(),
                format!("unable to convert {v} for fd"),
            ]
        })?;
        if fd <= 2 {
            return Err(vec![
                "Error validating configuration".into(),
                format!("Net fd {fd} is reserved (0, 1, 2)"),
            ]);
        }
        // SAFETY: ifreq is plain old data; all zeroes is valid.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        // SAFETY: TUNGETIFF fills the ifreq, which lives across the call.
        if unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut req) } < 0 {
            return Err(vec![
                "Error booting VM".into(),
                "The VM could not boot".into(),
                "Cannot create virtio-net device".into(),
                "Failed to open taps".into(),
                format!(
                    "ioctl (TUNGETIFF) failed: {}",
                    std::io::Error::last_os_error()
                ),
            ]);
        }
        // Up to v51 the device asks the tap's MTU by its name, in the VMM's
        // own network namespace (`Tap::mtu`, SIOCGIFMTU), and fails when
        // the tap is not there; v52 goes on without it.
        if release() <= 51 {
            // SAFETY: a plain socket call; the result is checked.
            let sock = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM, 0) };
            // SAFETY: SIOCGIFMTU fills the ifreq, which lives across the call.
            let r = unsafe { libc::ioctl(sock, libc::SIOCGIFMTU, &mut req) };
            let e = std::io::Error::last_os_error();
            // SAFETY: our own descriptor.
            unsafe { libc::close(sock) };
            if r < 0 {
                return Err(vec![
                    "Error booting VM".into(),
                    "The VM could not boot".into(),
                    "Cannot create virtio-net device".into(),
                    format!("ioctl ({}) failed: {e}", libc::SIOCGIFMTU),
                ]);
            }
        }
        fds.push(fd);
    }
    Ok(fds)
}

/// Bytes of each frame `double.net_send` writes (what the tap counts).
const FRAME: usize = 100;

/// One broadcast Ethernet frame from `mac` into a tap opened with
/// `IFF_VNET_HDR` (as the shim and cloud-hypervisor open it: a 12-byte
/// virtio-net header first, all zero: no offloads).
fn send_frame(fd: i32, mac: &str) -> bool {
    let mut buf = [0u8; 12 + FRAME];
    let frame = &mut buf[12..];
    frame[..6].fill(0xff);
    for (i, b) in mac.split(':').take(6).enumerate() {
        frame[6 + i] = u8::from_str_radix(b, 16).unwrap_or(2);
    }
    // IEEE 802 local experimental EtherType: nothing on the host takes it.
    frame[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    // SAFETY: writes from a buffer that lives across the call.
    let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
    n == buf.len() as isize
}

#[derive(Debug, Clone, PartialEq)]
enum Serial {
    Null,
    Tty,
    File(PathBuf),
    Socket(PathBuf),
    /// The pty's other side (its master is [`PTY_MASTER`]).
    Pty(PathBuf),
}

/// The master of the `--serial pty` pty: made while the configuration is
/// read, so that `vm.info` names its other side from the start.
static PTY_MASTER: std::sync::OnceLock<std::os::fd::OwnedFd> = std::sync::OnceLock::new();

/// A pty for `--serial pty`: its master kept, non-blocking, in
/// [`PTY_MASTER`]; the path of its other side.
fn serial_pty() -> Result<PathBuf, String> {
    let pty = nix::pty::openpty(None, None).map_err(|e| format!("cannot open a pty: {e}"))?;
    let path = nix::unistd::ttyname(&pty.slave).map_err(|e| format!("cannot name the pty: {e}"))?;
    // Raw, as cloud-hypervisor sets it: the guest's bytes as they are.
    if let Ok(mut t) = nix::sys::termios::tcgetattr(&pty.slave) {
        nix::sys::termios::cfmakeraw(&mut t);
        let _ = nix::sys::termios::tcsetattr(&pty.slave, nix::sys::termios::SetArg::TCSANOW, &t);
    }
    let flags = nix::fcntl::fcntl(&pty.master, nix::fcntl::FcntlArg::F_GETFL)
        .map_err(|e| format!("cannot read the pty's flags: {e}"))?;
    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(&pty.master, nix::fcntl::FcntlArg::F_SETFL(flags))
        .map_err(|e| format!("cannot make the pty non-blocking: {e}"))?;
    let _ = PTY_MASTER.set(pty.master);
    Ok(path)
}

fn config(cli: &Cli) -> Result<Config, Vec<String>> {
    let cpus = options(
        "cpus",
        &cli.cpus,
        &[
            "boot",
            "max",
            "topology",
            "kvm_hyperv",
            "max_phys_bits",
            "affinity",
            "features",
            "nested",
        ],
    )?;
    let boot = cpus.get("boot").map_or("1", String::as_str);
    let vcpus: u8 = boot.parse().map_err(|_| {
        vec![
            "Error parsing --cpus".into(),
            format!("unable to convert {boot} for boot"),
        ]
    })?;
    let mem = options(
        "memory",
        &cli.memory,
        &[
            "size",
            "shared",
            "hugepages",
            "mergeable",
            "hotplug_method",
            "hotplug_size",
            "prefault",
            "thp",
        ],
    )?;
    let memory = parse_size(
        "memory",
        "size",
        mem.get("size").map_or("512M", String::as_str),
    )?;
    let shared = on_off("memory", "shared", mem.get("shared"))?;
    let mut disks = Vec::new();
    for d in &cli.disks {
        let o = options(
            "disk",
            d,
            &[
                "path",
                "readonly",
                "direct",
                "iommu",
                "num_queues",
                "queue_size",
                "id",
                "serial",
                if release() >= 51 {
                    "image_type"
                } else {
                    "serial"
                },
            ],
        )?;
        let path = o.get("path").cloned().unwrap_or_default();
        let readonly = on_off("disk", "readonly", o.get("readonly"))?;
        // v51+: an image whose type was only detected, and detected raw,
        // gets sector-0 writes refused.
        let sector0_refused = release() >= 51
            && !o.contains_key("image_type")
            && !std::fs::read(&path)
                .map(|b| b.starts_with(b"QFI\xfb"))
                .unwrap_or(false);
        disks.push(DiskConfig {
            path,
            readonly,
            sector0_refused,
        });
    }
    let mut nets = Vec::new();
    for n in &cli.nets {
        let o = options(
            "net",
            n,
            &[
                "tap",
                "fd",
                "mac",
                "ip",
                "mask",
                "num_queues",
                "queue_size",
                "id",
                "host_mac",
                "mtu",
            ],
        )?;
        let fds = o.get("fd").map(|f| tap_fds(f)).transpose()?;
        nets.push(NetConfig {
            tap: o.get("tap").cloned(),
            fds,
            mac: o.get("mac").cloned().unwrap_or_default(),
        });
    }
    for f in &cli.fs {
        let o = options(
            "fs",
            f,
            &["tag", "socket", "num_queues", "queue_size", "id"],
        )?;
        if !o.contains_key("tag") || !o.contains_key("socket") {
            return Err(vec![
                "Error parsing --fs".into(),
                "missing tag or socket".into(),
            ]);
        }
        if !shared {
            return Err(vec![
                "Error validating configuration".into(),
                "Using fs requires shared memory".into(),
            ]);
        }
    }
    for d in &cli.devices {
        options("device", d, &["path", "iommu", "id", "pci_segment"])?;
    }
    let serial = match cli.serial.as_str() {
        "off" | "null" => Serial::Null,
        "tty" => Serial::Tty,
        s if s.starts_with("file=") => Serial::File(s[5..].into()),
        s if s.starts_with("socket=") => Serial::Socket(s[7..].into()),
        "pty" => Serial::Pty(serial_pty().map_err(|e| vec![e])?),
        other => {
            return Err(vec![
                "Error parsing --serial".into(),
                format!("invalid value: {other}"),
            ])
        }
    };
    Ok(Config {
        vcpus,
        memory,
        shared,
        disks,
        nets,
        serial,
    })
}

fn fail(chain: &[String]) -> ExitCode {
    let mut e = std::io::stderr().lock();
    if !has_error_chains() {
        // v39: the error's Display, its causes joined on one line.
        let _ = writeln!(e, "{}", chain.join(": "));
        return ExitCode::from(1);
    }
    let _ = writeln!(
        e,
        "Error: Cloud Hypervisor exited with the following chain of errors:"
    );
    for (i, c) in chain.iter().enumerate() {
        let _ = writeln!(e, "  {i}: {c}");
    }
    ExitCode::from(1)
}

/// Knobs on the kernel command line.
struct Knobs(HashMap<String, String>);

impl Knobs {
    fn parse(cmdline: &str) -> Self {
        Knobs(
            cmdline
                .split_whitespace()
                .filter_map(|w| w.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        )
    }
    fn num(&self, k: &str) -> Option<u64> {
        self.0.get(k).and_then(|v| v.parse().ok())
    }
    fn str(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum VmState {
    Created,
    Running,
    Paused,
}

struct Vmm {
    state: Mutex<VmState>,
    ready: Mutex<bool>,
    /// A shell reads the console (`gaction=shell`).
    shell: std::sync::atomic::AtomicBool,
    started: Instant,
    cli: Cli,
    config: Config,
    serial: mpsc::Sender<Vec<u8>>,
    events: Mutex<Option<std::fs::File>>,
    exit: mpsc::Sender<u8>,
    knobs: Knobs,
    api_path: Option<PathBuf>,
    /// A second client connected to the serial socket (matters before v50).
    serial_hangs: std::sync::atomic::AtomicBool,
    /// The API stopped answering (the v39 hang).
    api_dead: std::sync::atomic::AtomicBool,
    /// Whether a VM exists (a kernel was given): `vm.info` without one fails.
    created: bool,
    /// Disk image locks held for the VMM's life (v46+).
    _locks: Vec<std::fs::File>,
}

impl Vmm {
    fn event(&self, source: &str, event: &str) {
        let el = self.started.elapsed();
        let doc = serde_json::json!({
            "timestamp": {"secs": el.as_secs(), "nanos": el.subsec_nanos()},
            "source": source,
            "event": event,
            "properties": null,
        });
        if let Some(f) = self.events.lock().unwrap().as_mut() {
            let _ = write!(
                f,
                "{}\n\n",
                serde_json::to_string_pretty(&doc).unwrap_or_default()
            );
        }
    }

    /// One line on the serial port as a real guest's 8250 console sends it:
    /// the kernel's console writer and the tty's ONLCR both end lines with
    /// CR LF.
    async fn print(&self, line: &str) {
        let _ = self.serial.send(format!("{line}\r\n").into_bytes()).await;
    }

    fn state(&self) -> VmState {
        *self.state.lock().unwrap()
    }

    /// The guest powers off: the VM reports its shutdown, the VMM exits 0.
    async fn guest_poweroff(self: &Arc<Self>) {
        // The guest kernel's last words.
        self.print("reboot: Power down").await;
        *self.state.lock().unwrap() = VmState::Created;
        self.event("vm", "shutdown");
        // v53 exits about a second after the guest powered off.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        if self.serial_hangs.load(std::sync::atomic::Ordering::SeqCst) {
            // Before v50, after a second serial client: the VMM hangs here,
            // its API dead; only SIGKILL ends it.
            self.api_dead
                .store(true, std::sync::atomic::Ordering::SeqCst);
            return;
        }
        self.event("vm", "deleted");
        if release() > 39 {
            self.event("vmm", "shutdown");
        }
        let _ = self.exit.send(0).await;
    }

    // Boxed with a named type: a reboot spawns the next boot of itself.
    fn boot(self: Arc<Self>) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(async move { self.boot_once().await })
    }

    async fn boot_once(self: Arc<Self>) {
        self.event("vm", "booting");
        *self.state.lock().unwrap() = VmState::Running;
        *self.ready.lock().unwrap() = false;
        self.shell.store(false, std::sync::atomic::Ordering::SeqCst);
        self.event("vm", "booted");
        let action = self.knobs.str("gaction").unwrap_or("wait").to_owned();
        let memkb = self.config.memory / 1024;
        self.print(&format!(
            "GUEST-HELLO kernel=double cpus={} online=0-{} memkb={memkb} action={action}",
            self.config.vcpus,
            self.config.vcpus.saturating_sub(1)
        ))
        .await;
        let frames = self.knobs.num("double.net_send").unwrap_or(0);
        for net in &self.config.nets {
            for fd in net.fds.iter().flatten() {
                let sent = (0..frames).filter(|_| send_frame(*fd, &net.mac)).count();
                self.print(&format!("GUEST-NET-SENT fd={fd} frames={sent}"))
                    .await;
            }
        }
        let tries = self.knobs.str("double.try_write").unwrap_or("").to_owned();
        for p in tries.split(',').filter(|p| !p.is_empty()) {
            let said = match std::fs::OpenOptions::new().append(true).open(p) {
                Ok(_) => "ok".to_owned(),
                Err(e) => e.to_string(),
            };
            self.print(&format!("GUEST-WRITE {p} {said}")).await;
        }
        for (i, d) in self.config.disks.iter().enumerate() {
            let sectors = std::fs::metadata(&d.path)
                .map(|m| m.len() / 512)
                .unwrap_or(0);
            let name = format!("vd{}", (b'a' + i as u8) as char);
            self.print(&format!("GUEST-DISK {name} sectors={sectors}"))
                .await;
        }
        if self.knobs.num("double.write_sector0").unwrap_or(0) != 0 {
            for (i, d) in self.config.disks.iter().enumerate() {
                if d.readonly {
                    continue;
                }
                let name = format!("vd{}", (b'a' + i as u8) as char);
                if d.sector0_refused {
                    self.print(&format!(
                        "I/O error, dev {name}, sector 0 op 0x1:(WRITE) flags 0x8800 phys_seg 1 prio class 2"
                    ))
                    .await;
                    continue;
                }
                let written = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&d.path)
                    .and_then(|mut f| f.write_all(&[0xa5u8; 512]));
                match written {
                    Ok(()) => self.print(&format!("GUEST-SECTOR0 {name} written")).await,
                    Err(e) => {
                        self.print(&format!("GUEST-SECTOR0 {name} failed: {e}"))
                            .await
                    }
                }
            }
        }
        let boot_ms = self.knobs.num("double.boot_ms").unwrap_or(300);
        tokio::time::sleep(Duration::from_millis(boot_ms)).await;
        match action.as_str() {
            "poweroff" => {
                self.print("GUEST-POWEROFF").await;
                self.guest_poweroff().await;
            }
            "reboot" => {
                self.print("GUEST-REBOOT").await;
                self.event("vm", "rebooting");
                self.event("vm", "rebooted");
                tokio::spawn(Arc::clone(&self).boot());
            }
            "shell" => {
                self.shell.store(true, std::sync::atomic::Ordering::SeqCst);
                let _ = self.serial.send(PROMPT.to_vec()).await;
            }
            "panic" => {
                self.print("GUEST-PANIC").await;
                self.print("Kernel panic - not syncing: sysrq triggered crash")
                    .await;
            }
            _ => {
                *self.ready.lock().unwrap() = true;
                self.print("GUEST-READY").await;
                if let Some(tick) = self.knobs.num("gtick").filter(|t| *t > 0) {
                    tokio::spawn(Arc::clone(&self).ticks(tick));
                }
                if let Some(bps) = self.knobs.num("double.flood_bps") {
                    tokio::spawn(Arc::clone(&self).flood(bps));
                }
            }
        }
    }

    async fn ticks(self: Arc<Self>, every: u64) {
        let mut n = 0;
        loop {
            tokio::time::sleep(Duration::from_secs(every)).await;
            if self.state() == VmState::Running {
                n += 1;
                self.print(&format!("GUEST-TICK {n}")).await;
            }
        }
    }

    async fn flood(self: Arc<Self>, bps: u64) {
        let limit = self.knobs.num("double.flood_bytes").unwrap_or(u64::MAX);
        let boot = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() as u64 ^ std::process::id() as u64)
            % 10_000_000;
        // A guest's serial output arrives as it is printed: at a set rate,
        // about 10 ms of it per write (at least a line), not 64 KiB bursts
        // that a slow rate would space out by seconds; as fast as possible,
        // 64 KiB writes.
        let step = match bps {
            0 => 64 * 1024,
            bps => (bps / 100).clamp(64, 64 * 1024) as usize,
        };
        let mut sent = 0u64;
        let mut seq = 0u64;
        let t0 = Instant::now();
        while sent < limit {
            if self.state() != VmState::Running {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            // 64-byte lines: "FLOOD <12-digit seq> b<7-digit boot id> xxx…\n":
            // the boot id tells the lines of two boots apart. (A bare LF: a
            // double-only knob whose layout the tests parse as bytes.)
            let mut chunk = Vec::with_capacity(step);
            while chunk.len() < step && sent + (chunk.len() as u64) < limit {
                seq += 1;
                let _ = write!(chunk, "FLOOD {seq:012} b{boot:07} ");
                chunk.extend_from_slice(&[b'x'; 35]);
                chunk.push(b'\n');
            }
            sent += chunk.len() as u64;
            if self.serial.send(chunk).await.is_err() {
                return;
            }
            if bps > 0 {
                let due = Duration::from_secs_f64(sent as f64 / bps as f64);
                if let Some(wait) = due.checked_sub(t0.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

fn json_reply(status: u16, body: Option<String>) -> Vec<u8> {
    // micro_http: "HTTP/1.1 <code> \r\n", Server, Connection: keep-alive,
    // and Content-Type/Length only with a body.
    let mut out =
        format!("HTTP/1.1 {status} \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n");
    if let Some(b) = &body {
        out.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    out.push_str("\r\n");
    if let Some(b) = body {
        out.push_str(&b);
    }
    out.into_bytes()
}

fn chain(status: u16, parts: &[&str]) -> Vec<u8> {
    if !has_error_chains() {
        // Before v47: the VM error's own text with its causes, without the
        // API's two outer levels ("Error from API", "The VM could not …"),
        // one plain line labelled JSON — as real v39 answers.
        let own = if parts.len() > 2 && parts[0] == "Error from API" {
            &parts[2..]
        } else {
            parts
        };
        return json_reply(status, Some(own.join(": ")));
    }
    json_reply(
        status,
        Some(serde_json::to_string(parts).unwrap_or_default()),
    )
}

async fn api(vmm: &Arc<Vmm>, method: &str, path: &str) -> Vec<u8> {
    let Some(endpoint) = path.strip_prefix("/api/v1/") else {
        return chain(404, &["Not Found"]);
    };
    let get = ["vmm.ping", "vm.info", "vm.counters"];
    let put = [
        "vm.power-button",
        "vm.shutdown",
        "vmm.shutdown",
        "vm.pause",
        "vm.resume",
        "vm.reboot",
        "vm.boot",
    ];
    if !get.contains(&endpoint) && !put.contains(&endpoint) {
        return chain(404, &["Not Found"]);
    }
    if (get.contains(&endpoint) && method != "GET") || (put.contains(&endpoint) && method != "PUT")
    {
        return chain(400, &["Bad Request"]);
    }
    let state = vmm.state();
    match endpoint {
        "vmm.ping" => json_reply(
            200,
            Some(
                serde_json::json!({
                    "build_version": format!("v{}.0", release()),
                    "version": format!("{}.0.0", release()),
                    "pid": std::process::id(),
                    "features": ["kvm"],
                })
                .to_string(),
            ),
        ),
        "vm.info" if !vmm.created => {
            let parts = [
                "Error from API",
                "The VM info is not available",
                "VM is not created",
            ];
            chain(if release() >= 53 { 404 } else { 500 }, &parts)
        }
        "vm.info" => {
            let c = &vmm.config;
            let serial = match &c.serial {
                Serial::Null => serde_json::json!({"mode": "Null"}),
                Serial::Tty => serde_json::json!({"mode": "Tty"}),
                Serial::File(p) => serde_json::json!({"mode": "File", "file": p}),
                Serial::Socket(p) => serde_json::json!({"mode": "Socket", "socket": p}),
                Serial::Pty(p) => serde_json::json!({"mode": "Pty", "file": p}),
            };
            let state_name = match state {
                VmState::Created => "Created",
                VmState::Running => "Running",
                VmState::Paused => "Paused",
            };
            let doc = serde_json::json!({
                "config": {
                    "cpus": {"boot_vcpus": c.vcpus, "max_vcpus": c.vcpus},
                    "memory": {"size": c.memory, "shared": c.shared},
                    "payload": {
                        "kernel": vmm.cli.kernel,
                        "cmdline": vmm.cli.cmdline,
                        "initramfs": vmm.cli.initramfs,
                    },
                    "serial": serial,
                    "console": {"mode": "Off"},
                    "disks": c.disks.iter().map(|d| serde_json::json!({"path": d.path, "readonly": d.readonly})).collect::<Vec<_>>(),
                    "net": c.nets.iter().map(|n| serde_json::json!({"tap": n.tap, "fds": n.fds.as_ref().map(|k| vec![-1; k.len()]), "mac": n.mac})).collect::<Vec<_>>(),
                },
                "state": state_name,
                "memory_actual_size": c.memory,
            });
            json_reply(200, Some(doc.to_string()))
        }
        "vm.counters" => {
            if state == VmState::Created {
                return chain(
                    500,
                    &[
                        "Error from API",
                        "The VM info is not available",
                        "VM is not running",
                    ],
                );
            }
            let mut doc = serde_json::Map::new();
            for i in 0..vmm.config.disks.len() {
                doc.insert(
                    format!("_disk{i}"),
                    serde_json::json!({"read_bytes": 0, "write_bytes": 0, "read_ops": 0, "write_ops": 0}),
                );
            }
            for i in 0..vmm.config.nets.len() {
                doc.insert(
                    format!("_net{i}"),
                    serde_json::json!({"rx_bytes": 0, "rx_frames": 0, "tx_bytes": 0, "tx_frames": 0}),
                );
            }
            json_reply(200, Some(serde_json::Value::Object(doc).to_string()))
        }
        "vm.power-button" => match state {
            VmState::Created => chain(
                500,
                &[
                    "Error from API",
                    "Error triggering power button",
                    "VM is not running",
                ],
            ),
            VmState::Paused => json_reply(204, None),
            VmState::Running => {
                let armed = *vmm.ready.lock().unwrap();
                let ignore = vmm.knobs.num("double.ignore_power_button").unwrap_or(0) != 0;
                // Before the guest armed its ACPI handler, a press is lost.
                if armed && !ignore {
                    let v = Arc::clone(vmm);
                    tokio::spawn(async move {
                        v.print("GUEST-POWER-BUTTON: powering off").await;
                        v.guest_poweroff().await;
                    });
                }
                json_reply(204, None)
            }
        },
        "vm.shutdown" => match state {
            VmState::Created => chain(
                500,
                &[
                    "Error from API",
                    "The VM could not shutdown",
                    "VM is not running",
                ],
            ),
            _ => {
                *vmm.state.lock().unwrap() = VmState::Created;
                vmm.event("vm", "shutdown");
                json_reply(204, None)
            }
        },
        "vmm.shutdown" => {
            vmm.event("vmm", "shutdown");
            let _ = vmm.exit.send(0).await;
            json_reply(200, None)
        }
        "vm.pause" => match state {
            VmState::Running => {
                *vmm.state.lock().unwrap() = VmState::Paused;
                vmm.event("vm", "pausing");
                vmm.event("vm", "paused");
                json_reply(204, None)
            }
            VmState::Paused => chain(
                500,
                &[
                    "Error from API",
                    "The VM could not be paused",
                    "Cannot pause VM",
                    "Failed to pause migratable component",
                    "Invalid transition: InvalidStateTransition(Paused, Paused)",
                ],
            ),
            VmState::Created => chain(
                500,
                &[
                    "Error from API",
                    "The VM could not be paused",
                    "VM is not running",
                ],
            ),
        },
        "vm.resume" => match state {
            VmState::Paused => {
                *vmm.state.lock().unwrap() = VmState::Running;
                vmm.event("vm", "resuming");
                vmm.event("vm", "resumed");
                json_reply(204, None)
            }
            VmState::Running => chain(
                500,
                &[
                    "Error from API",
                    "The VM could not resume",
                    "Cannot resume VM",
                    "Failed to resume migratable component",
                    "Invalid transition: InvalidStateTransition(Running, Running)",
                ],
            ),
            VmState::Created => chain(
                500,
                &[
                    "Error from API",
                    "The VM could not resume",
                    "VM is not running",
                ],
            ),
        },
        "vm.reboot" => {
            if state == VmState::Created {
                return chain(
                    500,
                    &[
                        "Error from API",
                        "The VM could not reboot",
                        "VM is not running",
                    ],
                );
            }
            vmm.event("vm", "rebooting");
            tokio::spawn(Arc::clone(vmm).boot());
            json_reply(204, None)
        }
        "vm.boot" => {
            if state != VmState::Created {
                return chain(
                    500,
                    &[
                        "Error from API",
                        "The VM could not boot",
                        "VM is already running",
                    ],
                );
            }
            tokio::spawn(Arc::clone(vmm).boot());
            json_reply(204, None)
        }
        _ => chain(404, &["Not Found"]),
    }
}

/// HTTP/1.1 with keep-alive, as micro_http serves it.
async fn serve_conn(vmm: Arc<Vmm>, mut s: UnixStream) {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut words = head.split_whitespace();
        let (method, path) = (
            words.next().unwrap_or("").to_owned(),
            words.next().unwrap_or("").to_owned(),
        );
        let len = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        while buf.len() < head_end + 4 + len {
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head_end + 4 + len);
        if vmm.api_dead.load(std::sync::atomic::Ordering::SeqCst) {
            // The hung v39 VMM: the request is read, never answered.
            std::future::pending::<()>().await;
        }
        let reply = api(&vmm, &method, &path).await;
        if s.write_all(&reply).await.is_err() {
            return;
        }
    }
}

/// The shell on the console, as far as tests need one: echo what is typed
/// (a terminal in raw mode sends `\r` for Enter), run `echo X`, prompt.
/// The prompt of busybox `sh` for root in `/`, and the cursor position
/// query its line editor sends after it (`ESC [ 6 n`, as the real guest's
/// shell does); a terminal answers `ESC [ row ; col R`.
const PROMPT: &[u8] = b"/ # \x1b[6n";

async fn console_shell(vmm: Arc<Vmm>, mut input: mpsc::Receiver<Vec<u8>>) {
    let mut line = Vec::new();
    // An escape sequence being read, and whether the prompt's cursor query
    // is still unanswered (its answer is taken; any other is typed text,
    // as a surprise answer ends up in the real shell's command line).
    let mut esc: Option<Vec<u8>> = None;
    let mut asked = true;
    while let Some(bytes) = input.recv().await {
        if !vmm.shell.load(std::sync::atomic::Ordering::SeqCst) {
            // Nothing reads the guest's console.
            line.clear();
            continue;
        }
        let mut out = Vec::new();
        for b in bytes {
            if let Some(seq) = esc.as_mut() {
                seq.push(b);
                let done = seq.len() > 1 && (0x40..=0x7e).contains(&b) || seq.len() > 32;
                if done {
                    let seq = esc.take().unwrap_or_default();
                    if asked && seq.first() == Some(&b'[') && b == b'R' {
                        asked = false;
                    } else {
                        let text: Vec<u8> =
                            seq.into_iter().filter(|c| c.is_ascii_graphic()).collect();
                        line.extend_from_slice(&text);
                        out.extend_from_slice(&text);
                    }
                }
                continue;
            }
            match b {
                0x1b => esc = Some(Vec::new()),
                b'\r' | b'\n' => {
                    out.extend_from_slice(b"\r\n");
                    let cmd = String::from_utf8_lossy(&line).trim().to_owned();
                    line.clear();
                    if let Some(rest) = cmd.strip_prefix("echo ") {
                        out.extend_from_slice(rest.as_bytes());
                        out.extend_from_slice(b"\r\n");
                    } else if !cmd.is_empty() {
                        out.extend_from_slice(format!("sh: {cmd}: not found\r\n").as_bytes());
                    }
                    out.extend_from_slice(PROMPT);
                    asked = true;
                }
                0x7f | 0x08 => {
                    if line.pop().is_some() {
                        out.extend_from_slice(b"\x08 \x08");
                    }
                }
                b => {
                    // A line is bounded like a tty's (4 KiB); more is dropped.
                    if line.len() < 4096 {
                        line.push(b);
                    }
                    out.push(b);
                }
            }
        }
        if vmm.state() == VmState::Running && vmm.serial.send(out).await.is_err() {
            return;
        }
    }
}

/// Serial input from stdin, read only when it is a terminal (as
/// cloud-hypervisor's `--serial tty` does).
fn tty_input(tx: mpsc::Sender<Vec<u8>>) {
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(0) } != 1 {
        return;
    }
    std::thread::spawn(move || {
        use std::io::Read;
        // SAFETY: fd 0 stays open for the process's life; ManuallyDrop keeps it so.
        let mut stdin = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(0) });
        let mut buf = [0u8; 64];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
}

/// Serial output: to stdout, a file, or the socket client.
async fn serial_sink(
    vmm: Arc<Vmm>,
    mode: Serial,
    mut rx: mpsc::Receiver<Vec<u8>>,
    input: mpsc::Sender<Vec<u8>>,
) {
    match mode {
        Serial::Null => while rx.recv().await.is_some() {},
        Serial::Tty => {
            tty_input(input);
            let mut out = tokio::io::stdout();
            while let Some(b) = rx.recv().await {
                let _ = out.write_all(&b).await;
                let _ = out.flush().await;
            }
        }
        Serial::Pty(_) => {
            let Some(master) = PTY_MASTER.get() else {
                while rx.recv().await.is_some() {}
                return;
            };
            while let Some(b) = rx.recv().await {
                // Non-blocking: a full buffer (no reader) drops the rest.
                let _ = nix::unistd::write(master, &b);
            }
        }
        Serial::File(p) => {
            let Ok(mut f) = tokio::fs::File::create(&p).await else {
                return;
            };
            while let Some(b) = rx.recv().await {
                let _ = f.write_all(&b).await;
            }
        }
        Serial::Socket(p) => {
            let _ = std::fs::remove_file(&p);
            let Ok(listener) = UnixListener::bind(&p) else {
                return;
            };
            // v50+ keeps what the guest printed while no client was
            // connected; before, it is lost.
            let ring_size: usize = if release() >= 50 { 64 * 1024 } else { 0 };
            let mut ring = std::collections::VecDeque::<u8>::new();
            let mut client: Option<tokio::net::unix::OwnedWriteHalf> = None;
            let mut clients = 0u32;
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        if let Ok((c, _)) = accepted {
                            clients += 1;
                            if clients > 1 && release() < 50 {
                                vmm.serial_hangs.store(true, std::sync::atomic::Ordering::SeqCst);
                            }
                            let (mut r, mut w) = c.into_split();
                            let pending: Vec<u8> = ring.drain(..).collect();
                            if w.write_all(&pending).await.is_ok() {
                                // The previous client gets EOF.
                                client = Some(w);
                            }
                            let input = input.clone();
                            tokio::spawn(async move {
                                let mut buf = [0u8; 64];
                                while let Ok(n) = r.read(&mut buf).await {
                                    if n == 0 || input.send(buf[..n].to_vec()).await.is_err() {
                                        return;
                                    }
                                }
                            });
                        }
                    }
                    b = rx.recv() => {
                        let Some(b) = b else { return };
                        let sent = match client.as_mut() {
                            Some(c) => c.write_all(&b).await.is_ok(),
                            None => false,
                        };
                        if !sent {
                            client = None;
                            ring.extend(b);
                            let over = ring.len().saturating_sub(ring_size);
                            ring.drain(..over);
                        }
                    }
                }
            }
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Before anything else: when this process came to life.
    if let Some(path) = args
        .iter()
        .enumerate()
        .find_map(|(i, a)| match a.strip_prefix("--cmdline") {
            Some("") => args.get(i + 1).map(String::as_str),
            Some(v) => v.strip_prefix('='),
            None => None,
        })
        .and_then(|c| Knobs::parse(c).str("double.exec_log").map(str::to_owned))
    {
        let ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        if path == "stderr" {
            eprintln!("DOUBLE-EXEC {} {ns}", std::process::id());
        } else if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{} {ns}", std::process::id());
        }
    }
    if args.iter().any(|a| a == "--version" || a == "-V") {
        println!("cloud-hypervisor v{}.0", release());
        if release() >= 53 {
            println!("Migration Protocol Versions: 0");
        }
        return ExitCode::SUCCESS;
    }
    let cli = match parse_cli(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let config = match config(&cli) {
        Ok(c) => c,
        Err(chain) => return fail(&chain),
    };
    unsafe {
        libc::umask(0o077);
    }
    // One thread: benchmarks run a thousand of these.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(cli, config))
}

fn api_path(spec: &str) -> Result<Option<PathBuf>, Vec<String>> {
    if let Some(p) = spec.strip_prefix("path=") {
        return Ok(Some(p.into()));
    }
    if spec.starts_with("fd=") {
        return Err(vec![
            "the cloud-hypervisor double has no --api-socket fd=".into()
        ]);
    }
    Ok(Some(spec.into()))
}

async fn run(cli: Cli, config: Config) -> ExitCode {
    let knobs = Knobs::parse(&cli.cmdline);
    let api_path = match cli.api_socket.as_deref().map(api_path).transpose() {
        Ok(p) => p.flatten(),
        Err(chain) => return fail(&chain),
    };
    let events = match &cli.event_monitor {
        None => None,
        Some(spec) => {
            if let Some(fd) = spec.strip_prefix("fd=") {
                match fd.parse::<i32>() {
                    Ok(fd) => Some(unsafe { std::fs::File::from_raw_fd(fd) }),
                    Err(_) => return fail(&["Error parsing --event-monitor".into()]),
                }
            } else {
                let p = spec.strip_prefix("path=").unwrap_or(spec);
                match std::fs::File::create(p) {
                    Ok(f) => Some(f),
                    Err(e) => return fail(&["Error creating event monitor".into(), e.to_string()]),
                }
            }
        }
    };
    let (serial_tx, serial_rx) = mpsc::channel(16);
    let (input_tx, input_rx) = mpsc::channel(16);
    let (exit_tx, mut exit_rx) = mpsc::channel(4);
    // v46+ locks disk images for the VMM's life: a writable image in use
    // by another VMM (or twice here) refuses the start.
    let mut locks = Vec::new();
    if release() >= 46 {
        for d in &config.disks {
            let how = if d.readonly {
                libc::LOCK_SH
            } else {
                libc::LOCK_EX
            };
            let Ok(f) = std::fs::File::open(&d.path) else {
                continue;
            };
            // SAFETY: flock on a descriptor this process owns.
            if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), how | libc::LOCK_NB) } != 0
            {
                let kind = if d.readonly { "Read" } else { "Write" };
                return fail(&[
                    "Error booting VM".into(),
                    "The VM could not boot".into(),
                    "Error locking disk images: Another instance likely holds a lock".into(),
                    "Cannot lock images of all block devices".into(),
                    format!("Failed to get {kind} lock for disk image: {}", d.path),
                    "The file is already locked".into(),
                ]);
            }
            locks.push(f);
        }
    }
    let vmm = Arc::new(Vmm {
        state: Mutex::new(VmState::Created),
        ready: Mutex::new(false),
        shell: std::sync::atomic::AtomicBool::new(false),
        started: Instant::now(),
        config: config.clone(),
        serial: serial_tx,
        events: Mutex::new(events),
        exit: exit_tx,
        knobs,
        api_path: api_path.clone(),
        serial_hangs: Default::default(),
        api_dead: Default::default(),
        created: cli.kernel.is_some(),
        _locks: locks,
        cli,
    });
    vmm.event("vmm", "starting");

    if let Some(p) = &api_path {
        if let Some(ms) = vmm.knobs.num("double.api_delay_ms") {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        // A live instance on this socket: refuse, as v53 does.
        if UnixStream::connect(p).await.is_ok() {
            return fail(&["Error starting the VMM".into(), "ApiSocketInUse".into()]);
        }
        let _ = std::fs::remove_file(p);
        let listener = match UnixListener::bind(p) {
            Ok(l) => l,
            Err(e) => return fail(&["Error creating API socket".into(), e.to_string()]),
        };
        if release() >= 53 {
            // v53 locks the socket through `<socket>.lock`, left behind.
            let mut lock = p.clone().into_os_string();
            lock.push(".lock");
            let _ = std::fs::File::create(PathBuf::from(lock));
        }
        let v = Arc::clone(&vmm);
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(serve_conn(Arc::clone(&v), s));
            }
        });
    }
    tokio::spawn(serial_sink(
        Arc::clone(&vmm),
        config.serial.clone(),
        serial_rx,
        input_tx,
    ));
    tokio::spawn(console_shell(Arc::clone(&vmm), input_rx));

    // virtio-fs: connect to each vhost-user socket and hold it, as the VMM
    // does (virtiofsd serves until its frontend goes away).
    let mut fs_conns = Vec::new();
    for f in &vmm.cli.fs {
        let socket = f
            .split(',')
            .find_map(|kv| kv.strip_prefix("socket="))
            .unwrap_or_default()
            .to_owned();
        match std::os::unix::net::UnixStream::connect(&socket) {
            Ok(c) => fs_conns.push(c),
            Err(e) => {
                return fail(&[
                    "Error booting VM".into(),
                    "Cannot create virtio-fs device".into(),
                    format!("Failed to connect to vhost-user socket {socket}: {e}"),
                ])
            }
        }
    }

    if let Some(k) = vmm.cli.kernel.clone() {
        if let Err(e) = std::fs::File::open(&k).and_then(|f| f.metadata().map(|m| m.ino())) {
            eprintln!(
                "cloud-hypervisor: {:>11.6}s: <main> ERROR:cloud-hypervisor/src/lib.rs:24 -- Fatal error: VmBoot(KernelFile({e}))",
                vmm.started.elapsed().as_secs_f64()
            );
            // A failed boot leaves the API socket behind, as v53 does.
            return fail(&[
                "Error booting VM".into(),
                "The VM could not boot".into(),
                "Cannot open kernel file".into(),
                e.to_string(),
            ]);
        }
        if vmm.knobs.num("double.boot_fail").unwrap_or(0) != 0 {
            tokio::time::sleep(Duration::from_millis(30)).await;
            return fail(&[
                "Error booting VM".into(),
                "The VM could not boot".into(),
                "Cannot load the kernel into memory".into(),
                "Kernel Loader: failed to load bzImage kernel image: Kernel Loader: Invalid bzImage".into(),
            ]);
        }
        // v51+ on disks whose type it had to detect (its log, on stderr).
        for _ in vmm.config.disks.iter().filter(|d| d.sector0_refused) {
            for (line, w) in [
                (2756, "DEPRECATION: auto-detection of disk image type is deprecated and will be removed in a future release. Please specify image type explicitly."),
                (2761, "No image_type specified - detected as raw. Configuration updated to persist type across reboots and migrations."),
                (2769, "Autodetected raw image type. Disabling sector 0 writes."),
            ] {
                eprintln!(
                    "cloud-hypervisor: {:>11.6}s: <vmm> WARN:vmm/src/device_manager.rs:{line} -- {w}",
                    vmm.started.elapsed().as_secs_f64()
                );
            }
        }
        tokio::spawn(Arc::clone(&vmm).boot());
    }
    let crashes = match vmm.knobs.str("double.crash_while") {
        Some(path) => std::fs::read(path).is_ok_and(|b| b.trim_ascii() == b"broken"),
        None => true,
    };
    if let Some(ms) = vmm.knobs.num("double.crash_after_ms").filter(|_| crashes) {
        let v = Arc::clone(&vmm);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            match v.knobs.num("double.crash_code") {
                Some(code) => {
                    let _ = v.exit.send(code as u8).await;
                }
                None => {
                    eprintln!(
                        "cloud-hypervisor: {:>11.6}s: <vcpu0> ERROR:vmm/src/cpu.rs:1460 -- VCPU generated error: VcpuUnhandledKvmExit",
                        v.started.elapsed().as_secs_f64()
                    );
                    let _ = v.exit.send(0).await;
                }
            }
        });
    }

    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("signal");
    let mut int = signal(SignalKind::interrupt()).expect("signal");
    let code = tokio::select! {
        c = exit_rx.recv() => c.unwrap_or(0),
        _ = term.recv() => 0,
        _ = int.recv() => 0,
    };
    // Let the last serial lines and events out.
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop(fs_conns);
    if code == 0 {
        if let Some(p) = &vmm.api_path {
            let _ = std::fs::remove_file(p);
        }
        if let Serial::Socket(p) = &vmm.config.serial {
            let _ = std::fs::remove_file(p);
        }
    }
    ExitCode::from(code)
}
