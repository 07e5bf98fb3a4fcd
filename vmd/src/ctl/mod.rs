//! `vmd ctl`: the operator's client. Human output by default, `--json` for
//! scripts. Exit status 0 on success, 1 when the call failed, 2 on usage.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde::Serialize;

use vmd::api::{self, Vm};
use vmd::stub::VmdStub;
use vmd::zbus::broker::Broker;
use vmd::zbus::client::ClientError;
use vmd::zbus::wire::ObjectId;

mod usage;

#[derive(Args)]
pub struct CtlArgs {
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Seconds to wait for each reply.
    #[arg(long, global = true, default_value_t = 30)]
    timeout: u64,
    /// Object to call (`manager`, or its alias `vmd`).
    #[arg(long, global = true, default_value = api::OBJECT)]
    object: String,
    #[command(subcommand)]
    op: Op,
}

#[derive(Subcommand)]
enum Op {
    /// Names of the VMs vmd manages.
    List,
    /// Details of one VM.
    Inspect { name: String },
    /// Whether a VM exists (exit status 0 if it does, 1 if not).
    Exists { name: String },
    /// Console log of a VM: the last 2 KiB, or all of it with --full;
    /// -f keeps printing what the VM prints.
    Logs {
        name: String,
        #[arg(long)]
        full: bool,
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// What every VM used since its VMM started: restarts, CPU seconds,
    /// memory, disk and network bytes.
    Metrics,
    /// What every VM uses now, refreshed like `top`: CPU, memory, disk and
    /// network per second, the busiest first.
    Top {
        /// Seconds between refreshes.
        #[arg(short = 'd', long, default_value_t = 2.0)]
        delay: f64,
        /// Refreshes before exiting (0: until Ctrl-C).
        #[arg(short = 'n', long, default_value_t = 0)]
        iterations: u64,
    },
    /// Start a VM described by a JSON file (the wire field names of `VM`).
    Run { file: PathBuf },
    /// Stop and remove a VM.
    Delete { name: String },
    /// Pause a VM.
    Lock { name: String },
    /// Resume a paused VM.
    Unlock { name: String },
    /// The zbus status object of vmd: objects and workers.
    Status,
    /// Lifecycle events: those the broker kept, then each as it happens
    /// (Ctrl-C stops). One line each: time, VM, sequence number, event,
    /// reason; `--json`: one JSON object per line.
    Events {
        /// Only this VM's.
        name: Option<String>,
        /// Only those after this sequence number of their VM.
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// Print what the broker kept and exit.
        #[arg(long)]
        no_follow: bool,
    },
    /// The log streams of a VM.
    Streams { name: String },
    /// Ship a VM's console to redis://host:port/channel, ws://… or wss://….
    StreamCreate {
        name: String,
        id: String,
        output: String,
        /// Network namespace to send from.
        #[arg(long, default_value = "")]
        namespace: String,
    },
    /// Stop a log stream.
    StreamDelete { id: String },
    /// An interactive terminal on a VM's serial console, the recent console
    /// first; Ctrl-] detaches. Talks to the VM's shim directly: works while
    /// vmd is down.
    Console {
        name: String,
        /// vmd's runtime directory (vmd's --runtime-dir).
        #[arg(long, default_value = "/var/run/vmd")]
        runtime_dir: PathBuf,
        /// Bytes of the past console to show first.
        #[arg(long, default_value_t = vmd_runtime::attach::DEFAULT_HISTORY)]
        history: u64,
    },
}

pub async fn run(broker: Broker, args: CtlArgs) -> ExitCode {
    if let Op::Events {
        name,
        since,
        no_follow,
    } = &args.op
    {
        let filter = vmd::events::subscribe::Filter {
            name: name.clone(),
            since: *since,
        };
        return events(&broker, filter, !no_follow, args.json).await;
    }
    let stub = VmdStub::new(broker)
        .with_object(ObjectId::new(args.object.clone(), api::VERSION))
        .with_timeout(Duration::from_secs(args.timeout.max(1)));
    match op(&stub, &args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmd ctl: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `vmd ctl events`: straight from the broker, where vmd publishes them.
async fn events(
    broker: &Broker,
    filter: vmd::events::subscribe::Filter,
    follow: bool,
    json: bool,
) -> ExitCode {
    use std::io::Write;
    let mut sub = match vmd::events::subscribe::Subscription::start(broker, filter, follow).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vmd ctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    while let Some(e) = sub.next().await {
        let line = if json {
            serde_json::json!({
                "name": e.name, "event": e.event, "seq": e.seq, "at": e.at, "reason": e.reason,
            })
            .to_string()
        } else {
            let at = time::OffsetDateTime::from_unix_timestamp(e.at)
                .ok()
                .and_then(|t| {
                    t.format(&time::format_description::well_known::Rfc3339)
                        .ok()
                })
                .unwrap_or_else(|| e.at.to_string());
            format!(
                "{at}  {:<24} #{:<5} {:<14} {}",
                e.name, e.seq, e.event, e.reason
            )
            .trim_end()
            .to_owned()
        };
        let mut out = std::io::stdout().lock();
        // A closed pipe (`| head`) ends it.
        if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
            return ExitCode::SUCCESS;
        }
    }
    if follow {
        eprintln!("vmd ctl: the broker went away");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

async fn console(name: &str, runtime_dir: &std::path::Path, history: u64) -> ExitCode {
    let vm = match vmd_runtime::VmName::new(name) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("vmd ctl: {e}");
            return ExitCode::from(2);
        }
    };
    let run = vmd_runtime::HostPaths::new("/", runtime_dir).run_dir(&vm);
    match crate::terminal::console(name, run, history).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmd ctl: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_json<T: Serialize>(v: &T) -> Result<(), ClientError> {
    let s = serde_json::to_string_pretty(v).map_err(|e| ClientError::Method(e.to_string()))?;
    println!("{s}");
    Ok(())
}

/// Polls `Logs` and prints what is new: the last 256 bytes seen anchor the
/// next tail. A VM printing more than 2 KiB between two polls leaves a gap,
/// which is marked.
async fn follow(stub: &VmdStub, name: &str) -> Result<(), ClientError> {
    use std::io::Write;
    let mut seen = String::new();
    loop {
        let cur = stub.logs(name).await?;
        let new = if seen.is_empty() {
            cur.as_str()
        } else {
            let anchor = &seen[seen.len().saturating_sub(256)..];
            match cur.rfind(anchor) {
                Some(i) => &cur[i + anchor.len()..],
                None if cur == seen => "",
                None => {
                    println!("[… vmd ctl: output skipped …]");
                    cur.as_str()
                }
            }
        };
        if !new.is_empty() {
            print!("{new}");
            let _ = std::io::stdout().flush();
            seen = cur.clone();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn op(stub: &VmdStub, args: &CtlArgs) -> Result<ExitCode, ClientError> {
    let json = args.json;
    match &args.op {
        Op::List => {
            let names = stub.list().await?;
            if json {
                print_json(&names)?;
            } else {
                println!("NAME");
                for n in names {
                    println!("{n}");
                }
            }
        }
        Op::Inspect { name } => {
            let info = stub.inspect(name).await?;
            if json {
                print_json(&info)?;
            } else {
                println!("name:      {name}");
                println!("cpu:       {}", info.cpu);
                println!("memory:    {} MiB", info.memory);
                println!("ht:        {}", info.ht_enabled);
                if let Some(s) = &info.state {
                    println!("state:     {s}");
                }
                if let Some(r) = &info.reason {
                    println!("reason:    {r}");
                }
                if let Some(n) = info.restarts {
                    println!("restarts:  {n}");
                }
                if let Some(p) = info.pid {
                    println!("pid:       {p}");
                }
                if let Some(u) = info.uptime_secs {
                    println!("uptime:    {u}s");
                }
                if let Some(c) = &info.console_url {
                    println!("console:   http://{c}/");
                }
                if let Some(e) = &info.console_error {
                    println!("console:   not listening: {e}");
                }
            }
        }
        Op::Exists { name } => {
            let yes = stub.exists(name).await?;
            if json {
                print_json(&yes)?;
            } else {
                println!("{yes}");
            }
            return Ok(if yes {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        Op::Logs {
            name, follow: true, ..
        } => {
            follow(stub, name).await?;
        }
        Op::Logs { name, full, .. } => {
            let text = if *full {
                stub.logs_full(name).await?
            } else {
                stub.logs(name).await?
            };
            if json {
                print_json(&text)?;
            } else {
                print!("{text}");
                if !text.ends_with('\n') {
                    println!();
                }
            }
        }
        Op::Metrics => {
            let m = stub.usage().await?;
            if json {
                print_json(&m)?;
            } else {
                usage::print_totals(&m);
            }
        }
        Op::Top { delay, iterations } => {
            if !delay.is_finite() || *delay < 0.1 {
                return Err(ClientError::Method("--delay must be at least 0.1 s".into()));
            }
            usage::top(stub, Duration::from_secs_f64(*delay), *iterations, json).await?;
        }
        Op::Run { file } => {
            let text = std::fs::read_to_string(file)
                .map_err(|e| ClientError::Method(format!("cannot read {}: {e}", file.display())))?;
            let vm: Vm = serde_json::from_str(&text).map_err(|e| {
                ClientError::Method(format!("{} is not a VM description: {e}", file.display()))
            })?;
            let info = stub.run(&vm).await?;
            if json {
                print_json(&info)?;
            } else {
                println!("started {}", vm.name);
                if !info.console_url.is_empty() {
                    println!("console: {}", info.console_url);
                }
            }
        }
        Op::Delete { name } => {
            stub.delete(name).await?;
            if !json {
                println!("deleted {name}");
            }
        }
        Op::Lock { name } => {
            stub.lock(name, true).await?;
            if !json {
                println!("paused {name}");
            }
        }
        Op::Unlock { name } => {
            stub.lock(name, false).await?;
            if !json {
                println!("resumed {name}");
            }
        }
        Op::Streams { name } => {
            let streams = stub.inspect(name).await?.streams.unwrap_or_default();
            if json {
                print_json(&streams)?;
            } else {
                println!(
                    "{:<20} {:<9} {:>12} {:>12} {:>12} OUTPUT",
                    "ID", "CONNECTED", "SENT B", "DROPPED B", "REJECTED B"
                );
                for s in streams {
                    println!(
                        "{:<20} {:<9} {:>12} {:>12} {:>12} {}",
                        s.id,
                        s.connected,
                        s.sent_bytes,
                        s.dropped_bytes,
                        s.rejected_bytes,
                        s.output
                    );
                }
            }
        }
        Op::StreamCreate {
            name,
            id,
            output,
            namespace,
        } => {
            let stream = vmd::api::Stream {
                id: id.clone(),
                namespace: namespace.clone(),
                output: output.clone(),
            };
            stub.stream_create(name, &stream).await?;
            if !json {
                println!("streaming {name} to {output} as {id}");
            }
        }
        Op::StreamDelete { id } => {
            stub.stream_delete(id).await?;
            if !json {
                println!("deleted stream {id}");
            }
        }
        // Not through the bus: the shim, directly.
        Op::Console {
            name,
            runtime_dir,
            history,
        } => return Ok(console(name, runtime_dir, *history).await),
        Op::Events { .. } => unreachable!("answered in run"),
        Op::Status => {
            let st = stub.status().await?;
            if json {
                print_json(&st)?;
            } else {
                let objects: Vec<String> = st.objects.iter().map(|o| o.to_string()).collect();
                println!("objects: {}", objects.join(", "));
                println!("{:<4} {:<5} {:<32} ACTION", "#", "STATE", "SINCE");
                for (i, w) in st.workers.iter().enumerate() {
                    let state = match w.state {
                        vmd::zbus::wire::WorkerState::Free => "free",
                        vmd::zbus::wire::WorkerState::Busy => "busy",
                    };
                    println!(
                        "{:<4} {:<5} {:<32} {}",
                        i,
                        state,
                        w.start_time.to_rfc3339(),
                        w.action
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
