//! etcd members on loopback (free ports, a temp data dir each), for the ChainFire integration
//! tests and `plasmavmc-bench chainfire`: start a single node or a cluster, kill, stop and restart members.
//! Every member is killed on drop.
#![allow(dead_code)] // the bench and the tests each use a different part

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

const STARTUP: Duration = Duration::from_secs(20);

pub struct LocalEtcd {
    binary: PathBuf,
    dir: tempfile::TempDir,
    members: Vec<Member>,
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl LocalEtcd {
    /// Starts `size` members (`binary`: `etcd` from PATH when `None`) and waits until every one
    /// answers.
    pub fn start(binary: Option<&Path>, size: usize) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("pv-etcd-")
            .tempdir()
            .context("etcd temp dir")?;
        let members = (0..size)
            .map(|i| {
                Ok(Member {
                    name: format!("m{i}"),
                    client_port: free_port()?,
                    peer_port: free_port()?,
                    child: None,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut etcd = LocalEtcd {
            binary: binary.map_or_else(|| PathBuf::from("etcd"), Path::to_path_buf),
            dir,
            members,
        };
        for i in 0..size {
            etcd.spawn(i)?;
        }
        for i in 0..size {
            etcd.wait_ready(i)?;
        }
        Ok(etcd)
    }

    pub fn size(&self) -> usize {
        self.members.len()
    }

    pub fn endpoint(&self, member: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[member].client_port)
    }

    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    pub fn data_dir(&self, member: usize) -> PathBuf {
        self.dir.path().join(&self.members[member].name)
    }

    /// SIGKILL: a crash, no goodbye to the cluster.
    pub fn kill(&mut self, member: usize) {
        if let Some(mut child) = self.members[member].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a killed member again on its data dir and ports. Does not wait for it.
    pub fn restart(&mut self, member: usize) -> anyhow::Result<()> {
        self.kill(member);
        self.spawn(member)
    }

    pub fn is_running(&self, member: usize) -> bool {
        self.members[member].child.is_some()
    }

    /// Waits until the member serves client requests (its cluster has a leader).
    pub fn wait_ready(&self, member: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + STARTUP;
        let health = format!("{}/health", self.endpoint(member));
        while Instant::now() < deadline {
            if http_get(self.members[member].client_port, "/health")
                .is_some_and(|body| body.contains("\"health\":\"true\""))
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "etcd member {} not healthy within {STARTUP:?} ({health}); log: {}",
            self.members[member].name,
            self.log(member).display()
        )
    }

    pub fn log(&self, member: usize) -> PathBuf {
        self.dir
            .path()
            .join(format!("{}.log", self.members[member].name))
    }

    fn spawn(&mut self, member: usize) -> anyhow::Result<()> {
        let peers: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect();
        let m = &self.members[member];
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log(member))?;
        let child = Command::new(&self.binary)
            .args(["--name", &m.name, "--data-dir"])
            .arg(self.data_dir(member))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args([
                "--initial-cluster",
                &peers.join(","),
                "--initial-cluster-state",
                "new",
            ])
            .args([
                "--initial-cluster-token",
                &format!("pv-{}", std::process::id()),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        self.members[member].child = Some(child);
        Ok(())
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        (0..self.members.len()).for_each(|i| self.kill(i));
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A plain HTTP/1.0 GET on loopback (etcd's `/health`), without an HTTP client dependency.
fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(
        &([127, 0, 0, 1], port).into(),
        Duration::from_secs(1),
    )
    .ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    Some(body)
}
