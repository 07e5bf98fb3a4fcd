//! A zinit-compatible supervisor for tests: the CLI subset, control socket
//! line protocol, JSON bodies, state strings, process groups, 2 s respawn,
//! test polling, oneshots, `after` and the log ring of zinit v0.2.14.
//!
//! ```text
//! zinit-double [-s SOCKET] init [-c DIR] [-b LINES] [--container]
//! zinit-double [-s SOCKET] list | status SVC | log [-s] [SVC] | start|stop|forget|monitor SVC
//!              | kill SVC [SIGNAL] | shutdown | reboot
//! ```
//!
//! It never reboots anything: `shutdown`, `reboot` and (with --container)
//! SIGTERM/SIGINT/SIGHUP stop the services and exit, as zinit does in a container.

mod ring;
mod supervisor;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;

use clap::{Parser, Subcommand};
use nix::sys::signal::Signal;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use supervisor::{Error, Zinit};

#[derive(Parser)]
#[command(name = "zinit", about = "zinit-compatible supervisor (test double)")]
struct Cli {
    #[arg(short = 's', long = "socket", default_value = "/var/run/zinit.sock")]
    socket: PathBuf,
    #[arg(short = 'd', long = "debug")]
    debug: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Init {
        #[arg(short = 'c', long = "config", default_value = "/etc/zinit/")]
        config: PathBuf,
        #[arg(short = 'b', long = "buffer", default_value_t = 2000)]
        buffer: usize,
        #[arg(long)]
        container: bool,
    },
    List,
    Shutdown,
    Reboot,
    Status {
        service: String,
    },
    Stop {
        service: String,
    },
    Start {
        service: String,
    },
    /// As zinit 0.2.14's CLI: stop, then poll the status once a second, up
    /// to 20 times, until the process is gone; SIGKILL if it is not; start.
    Restart {
        service: String,
    },
    Forget {
        service: String,
    },
    Monitor {
        service: String,
    },
    Kill {
        service: String,
        #[arg(default_value = "SIGTERM")]
        signal: String,
    },
    Log {
        #[arg(short = 's', long = "snapshot")]
        snapshot: bool,
        filter: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let result = rt.block_on(async move {
        match cli.cmd {
            Cmd::Init {
                config,
                buffer,
                container,
            } => init(&cli.socket, &config, buffer, container).await,
            Cmd::List => {
                let body = command(&cli.socket, "list").await?;
                let map = body.as_object().cloned().unwrap_or_default();
                println!("---");
                for (k, v) in map {
                    println!(
                        "{}: {}",
                        yaml_str(&k),
                        yaml_str(v.as_str().unwrap_or_default())
                    );
                }
                Ok(())
            }
            Cmd::Shutdown => command(&cli.socket, "shutdown").await.map(drop),
            Cmd::Reboot => command(&cli.socket, "reboot").await.map(drop),
            Cmd::Status { service } => {
                print_status(command(&cli.socket, &format!("status {service}")).await?);
                Ok(())
            }
            Cmd::Stop { service } => command(&cli.socket, &format!("stop {service}"))
                .await
                .map(drop),
            Cmd::Start { service } => command(&cli.socket, &format!("start {service}"))
                .await
                .map(drop),
            Cmd::Restart { service } => restart(&cli.socket, &service).await,
            Cmd::Forget { service } => command(&cli.socket, &format!("forget {service}"))
                .await
                .map(drop),
            Cmd::Monitor { service } => command(&cli.socket, &format!("monitor {service}"))
                .await
                .map(drop),
            Cmd::Kill { service, signal } => {
                command(&cli.socket, &format!("kill {service} {signal}"))
                    .await
                    .map(drop)
            }
            Cmd::Log { snapshot, filter } => logs(&cli.socket, !snapshot, filter).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// A string scalar as serde_yaml 0.8 (yaml-rust's emitter) writes it.
fn yaml_str(s: &str) -> String {
    let specials = |c: char| {
        matches!(
            c,
            ':' | '{' | '}' | '[' | ']' | ',' | '#' | '`' | '"' | '\'' | '\\' | '\t' | '\n' | '\r'
        ) || (c as u32) < 0x20
    };
    let words = [
        "yes", "Yes", "YES", "no", "No", "NO", "True", "TRUE", "true", "False", "FALSE", "false",
        "on", "On", "ON", "off", "Off", "OFF", "null", "Null", "NULL", "~",
    ];
    let quote = s.is_empty()
        || s.starts_with(' ')
        || s.ends_with(' ')
        || s.starts_with(['&', '*', '?', '|', '-', '<', '>', '=', '!', '%', '@', '.'])
        || s.contains(specials)
        || words.contains(&s)
        || s.starts_with("0x")
        || s.parse::<i64>().is_ok()
        || s.parse::<f64>().is_ok();
    if quote {
        serde_json::Value::from(s).to_string()
    } else {
        s.to_owned()
    }
}

/// `zinit status` output: the Status struct in field order.
fn print_status(v: serde_json::Value) {
    println!("---");
    println!("name: {}", yaml_str(v["name"].as_str().unwrap_or_default()));
    println!("pid: {}", v["pid"]);
    println!(
        "state: {}",
        yaml_str(v["state"].as_str().unwrap_or_default())
    );
    println!(
        "target: {}",
        yaml_str(v["target"].as_str().unwrap_or_default())
    );
    match v["after"].as_object() {
        Some(after) if !after.is_empty() => {
            println!("after:");
            for (k, s) in after {
                println!(
                    "  {}: {}",
                    yaml_str(k),
                    yaml_str(s.as_str().unwrap_or_default())
                );
            }
        }
        _ => println!("after: {{}}"),
    }
}

async fn connect(socket: &Path) -> Result<UnixStream, String> {
    UnixStream::connect(socket).await.map_err(|e| {
        format!("failed to connect to '{socket:?}'. is zinit listening on that socket?: {e}")
    })
}

/// The client side of one command, as zinit's CLI does it.
async fn restart(socket: &Path, service: &str) -> Result<(), String> {
    command(socket, &format!("stop {service}")).await?;
    for _ in 0..20 {
        let st = command(socket, &format!("status {service}")).await?;
        if st["pid"].as_i64() == Some(0) && st["target"].as_str() == Some("Down") {
            return command(socket, &format!("start {service}")).await.map(drop);
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    command(socket, &format!("kill {service} SIGKILL")).await?;
    command(socket, &format!("start {service}")).await.map(drop)
}

async fn command(socket: &Path, line: &str) -> Result<serde_json::Value, String> {
    let mut s = connect(socket).await?;
    s.write_all(format!("{line}\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .await
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
    match v["state"].as_str() {
        Some("ok") => Ok(v["body"].clone()),
        _ => Err(v["body"].as_str().unwrap_or("invalid reply").to_owned()),
    }
}

async fn logs(socket: &Path, follow: bool, filter: Option<String>) -> Result<(), String> {
    if let Some(f) = &filter {
        command(socket, &format!("status {f}")).await?;
    }
    let mut s = connect(socket).await?;
    let cmd: &[u8] = if follow { b"log\n" } else { b"log snapshot\n" };
    s.write_all(cmd).await.map_err(|e| e.to_string())?;
    let prefix = filter.map(|f| format!("{f}:"));
    let mut lines = BufReader::new(s).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let keep = match &prefix {
            None => true,
            Some(p) => line
                .get(4..)
                .is_some_and(|rest| rest.starts_with(p.as_str())),
        };
        if keep {
            println!("{line}");
        }
    }
    Ok(())
}

async fn init(socket: &Path, config: &Path, buffer: usize, container: bool) -> Result<(), String> {
    let absolute = |p: &Path| -> Result<PathBuf, String> {
        if p.is_absolute() {
            Ok(p.to_path_buf())
        } else {
            Ok(std::env::current_dir().map_err(|e| e.to_string())?.join(p))
        }
    };
    let config = absolute(config)?;
    let socket = absolute(socket)?;
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("failed to create directory {dir:?}: {e}"))?;
    }
    let _ = std::fs::remove_file(&socket);
    // zinit works from its config dir: `monitor NAME` opens `NAME.yaml` there.
    std::env::set_current_dir(&config).map_err(|e| {
        format!(
            "failed to switch working directory to '{}': {e}",
            config.display()
        )
    })?;

    let zinit = Zinit::new(buffer);
    zinit.load_dir(&config).await;
    let listener =
        UnixListener::bind(&socket).map_err(|e| format!("failed to listen for socket: {e}"))?;
    let (exit_tx, mut exit_rx) = tokio::sync::mpsc::channel::<()>(1);
    if container {
        let (z, tx) = (zinit.clone(), exit_tx.clone());
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).expect("signal");
            let mut int = signal(SignalKind::interrupt()).expect("signal");
            let mut hup = signal(SignalKind::hangup()).expect("signal");
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
                _ = hup.recv() => {}
            }
            z.shutdown().await;
            let _ = tx.send(()).await;
        });
    }
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    tokio::spawn(handle(stream, zinit.clone(), exit_tx.clone()));
                }
            }
            _ = exit_rx.recv() => return Ok(()),
        }
    }
}

async fn handle(stream: UnixStream, zinit: Zinit, exit: tokio::sync::mpsc::Sender<()>) {
    let mut stream = BufReader::new(stream);
    let mut line = String::new();
    if stream.read_line(&mut line).await.is_err() {
        let _ = stream.get_mut().write_all(b"bad request").await;
        return;
    }
    let reply = match process(&line, &mut stream, &zinit, &exit).await {
        None => return,
        Some(Ok(body)) => ("ok", body),
        Some(Err(msg)) => ("error", serde_json::Value::String(msg)),
    };
    // zinit serialises a struct: "state" comes before "body".
    let reply = format!(
        r#"{{"state":{},"body":{}}}"#,
        serde_json::Value::from(reply.0),
        reply.1
    );
    let _ = stream.get_mut().write_all(reply.as_bytes()).await;
    let _ = stream.get_mut().flush().await;
}

/// `None`: the command wrote its own output (log).
async fn process(
    line: &str,
    stream: &mut BufReader<UnixStream>,
    zinit: &Zinit,
    exit: &tokio::sync::mpsc::Sender<()>,
) -> Option<Result<serde_json::Value, String>> {
    let Some(parts) = shlex::split(line) else {
        return Some(Err("invalid command syntax".into()));
    };
    let Some(verb) = parts.first() else {
        return Some(Err("unknown command".into()));
    };
    if verb == "log" {
        let follow = match parts.len() {
            1 => true,
            2 if parts[1] == "snapshot" => false,
            _ => return Some(Err("invalid log command arguments".into())),
        };
        let (lines, mut rx) = zinit.ring.stream();
        let out = stream.get_mut();
        for l in lines {
            if out.write_all(format!("{l}\n").as_bytes()).await.is_err() {
                return None;
            }
        }
        if !follow {
            return None;
        }
        loop {
            let l = match rx.recv().await {
                Ok(l) => l,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    std::sync::Arc::new(format!("[-] zinit: {n} lines dropped"))
                }
                Err(_) => break,
            };
            if out.write_all(format!("{l}\n").as_bytes()).await.is_err() {
                break;
            }
        }
        return None;
    }
    let unit = |r: Result<(), Error>| {
        r.map(|()| serde_json::Value::Null)
            .map_err(|e| e.to_string())
    };
    let result = match (verb.as_str(), parts.len()) {
        ("list", _) => {
            let map: serde_json::Map<String, serde_json::Value> = zinit
                .list()
                .await
                .into_iter()
                .map(|(k, v)| (k, serde_json::Value::String(v)))
                .collect();
            Ok(serde_json::Value::Object(map))
        }
        ("shutdown", _) | ("reboot", _) => {
            let (z, tx) = (zinit.clone(), exit.clone());
            tokio::spawn(async move {
                z.shutdown().await;
                let _ = tx.send(()).await;
            });
            Ok(serde_json::Value::Null)
        }
        ("start", 2) => unit(zinit.start(&parts[1]).await),
        ("stop", 2) => unit(zinit.stop(&parts[1]).await),
        ("forget", 2) => unit(zinit.forget(&parts[1]).await),
        ("status", 2) => zinit.status(&parts[1]).await.map_err(|e| e.to_string()),
        ("kill", 3) => match Signal::from_str(&parts[2].to_uppercase()) {
            Ok(sig) => unit(zinit.kill(&parts[1], sig).await),
            Err(e) => Err(e.to_string()),
        },
        ("monitor", 2) => match supervisor::load(Path::new(&format!("{}.yaml", parts[1]))) {
            Ok(svc) => unit(zinit.monitor(&parts[1], svc).await),
            Err(_) => Err("failed to load service config".into()),
        },
        _ => Err(format!("unknown command '{verb}' or wrong arguments count")),
    };
    Some(result)
}
