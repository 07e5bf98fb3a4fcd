//! `vmd --broker unix:///var/run/redis.sock` runs the daemon (as the Zero-OS
//! zinit unit does); `vmd ctl ...` is the operator client.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio::sync::watch;
use tracing::{error, info};

use vmd::api;
use vmd::module::ModuleService;
use vmd::vm::{reconcile, Host, Manager, Settings};
use vmd::zbus::broker::Broker;
use vmd::zbus::server::{Server, ServerConfig};
use vmd::zbus::wire::ObjectId;
use vmd_runtime::layout::resolve_program;
use vmd_runtime::HostPaths;

mod ctl;
mod terminal;

#[derive(Parser)]
#[command(
    name = "vmd",
    version,
    about = "Virtual-machine daemon, driven over zbus"
)]
struct Cli {
    /// Redis broker: unix:///path or tcp://host:port.
    #[arg(
        long,
        global = true,
        env = "VMD_BROKER",
        default_value = "unix:///var/run/redis.sock"
    )]
    broker: Broker,

    #[command(flatten)]
    daemon: DaemonArgs,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Args)]
struct DaemonArgs {
    /// Where vmd keeps VM descriptions, cloud-init images and console logs.
    #[arg(long, default_value = "/var/cache/modules/vmd")]
    root: PathBuf,
    /// Runtime directory: API sockets, pids, per-VM runtime files.
    #[arg(long, default_value = "/var/run/vmd")]
    runtime_dir: PathBuf,
    /// Where the VMMs' REST API sockets go (`<dir>/<name>`): where the Go
    /// VM module looks for them.
    #[arg(long, default_value = "/var/run/cloud-hypervisor")]
    api_socket_dir: PathBuf,
    /// The Go VM module's config directory (a tmpfs on Zero-OS): vmd keeps
    /// each VM's config there in the Go format, so that a node rolled back
    /// to the Go module adopts vmd's VMs instead of killing them; `none`:
    /// not kept.
    #[arg(long, default_value = "/var/run/cache/vmd")]
    go_config_dir: PathBuf,
    /// zinit control socket.
    #[arg(long, default_value = "/var/run/zinit.sock")]
    zinit_socket: PathBuf,
    /// zinit configuration directory (service files).
    #[arg(long, default_value = "/etc/zinit")]
    zinit_dir: PathBuf,
    /// The vmd-shim binary (default: next to vmd, else on PATH).
    #[arg(long)]
    shim: Option<PathBuf>,
    /// The cloud-hypervisor binary the shims run.
    #[arg(long, default_value = "cloud-hypervisor")]
    cloud_hypervisor: PathBuf,
    /// The virtiofsd binary for virtio-fs shares and boot.
    #[arg(long, default_value = "virtiofsd")]
    virtiofsd: PathBuf,
    /// The vmd-logstream binary (default: next to vmd, else on PATH).
    #[arg(long)]
    logstream: Option<PathBuf>,
    /// Where named network namespaces are (for streams with a Namespace).
    #[arg(long, default_value = "/var/run/netns")]
    netns_dir: PathBuf,
    /// The Zero-OS network module asked where a VM's web console goes
    /// (`<module>.network@0.0.1` on the broker); `none`: no web console.
    #[arg(long, default_value = "network")]
    network_module: String,
    /// Seconds each call to the network module may take.
    #[arg(long, default_value_t = 5)]
    network_timeout_secs: u64,
    /// The Zero-OS provisioning engine (`<module>.provision@0.0.1` on the
    /// broker), asked whether each VM's workload still exists: VMs of
    /// deleted workloads are deleted, as the Go module's monitor does;
    /// `none`: never asked.
    #[arg(long, default_value = "provision")]
    provision_module: String,
    /// Seconds each call to provisiond may take.
    #[arg(long, default_value_t = 5)]
    provision_timeout_secs: u64,
    /// Seconds between two passes asking provisiond about every VM (the Go
    /// module asks every 10 s); a pass is spread over this time, at most
    /// 100 asks a second.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=86400))]
    reap_interval_secs: u64,
    /// A VM reported to provisiond as failed (`SetWorkloadError`) is started
    /// again this long after the report (PR #96's cooldown: 6 h), and
    /// reported `SetWorkloadOk` once it runs.
    #[arg(long, default_value_t = 6 * 3600)]
    failed_retry_secs: u64,
    /// The vmd-console binary (default: next to vmd, else on PATH).
    #[arg(long)]
    console_server: Option<PathBuf>,
    /// The web console page's files (a `console/web` directory after
    /// `npm ci`), in place of the page built into vmd-console.
    #[arg(long)]
    console_assets: Option<PathBuf>,
    /// Extra CA certificates (PEM) trusted for wss stream receivers.
    #[arg(long)]
    stream_ca_file: Option<PathBuf>,
    /// Seconds a stopping guest gets to power off before it is forced.
    #[arg(long, default_value_t = 30)]
    grace_secs: u64,
    /// A VM that stops this many times within --restart-window-secs is
    /// marked failed instead of being restarted.
    #[arg(long, default_value_t = 5)]
    restart_max: u32,
    #[arg(long, default_value_t = 300)]
    restart_window_secs: u64,
    /// Rotate a console log past this size, keeping --log-keep-bytes of it.
    #[arg(long, default_value_t = 8 << 20)]
    log_rotate_bytes: u64,
    #[arg(long, default_value_t = 4 << 20)]
    log_keep_bytes: u64,
    /// Where tap devices are looked up.
    #[arg(long, default_value = "/sys/class/net")]
    sys_net: PathBuf,
    /// Where PCI devices are looked up.
    #[arg(long, default_value = "/sys/bus/pci/devices")]
    sys_pci: PathBuf,
    /// Changes (Run, Delete, Lock, StreamCreate, StreamDelete) in flight at
    /// once, at most; one more is refused at once with a method error. Reads
    /// never wait for changes, and changes of one VM run one after the other.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=65536))]
    max_changes: u32,
    /// After SIGTERM, how long calls in flight may still take before vmd
    /// exits; what is unfinished stays in flight in Redis and the next vmd
    /// serves it. Below `zinit restart`'s 20 s, so a restart is never a kill.
    #[arg(long, default_value_t = 5)]
    drain_secs: u64,
    /// Requests an earlier vmd took and did not answer are served by the
    /// next one if taken less than this long ago; older ones are dropped.
    /// The reply list of a Go caller lives 300 s, and no Zero-OS caller
    /// waits longer than that for the VM module.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86400))]
    replay_max_age_secs: u64,
    /// Log streams of one VM at most (each is a process and a zinit
    /// service); one more is refused with a method error.
    #[arg(long, default_value_t = 16)]
    max_streams_per_vm: usize,
    /// Where a VM's kernel, initrd, disks and shares may be on the host
    /// (repeat for several; replaces the defaults): resolved paths under one
    /// of these, never inside vmd's own directories. The defaults are where
    /// a Zero-OS node keeps them: storage pools (/mnt/<pool>: volumes and
    /// vdisks) and mounted flists (/var/cache/modules/flistd).
    #[arg(long = "allowed-path", default_values = vmd::vm::plan::allowed::ZOS_ALLOWED)]
    allowed_path: Vec<PathBuf>,
    /// Log streams of the host at most.
    #[arg(long, default_value_t = 1024)]
    max_streams: usize,
    /// Lifecycle events the broker keeps for `vmd ctl events` to replay
    /// (a Redis stream, trimmed to about this many); 0 keeps none.
    #[arg(long, default_value_t = 10_000)]
    event_history: usize,
    /// The VMs' own users, one per VM, `FIRST-LAST`: uid u runs the VM's
    /// VMM with group u, and group u + (LAST - FIRST + 1) reads its console
    /// log, so the next as many ids are taken too. The default ranges are
    /// far above the users of a Zero-OS node and the usual container
    /// ranges, and below --stream-uid.
    #[arg(long, default_value = "1879048192-1879113727", value_parser = parse_uid_range)]
    vmm_uids: (u32, u32),
    /// The uid the log stream workers drop to once in their network
    /// namespace (with their VM's log group only).
    #[arg(long, default_value_t = 1879179264)]
    stream_uid: u32,
    /// Run every VMM as root in the shim's mount namespace (without
    /// capabilities, as before): only for hosts where the jail cannot work.
    #[arg(long)]
    no_vmm_jail: bool,
    /// The network namespace (a file such as /var/run/netns/NAME) the VMs'
    /// taps are in, when it is not vmd's own.
    #[arg(long)]
    tap_netns: Option<PathBuf>,
    /// The taps' counters for `Metrics`, in `/proc/net/dev`'s format: one
    /// read for all of them (the same kernel counters as
    /// `<sys-net>/<tap>/statistics`), in --tap-netns when it is given.
    #[arg(long, default_value = "/proc/thread-self/net/dev")]
    net_dev: PathBuf,
    /// Serve OpenMetrics (`GET /metrics`, for Prometheus) on `IP:PORT` or
    /// `unix:/PATH` (mode 0600). Off by default: an open port is for the
    /// operator to choose, on the address of the network they scrape from.
    #[arg(long)]
    metrics_listen: Option<vmd::openmetrics::Listen>,
    /// Log filter (tracing syntax, e.g. `info`, `vmd=debug`); RUST_LOG wins.
    #[arg(long, default_value = "info")]
    log: String,
}

/// `FIRST-LAST`, an inclusive range of uids that are neither root nor the
/// kernel's `-1`.
fn parse_uid_range(s: &str) -> Result<(u32, u32), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: expected FIRST-LAST"))?;
    let num = |x: &str| x.trim().parse::<u32>().map_err(|e| format!("{x:?}: {e}"));
    let (a, b) = (num(a)?, num(b)?);
    // The log groups follow: b + (b - a + 1) must stay below u32::MAX.
    let fits = b >= a && b.checked_add(b - a + 1).is_some_and(|top| top < u32::MAX);
    if a == 0 || !fits {
        return Err(format!(
            "{s:?}: the range must be FIRST <= LAST, above 0, with as many ids after it below 4294967295"
        ));
    }
    Ok((a, b))
}

#[derive(Subcommand)]
enum Command {
    /// Operator client: talk to a running vmd.
    Ctl(ctl::CtlArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The front (the bus: pops, replies, status, cheap reads) runs on this
    // thread alone; the pool runs what may take long. See `zbus::server`.
    let runtimes = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .and_then(|front| {
            let pool = tokio::runtime::Builder::new_multi_thread()
                .thread_name("vmd-pool")
                .enable_all()
                .build()?;
            Ok((front, pool))
        });
    let (front, pool) = match runtimes {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match cli.command {
        Some(Command::Ctl(args)) => front.block_on(ctl::run(cli.broker, args)),
        None => {
            init_tracing(&cli.daemon.log);
            match front.block_on(daemon(cli.broker, cli.daemon, pool.handle().clone())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    };
    // Calls still running after the drain are given up, as the server said.
    pool.shutdown_background();
    code
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Under zinit stderr is a pipe into its ring: no colour codes there.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Raises the soft limit of open files to the hard one, as Go's runtime
/// does for the module vmd replaces: the metrics collector keeps two
/// `/proc` files open per VM within it (`vm::metrics`), and a node runs
/// hundreds of VMs.
fn raise_open_files_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => info!(from = soft, to = hard, "raised the open files limit"),
            Err(e) => tracing::warn!(error = %e, "cannot raise the open files limit"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open files limit"),
    }
}

async fn daemon(
    broker: Broker,
    args: DaemonArgs,
    pool: tokio::runtime::Handle,
) -> anyhow::Result<()> {
    raise_open_files_limit();
    info!(
        root = %args.root.display(),
        runtime_dir = %args.runtime_dir.display(),
        zinit_socket = %args.zinit_socket.display(),
        zinit_dir = %args.zinit_dir.display(),
        "vmd starting"
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("signal received; stopping (a second signal exits at once)");
        let _ = stop_tx.send(true);
        wait_for_signal().await;
        std::process::exit(130);
    });

    let sibling = |given: &Option<PathBuf>, name: &str| -> anyhow::Result<PathBuf> {
        let p = match given {
            Some(p) => p.clone(),
            None => std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(|d| d.join(name)))
                .filter(|p| p.exists())
                .unwrap_or_else(|| PathBuf::from(name)),
        };
        resolve_program(&p).with_context(|| format!("{name} not found ({})", p.display()))
    };
    let shim = sibling(&args.shim, "vmd-shim")?;
    let logstream = sibling(&args.logstream, "vmd-logstream")?;
    // A missing console server is not fatal: each VM's console reports it.
    let console_server = sibling(&args.console_server, "vmd-console").unwrap_or_else(|_| {
        let p = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("vmd-console")))
            .unwrap_or_else(|| PathBuf::from("/usr/bin/vmd-console"));
        tracing::warn!(server = %p.display(), "vmd-console not found: web consoles will not start");
        p
    });
    let hypervisor = resolve_program(&args.cloud_hypervisor).unwrap_or_else(|| {
        tracing::warn!(
            hypervisor = %args.cloud_hypervisor.display(),
            "cloud-hypervisor not found: VMs will fail to start until it is installed"
        );
        args.cloud_hypervisor.clone()
    });
    if args.log_keep_bytes >= args.log_rotate_bytes {
        anyhow::bail!("--log-keep-bytes must be below --log-rotate-bytes");
    }
    let host = Host {
        paths: HostPaths::new(&args.root, &args.runtime_dir),
        zinit_dir: args.zinit_dir.clone(),
        zinit_socket: args.zinit_socket.clone(),
        shim,
        hypervisor,
        logstream,
        virtiofsd: resolve_program(&args.virtiofsd),
        netns_dir: args.netns_dir.clone(),
        stream_ca_file: args.stream_ca_file.clone(),
        console: vmd::vm::host::ConsoleHost {
            server: console_server,
            assets: args
                .console_assets
                .as_ref()
                .map(|a| std::path::absolute(a).unwrap_or_else(|_| a.clone())),
        },
        api_socket_dir: args.api_socket_dir.clone(),
        go_config_dir: (args.go_config_dir.as_os_str() != "none")
            .then(|| args.go_config_dir.clone()),
        // Giving a process another uid and its own mounts takes root.
        jail: (!args.no_vmm_jail && nix::unistd::geteuid().is_root()).then(|| {
            vmd_runtime::spec::JailSpec {
                first_uid: args.vmm_uids.0,
                uids: args.vmm_uids.1 - args.vmm_uids.0 + 1,
                lock_dir: args.runtime_dir.join("vmm-uids"),
                confine_vmm: true,
            }
        }),
        tap_netns: args.tap_netns.clone(),
        net_dev: args.net_dev.clone(),
        stream_uid: nix::unistd::geteuid().is_root().then_some(args.stream_uid),
    };
    let settings = Settings {
        grace_secs: args.grace_secs,
        restart: vmd_runtime::spec::RestartPolicy {
            max_exits: args.restart_max.max(1),
            window_secs: args.restart_window_secs,
            ..Default::default()
        },
        log_rotate_bytes: args.log_rotate_bytes,
        log_keep_bytes: args.log_keep_bytes,
        sys_net: args.sys_net.clone(),
        sys_pci: args.sys_pci.clone(),
        max_streams_per_vm: args.max_streams_per_vm,
        max_streams: args.max_streams,
        allowed_paths: args.allowed_path.clone(),
    };
    let events = vmd::events::Events::start(
        broker.clone(),
        args.event_history,
        host.paths.clone(),
        &pool,
    );
    let mut manager =
        Manager::new(host, settings, events).context("cannot prepare vmd's directories")?;
    if args.network_module != "none" {
        let networker = vmd::network::Networker::new(
            broker.clone(),
            &args.network_module,
            Duration::from_secs(args.network_timeout_secs.max(1)),
            manager.telemetry().peers.clone(),
        );
        manager = manager.with_network(networker);
    }
    let manager = Arc::new(manager);
    // Whether log streams deliver, as their workers save their progress.
    vmd::events::streams::spawn(manager.events().clone(), manager.paths().clone(), &pool);

    let mut config = ServerConfig::new(api::MODULE);
    config.max_changes = args.max_changes as usize;
    config.drain_timeout = Duration::from_secs(args.drain_secs);
    config.replay_max_age = Duration::from_secs(args.replay_max_age_secs);
    config.pool = Some(pool.clone());
    if let Some(listen) = args.metrics_listen.clone() {
        let exporter = vmd::openmetrics::Exporter::new(Arc::clone(&manager), config.stats.clone());
        // Bound now, so that a port in use stops vmd with a clear error;
        // served on the pool, off the thread that answers zbus calls.
        let listener = exporter.bind(&listen).context("the OpenMetrics endpoint")?;
        pool.spawn(exporter.serve(listener));
    }
    let service = Arc::new(ModuleService(Arc::clone(&manager)));
    let mut server = Server::new(broker.clone(), config);
    server
        .register(ObjectId::new(api::OBJECT, api::VERSION), service.clone())
        .register(ObjectId::new(api::OBJECT_ALIAS, api::VERSION), service);
    // On a node the Go VM module ran: its VMs become vmd's, their guests
    // running on (vmd::vm::takeover). Before serving: a caller's first
    // Exists already sees them.
    let taken = manager.take_over(std::path::Path::new("/proc")).await;
    if !taken.is_empty() {
        info!(vms = ?taken, "took over the Go VM module's VMs");
    }
    // Serve at once: the VMs to finish (interrupted Deletes, Runs to roll
    // back) are held by their keys from here on and finished in the
    // background; only calls changing one of them wait, for that one.
    let plan = reconcile::plan(&manager, &server.locks());
    info!(pending = plan.pending(), "reconciling in the background");
    // Every VM's shim is watched from now on; each watch resumes after the
    // last event published, so what happened while vmd was away goes out.
    for name in manager.names() {
        drop(manager.events().follow(&name, false));
    }
    let _reconciling = reconcile::spawn(&pool, Arc::clone(&manager), server.locks(), plan);
    let _reaping = (args.provision_module != "none").then(|| {
        let provision = vmd::provision::Provision::new(
            broker.clone(),
            &args.provision_module,
            Duration::from_secs(args.provision_timeout_secs.max(1)),
            manager.telemetry().peers.clone(),
        );
        vmd::vm::workloads::spawn(
            &pool,
            Arc::clone(&manager),
            server.locks(),
            Arc::new(provision),
            Duration::from_secs(args.reap_interval_secs),
            Duration::from_secs(args.failed_retry_secs),
        )
    });
    server.run(stop_rx).await.context("zbus server")?;
    info!("vmd stopped");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process still dies on the default
        // action; there is nothing to wait for.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
