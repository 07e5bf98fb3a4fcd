//! A real `redis-server` for one test, on a unix socket in a temp dir.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmd::zbus::broker::Broker;

pub struct RedisServer {
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// A loopback TCP port, for tests that need `redis://host:port`.
    tcp_port: Option<u16>,
    /// Commands this server does not have (as an older Redis).
    without: Vec<String>,
}

fn redis_binary() -> PathBuf {
    std::env::var_os("VMD_TEST_REDIS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("redis-server"))
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_without(&[])
    }

    /// A Redis without `commands` (renamed away, so they are unknown), as an
    /// older Redis would be: `BLMPOP` came in 7.0, `LPOP key count` in 6.2.
    pub fn start_without(commands: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vmd-redis-")
            .tempdir()
            .expect("temp dir");
        let mut s = RedisServer {
            dir,
            child: None,
            tcp_port: None,
            without: commands.iter().map(|c| c.to_string()).collect(),
        };
        s.spawn();
        s
    }

    /// A Redis that also listens on 127.0.0.1:<port>.
    pub fn start_tcp() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vmd-redis-")
            .tempdir()
            .expect("temp dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut s = RedisServer {
            dir,
            child: None,
            tcp_port: Some(port),
            without: Vec::new(),
        };
        s.spawn();
        s
    }

    pub fn tcp_port(&self) -> u16 {
        self.tcp_port.expect("started with start_tcp")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("redis.sock")
    }

    pub fn broker(&self) -> Broker {
        Broker::unix(self.socket())
    }

    pub fn url(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn spawn(&mut self) {
        let sock = self.socket();
        let _ = std::fs::remove_file(&sock);
        let mut cmd = Command::new(redis_binary());
        let port = self.tcp_port.unwrap_or(0).to_string();
        cmd.args([
            "--port",
            &port,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--unixsocket")
        .arg(&sock)
        .args(["--unixsocketperm", "700"])
        .arg("--dir")
        .arg(self.dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
        for c in &self.without {
            cmd.args(["--rename-command", c, ""]);
        }
        // If the test process dies, Redis goes with it.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .expect("cannot start redis-server (apt-get install -y redis-server)");
        self.child = Some(child);
        wait_for_socket(&sock);
    }

    /// Kills Redis (SIGKILL: nothing is flushed, clients see the connection drop).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills and starts Redis again on the same socket, empty.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

fn wait_for_socket(sock: &Path) {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        if let Ok(mut s) = std::os::unix::net::UnixStream::connect(sock) {
            use std::io::{Read, Write};
            let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
            if s.write_all(b"PING\r\n").is_ok() {
                let mut buf = [0u8; 7];
                if s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n" {
                    return;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("redis-server did not come up on {}", sock.display());
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The in-flight lists of vmd's manager queue: one per take that still holds
/// a request (`docs/calls.md`).
pub async fn in_flight_lists(c: &mut redis::aio::MultiplexedConnection) -> Vec<String> {
    let mut cursor = 0u64;
    let mut lists = Vec::new();
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg("vmd.manager@0.0.1:inflight:*")
            .arg("COUNT")
            .arg(1000)
            .query_async(c)
            .await
            .expect("SCAN");
        lists.extend(keys);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    lists.sort();
    lists.dedup();
    lists
}

/// How many requests vmd's manager queue has taken and not yet answered.
pub async fn requests_in_flight(c: &mut redis::aio::MultiplexedConnection) -> usize {
    let mut n = 0;
    for list in in_flight_lists(c).await {
        let len: usize = redis::cmd("LLEN")
            .arg(&list)
            .query_async(c)
            .await
            .expect("LLEN");
        n += len;
    }
    n
}

/// Puts `payload` in flight as a take of a dead vmd that began `age` ago
/// would have left it.
pub async fn leave_in_flight(
    c: &mut redis::aio::MultiplexedConnection,
    age: Duration,
    payload: &[u8],
) {
    let taken = std::time::SystemTime::now() - age;
    let ms = taken
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis();
    let _: () = redis::cmd("RPUSH")
        .arg(format!("vmd.manager@0.0.1:inflight:{ms}:dead.1"))
        .arg(payload)
        .query_async(c)
        .await
        .expect("RPUSH");
}
