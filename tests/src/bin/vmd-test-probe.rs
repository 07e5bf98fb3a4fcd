//! A process for supervisors to run in tests. Modes (first argument):
//!
//! * `record FILE ARGS...` — writes its argv, environment and working dir as
//!   JSON to FILE, then sleeps until signalled;
//! * `sleep MARKER` — sleeps; MARKER only makes it findable in /proc;
//! * `print OUT ERR` — prints OUT on stdout and ERR on stderr, then sleeps;
//! * `ignore-term MARKER [READY]` — ignores SIGTERM, then creates READY (if
//!   given), sleeps;
//! * `signal-log FILE` — once its signals are blocked, creates FILE.ready; writes the name
//!   of the first signal it gets to FILE and exits 0;
//! * `exit CODE` — exits with CODE at once;
//! * `--socket-path=S --shared-dir=D …` (virtiofsd's command line): writes
//!   its `/proc/self/status` to `S.status`, listens on `S`, and sleeps — a
//!   virtiofsd that shows how it was started. If `S.delay_ms` holds a
//!   number, it binds `S` only that many milliseconds later (a slow daemon).

use std::io::Write;
use std::time::Duration;

fn sleep_forever() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("");
    if let Some(socket) = mode.strip_prefix("--socket-path=") {
        let status = std::fs::read("/proc/self/status").expect("read own status");
        std::fs::write(format!("{socket}.status"), status).expect("write status");
        if let Some(ms) = std::fs::read_to_string(format!("{socket}.delay_ms"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
        {
            std::thread::sleep(Duration::from_millis(ms));
        }
        let _listener = std::os::unix::net::UnixListener::bind(socket).expect("bind socket");
        sleep_forever();
    }
    match mode {
        "record" => {
            let file = &args[2];
            let argv: Vec<String> = args.iter().map(|a| json_str(a)).collect();
            let env: Vec<String> = std::env::vars()
                .map(|(k, v)| format!("{}:{}", json_str(&k), json_str(&v)))
                .collect();
            let cwd = std::env::current_dir().unwrap_or_default();
            let doc = format!(
                "{{\"argv\":[{}],\"env\":{{{}}},\"cwd\":{}}}",
                argv.join(","),
                env.join(","),
                json_str(&cwd.to_string_lossy())
            );
            let tmp = format!("{file}.tmp");
            std::fs::write(&tmp, doc).expect("write record");
            std::fs::rename(&tmp, file).expect("rename record");
            sleep_forever();
        }
        "sleep" => sleep_forever(),
        "print" => {
            println!("{}", args[2]);
            eprintln!("{}", args[3]);
            let _ = std::io::stdout().flush();
            sleep_forever();
        }
        "ignore-term" => {
            unsafe {
                libc::signal(libc::SIGTERM, libc::SIG_IGN);
            }
            if let Some(ready) = args.get(3) {
                std::fs::write(ready, "").expect("write the ready mark");
            }
            sleep_forever();
        }
        "signal-log" => {
            let file = args[2].clone();
            let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
            let mut sig: libc::c_int = 0;
            unsafe {
                libc::sigemptyset(&mut set);
                for s in [
                    libc::SIGTERM,
                    libc::SIGINT,
                    libc::SIGHUP,
                    libc::SIGQUIT,
                    libc::SIGUSR1,
                ] {
                    libc::sigaddset(&mut set, s);
                }
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            }
            // From here on every signal is caught: say so.
            std::fs::write(format!("{file}.ready"), "").expect("write the ready mark");
            unsafe {
                libc::sigwait(&set, &mut sig);
            }
            let name = match sig {
                libc::SIGTERM => "SIGTERM",
                libc::SIGINT => "SIGINT",
                libc::SIGHUP => "SIGHUP",
                libc::SIGQUIT => "SIGQUIT",
                libc::SIGUSR1 => "SIGUSR1",
                _ => "other",
            };
            std::fs::write(file, name).expect("write signal log");
        }
        "exit" => std::process::exit(args[2].parse().unwrap_or(1)),
        _ => {
            eprintln!("vmd-test-probe: unknown mode {mode:?}");
            std::process::exit(2);
        }
    }
}
