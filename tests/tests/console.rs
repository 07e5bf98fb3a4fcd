//! The serial console shared by the shim: terminals attached to its console
//! socket (what the web console and `vmd ctl console` use), under a zinit
//! (double or real) with a cloud-hypervisor (double or real: `VMD_TEST_CH`,
//! `VMD_TEST_KERNEL`, `VMD_TEST_INITRD`; the real guest runs `gaction=shell`).

use std::time::{Duration, Instant};

use vmd_runtime::attach::AttachError;
use vmd_tests::terminal::Terminal;
use vmd_tests::vm::{alive, boot_timeout, real_ch, rss_kib, TestVm};
use vmd_tests::web::{shell_prompted, PROMPT};
use vmd_tests::Supervisor;

const SHORT: Duration = Duration::from_secs(10);

/// Waits until the shell of the guest's `n`th boot prompts (what is typed
/// before that reaches no one).
async fn shell_of_boot(t: &mut Terminal, n: usize) {
    let t0 = Instant::now();
    loop {
        let text = t.text();
        if shell_prompted(&text, n) {
            return;
        }
        assert!(
            t0.elapsed() < boot_timeout() + SHORT,
            "no shell prompt of boot {n}; seen:\n{}",
            vmd_tests::vm::tail(&text, 2000)
        );
        assert!(
            t.pump(Duration::from_millis(100)).await,
            "the console closed"
        );
    }
}

/// A word the guest cannot have printed unless it ran our command.
fn word(tag: &str) -> String {
    format!("vmd{tag}{}", std::process::id())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_gets_the_history_types_into_the_guest_and_survives_restarts() {
    let z = Supervisor::start();
    let vm = TestVm::new(&z, "tty", "gaction=shell");
    vm.start(&z).await;
    vm.wait_console(PROMPT, 1, boot_timeout()).await;

    // The past first: the boot is already in the log.
    let mut t = Terminal::attach(&vm.run.console_socket(), 80_000)
        .await
        .unwrap();
    shell_of_boot(&mut t, 1).await;
    let one = word("one");
    t.type_line(&format!("echo {one}"), boot_timeout()).await;
    // The command's echo and its output: two occurrences.
    t.wait_for(&one, 2, boot_timeout()).await;
    assert!(vm.console().matches(&one).count() >= 2, "not in the log");

    // A second terminal shares the session: it sees what the first typed.
    let mut other = Terminal::attach(&vm.run.console_socket(), 80_000)
        .await
        .unwrap();
    other.wait_for(&one, 2, SHORT).await;

    // The VMM is killed: the shim restarts it, the terminals stay attached
    // and see the new boot; typing works in it.
    let vmm = vm.vmm_pid(SHORT).await;
    unsafe {
        libc::kill(vmm, libc::SIGKILL);
    }
    shell_of_boot(&mut t, 2).await;
    let two = word("two");
    t.type_line(&format!("echo {two}"), boot_timeout()).await;
    t.wait_for(&two, 2, boot_timeout()).await;
    other.wait_for(&two, 2, SHORT).await;

    // The shim is killed: the stream ends; attaching again from where it
    // stopped gives neither a gap nor a repeat, and the VM's new boot.
    let shim = vm.shim_pid(&z).await;
    unsafe {
        libc::kill(shim, libc::SIGKILL);
    }
    t.wait_closed(SHORT).await;
    t.reattach(SHORT).await;
    shell_of_boot(&mut t, 3).await;
    let three = word("three");
    t.type_line(&format!("echo {three}"), boot_timeout()).await;
    t.wait_for(&three, 2, boot_timeout()).await;

    // Exactly the log: every byte the terminal got, in order, once.
    let log = std::fs::read(&vm.spec.console.log).unwrap();
    let from = t.from as usize;
    assert!(
        log[from..].starts_with(&t.seen),
        "what the terminal got is not the log from offset {from}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_that_never_reads_is_dropped_and_nobody_waits_for_it() {
    if real_ch() {
        eprintln!(
            "skipped: needs the double's console flood (double.flood_bps), a real guest has none"
        );
        return;
    }
    let z = Supervisor::start();
    // 8 MiB of console output at 4 MB/s (a reader keeps up with that).
    let vm = TestVm::new(
        &z,
        "flood",
        "gaction=wait double.boot_ms=1000 double.flood_bps=4000000 double.flood_bytes=8388608",
    );
    vm.start(&z).await;
    vm.wait_console("GUEST-HELLO", 1, SHORT).await;
    let socket = vm.run.console_socket();
    let mut reader = Terminal::attach(&socket, 0).await.unwrap();
    // Attached but never reading.
    let stuck = vmd_runtime::attach::attach(&socket, vmd_runtime::attach::Request::new(0), SHORT)
        .await
        .unwrap();
    let shim = vm.shim_pid(&z).await;
    let rss0 = rss_kib(shim);
    // The reader gets everything (it reads), the log gets everything.
    let t0 = Instant::now();
    let log = loop {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the flood stalled at {} bytes",
            reader.seen.len()
        );
        assert!(
            reader.pump(Duration::from_millis(200)).await,
            "the reader was dropped"
        );
        // Absolute offsets: the log rotates (8 MiB) meanwhile.
        let (start, end) = vmd_runtime::console::extent(&vm.spec.console.log).unwrap_or_default();
        if end >= 8 << 20 && reader.at() == end {
            break (start, std::fs::read(&vm.spec.console.log).unwrap());
        }
    };
    // What the log still holds is what the reader got last.
    let (start, log) = log;
    assert!(start >= reader.from);
    assert_eq!(&reader.seen[(start - reader.from) as usize..], &log[..]);
    // The stuck terminal was dropped: its stream ends after what fit in its
    // socket and queue, far less than the flood.
    let mut s = stuck.stream;
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        use tokio::io::AsyncReadExt;
        match tokio::time::timeout(SHORT, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got += n,
            Err(_) => panic!("the stuck terminal is still attached after {got} bytes"),
        }
    }
    assert!(
        got < 8 << 20,
        "the stuck terminal got {got} bytes: not dropped"
    );
    // Said once the terminal's socket is closed: a moment after its EOF.
    let client = z.client();
    vmd_tests::until(SHORT, "the shim says the terminal fell behind", || async {
        client
            .service_log(&vm.service)
            .await
            .is_ok_and(|ring| ring.iter().any(|l| l.contains("fell behind")))
    })
    .await;
    // Memory stayed bounded: the shim queued at most a few hundred KiB.
    let rss1 = rss_kib(shim);
    assert!(rss1 < rss0 + 8 * 1024, "shim rss {rss0} KiB -> {rss1} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminals_are_bounded_and_a_paste_neither_floods_nor_stalls() {
    let z = Supervisor::start();
    let vm = TestVm::new(&z, "paste", "gaction=shell gtick=1");
    vm.start(&z).await;
    vm.wait_console(PROMPT, 1, boot_timeout()).await;
    let socket = vm.run.console_socket();
    let mut all = Vec::new();
    for _ in 0..vmd_shim_max_viewers() {
        all.push(Terminal::attach(&socket, 0).await.unwrap());
    }
    match Terminal::attach(&socket, 0).await {
        Err(AttachError::Refused(e)) => assert!(e.contains("attached already"), "{e}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("one terminal more than the bound was attached"),
    }
    drop(all);
    // Detached terminals make room again (at the next attach).
    let mut watcher = Terminal::attach(&socket, 0).await.unwrap();

    // 10 MiB pasted at once by one terminal that does not read: it is
    // taken at the line's pace, the rest waits in that terminal's socket.
    let mut paster = Terminal::attach(&socket, 0).await.unwrap();
    let shim = vm.shim_pid(&z).await;
    let rss0 = rss_kib(shim);
    let paste = tokio::spawn(async move {
        let chunk = vec![b'x'; 64 << 10];
        for _ in 0..160 {
            if paster.send(&chunk).await.is_err() {
                break;
            }
        }
        paster
    });
    // Meanwhile the guest's console goes on for others (the double's and
    // the real guest's input are both echoed back, so output flows).
    let seen0 = watcher.seen.len();
    let t0 = Instant::now();
    while watcher.seen.len() < seen0 + 4096 {
        assert!(
            t0.elapsed() < boot_timeout(),
            "the console stalled during the paste"
        );
        watcher.pump(Duration::from_millis(200)).await;
    }
    assert!(
        !paste.is_finished(),
        "10 MiB taken at once: input is not paced"
    );
    let rss1 = rss_kib(shim);
    assert!(
        rss1 < rss0 + 8 * 1024,
        "shim rss {rss0} KiB -> {rss1} KiB during the paste"
    );
    paste.abort();
    // The shim is fine: a new terminal attaches at once.
    Terminal::attach(&socket, 0).await.unwrap();
    assert!(alive(shim));
}

/// The shim's bound on terminals (`vmd-shim`'s `MAX_VIEWERS`).
fn vmd_shim_max_viewers() -> usize {
    80
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmd_ctl_console_is_a_raw_terminal_that_detaches_and_restores() {
    use nix::sys::termios::{tcgetattr, LocalFlags};
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    let z = Supervisor::start();
    let vm = TestVm::new(&z, "ctl", "gaction=shell");
    vm.start(&z).await;
    vm.wait_console(PROMPT, 1, boot_timeout()).await;
    // vmd's runtime layout: <runtime>/vms/<name> is the run directory.
    let runtime = tempfile::tempdir().unwrap();
    std::fs::create_dir(runtime.path().join("vms")).unwrap();
    std::os::unix::fs::symlink(vm.run.path(), runtime.path().join("vms/ctl")).unwrap();

    let pty = nix::pty::openpty(None, None).unwrap();
    let before = tcgetattr(pty.slave.as_fd()).unwrap();
    assert!(before
        .local_flags
        .contains(LocalFlags::ECHO | LocalFlags::ICANON));
    let slave = std::fs::File::from(pty.slave.try_clone().unwrap());
    let mut child = std::process::Command::new(vmd_tests::bin("vmd"))
        .args(["ctl", "console", "ctl", "--runtime-dir"])
        .arg(runtime.path())
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave)
        .spawn()
        .unwrap();
    // The terminal's output, read on a thread (a pty read blocks).
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let mut master = std::fs::File::from(pty.master);
    let mut writer = master.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                return;
            }
        }
    });
    let mut screen = String::new();
    // The history first, with how to leave.
    wait(&mut screen, &mut rx, "GUEST-HELLO", 1).await;
    wait(&mut screen, &mut rx, "Ctrl-] detaches", 1).await;
    // Raw mode: no local echo, every key goes to the guest.
    let raw = tcgetattr(pty.slave.as_fd()).unwrap();
    assert!(!raw.local_flags.contains(LocalFlags::ECHO));
    assert!(!raw.local_flags.contains(LocalFlags::ICANON));
    let w = word("ctl");
    let line = format!("echo {w}");
    for (i, c) in line.char_indices() {
        writer.write_all(c.to_string().as_bytes()).unwrap();
        // Each key echoed by the guest before the next (a slow guest).
        let typed = &line[..i + c.len_utf8()];
        wait(&mut screen, &mut rx, typed, 1).await;
    }
    writer.write_all(b"\r").unwrap();
    wait(&mut screen, &mut rx, &w, 2).await;
    // Ctrl-] detaches; the terminal is as it was.
    writer.write_all(&[0x1d]).unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(t0.elapsed() < SHORT, "Ctrl-] did not detach");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}");
    let after = tcgetattr(pty.slave.as_fd()).unwrap();
    assert_eq!(after.local_flags, before.local_flags);
    assert_eq!(after.input_flags, before.input_flags);
    assert_eq!(after.output_flags, before.output_flags);
    // The guest only got what was typed before Ctrl-]; the VM runs on.
    assert!(vm.console().matches(&w).count() >= 2);
    assert!(vm.state().vmm.is_some_and(|v| v.alive()));

    // A VM that does not exist: a clear error, no terminal.
    let out = std::process::Command::new(vmd_tests::bin("vmd"))
        .args(["ctl", "console", "nosuchvm", "--runtime-dir"])
        .arg(runtime.path())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no vm nosuchvm on this host"), "{err}");
}

/// Waits until the terminal `screen` (fed by `rx`) shows `text` `times` times.
async fn wait(
    screen: &mut String,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    text: &str,
    times: usize,
) {
    let limit = boot_timeout();
    let t0 = Instant::now();
    while screen.matches(text).count() < times {
        let left = limit.saturating_sub(t0.elapsed());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(b)) => screen.push_str(&String::from_utf8_lossy(&b)),
            _ => panic!("{text:?} x{times} not on the terminal; it shows:\n{screen}"),
        }
    }
}
