//! etcd members on loopback (free ports, a temp data dir each), for the ChainFire integration
//! tests and `plasmavmc-bench chainfire`: start a single node or a cluster, kill, stop and restart members.
//! A cluster can require TLS with client certificates on its client port (certificates made at
//! start with the `openssl` CLI) and can turn etcd authentication on. Members die on drop.
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
    /// With [`LocalEtcd::start_tls`]: clients speak TLS and show a certificate this PKI signed.
    pki: Option<TestPki>,
    /// With [`LocalEtcd::enable_auth`]: the password of etcd's superuser `root`.
    root_password: Option<String>,
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    /// Plain HTTP `/health`, readable whatever the client port requires.
    metrics_port: u16,
    child: Option<Child>,
}

/// A CA, a server certificate for IP 127.0.0.1 and a client certificate, made for one cluster.
pub struct TestPki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// `etcdctl` (API v3) for some endpoints, with the TLS and login flags they need.
#[derive(Debug, Clone)]
pub struct Etcdctl {
    pub endpoints: Vec<String>,
    pub flags: Vec<String>,
}

impl LocalEtcd {
    /// Starts `size` members (`binary`: `etcd` from PATH when `None`) and waits until every one
    /// answers.
    pub fn start(binary: Option<&Path>, size: usize) -> anyhow::Result<Self> {
        Self::launch(binary, size, false)
    }

    /// Like [`LocalEtcd::start`], but the client port speaks TLS only (server certificate for
    /// 127.0.0.1) and refuses clients without a certificate signed by [`LocalEtcd::pki`]'s CA.
    pub fn start_tls(binary: Option<&Path>, size: usize) -> anyhow::Result<Self> {
        Self::launch(binary, size, true)
    }

    fn launch(binary: Option<&Path>, size: usize, tls: bool) -> anyhow::Result<Self> {
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
                    metrics_port: free_port()?,
                    child: None,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let pki = if tls {
            Some(TestPki::generate(&dir.path().join("pki"))?)
        } else {
            None
        };
        let mut etcd = LocalEtcd {
            binary: binary.map_or_else(|| PathBuf::from("etcd"), Path::to_path_buf),
            dir,
            members,
            pki,
            root_password: None,
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
        let scheme = if self.pki.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.members[member].client_port)
    }

    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// The certificates, when started with [`LocalEtcd::start_tls`].
    pub fn pki(&self) -> Option<&TestPki> {
        self.pki.as_ref()
    }

    /// Turns etcd authentication on, with etcd's superuser `root` as the only user; from then
    /// on [`LocalEtcd::etcdctl`] logs in as root.
    pub fn enable_auth(&mut self, root_password: &str) -> anyhow::Result<()> {
        let etcdctl = self.etcdctl();
        etcdctl.run(&["user", "add", "root", "--new-user-password", root_password])?;
        etcdctl.run(&["auth", "enable"])?;
        self.root_password = Some(root_password.to_owned());
        Ok(())
    }

    /// `etcdctl` for every member, with this cluster's client certificate and root login.
    pub fn etcdctl(&self) -> Etcdctl {
        let mut flags = Vec::new();
        if let Some(pki) = &self.pki {
            flags.push(format!("--cacert={}", pki.ca.display()));
            flags.push(format!("--cert={}", pki.client_cert.display()));
            flags.push(format!("--key={}", pki.client_key.display()));
        }
        if let Some(password) = &self.root_password {
            flags.push("--user=root".to_owned());
            flags.push(format!("--password={password}"));
        }
        Etcdctl {
            endpoints: self.endpoints(),
            flags,
        }
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
        let metrics_port = self.members[member].metrics_port;
        let health = format!("http://127.0.0.1:{metrics_port}/health");
        while Instant::now() < deadline {
            if http_get(metrics_port, "/health")
                .is_some_and(|body| body.contains("\"health\":\"true\""))
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // The temp dir, log included, goes with the cluster: show the log's end here.
        let log = std::fs::read_to_string(self.log(member)).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        bail!(
            "etcd member {} not healthy within {STARTUP:?} ({health}); end of its log:\n{}",
            self.members[member].name,
            lines[lines.len().saturating_sub(10)..].join("\n")
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
        let client = self.endpoint(member);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let metrics = format!("http://127.0.0.1:{}", m.metrics_port);
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
            .args(["--listen-metrics-urls", &metrics])
            .args(
                self.pki
                    .as_ref()
                    .map_or_else(Vec::new, TestPki::server_args),
            )
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

impl TestPki {
    /// Makes the CA and both certificates in `dir` with the `openssl` CLI (ECDSA P-256).
    pub fn generate(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).context("PKI dir")?;
        openssl(
            dir,
            &[
                &["req", "-x509", "-new", "-nodes", "-days", "2"],
                NEW_EC_KEY,
                &["-keyout", "ca.key", "-out", "ca.pem"],
                &["-subj", "/CN=plasmavmc-test-ca"],
                &["-addext", "basicConstraints=critical,CA:TRUE"],
                &["-addext", "keyUsage=critical,keyCertSign,cRLSign"],
            ]
            .concat(),
        )?;
        // etcd dials its own client port with the server certificate, hence clientAuth too.
        issue(
            dir,
            "server",
            "/CN=127.0.0.1",
            "extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1",
            2,
        )?;
        // Not a user name: with client-cert-auth etcd takes the CN as the user of a request that
        // carries no token, and the tests want the password to be the only way in.
        issue(
            dir,
            "client",
            "/CN=plasmavmc-test-client",
            "extendedKeyUsage=clientAuth",
            3,
        )?;
        Ok(TestPki {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        })
    }

    /// What a member needs to serve TLS and require client certificates.
    fn server_args(&self) -> Vec<String> {
        let file = |flag: &str, path: &Path| format!("--{flag}={}", path.display());
        vec![
            file("cert-file", &self.server_cert),
            file("key-file", &self.server_key),
            file("trusted-ca-file", &self.ca),
            "--client-cert-auth".to_owned(),
        ]
    }
}

const NEW_EC_KEY: &[&str] = &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];

/// `{name}.key` and `{name}.pem` in `dir`, signed by `ca.pem` there, with these extensions.
fn issue(
    dir: &Path,
    name: &str,
    subject: &str,
    extensions: &str,
    serial: u32,
) -> anyhow::Result<()> {
    let (key, csr, cert, ext) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
        format!("{name}.ext"),
    );
    let extensions =
        format!("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n{extensions}\n");
    std::fs::write(dir.join(&ext), extensions).context("certificate extensions")?;
    openssl(
        dir,
        &[
            &["req", "-new", "-nodes"],
            NEW_EC_KEY,
            &["-keyout", &key, "-out", &csr, "-subj", subject],
        ]
        .concat(),
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-days",
            "2",
            "-set_serial",
            &serial.to_string(),
            "-extfile",
            &ext,
            "-out",
            &cert,
        ],
    )
}

fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .context("running openssl (scripts/install-deps.sh installs it)")?;
    if !out.status.success() {
        bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

impl Etcdctl {
    /// No TLS, no login.
    pub fn plain(endpoints: &[String]) -> Self {
        Etcdctl {
            endpoints: endpoints.to_vec(),
            flags: vec![],
        }
    }

    /// `etcdctl ARGS`'s stdout; its stderr when it fails.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoints.join(",")))
            .args(["--dial-timeout=2s", "--command-timeout=5s"])
            .args(&self.flags)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running etcdctl")?;
        if !out.status.success() {
            bail!("etcdctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        String::from_utf8(out.stdout).context("etcdctl output is not UTF-8")
    }
}

/// A loopback port nobody listens on, taken below the kernel's ephemeral range: a port the
/// kernel hands out (`bind` to port 0) is free only until the next outgoing connection takes it
/// as its source port, and the many client connections of a test often did before etcd bound it.
fn free_port() -> anyhow::Result<u16> {
    use std::sync::atomic::{AtomicU16, Ordering};
    const FIRST: u16 = 20_000;
    const COUNT: u16 = 12_000; // up to 31999, below Linux's default ephemeral start (32768)
                               // Each process starts at its own place, so two test binaries or a bench rarely race.
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = (std::process::id() % u32::from(COUNT)) as u16;
    for _ in 0..COUNT {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % COUNT;
        let port = FIRST + (start + offset) % COUNT;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free loopback port in {FIRST}..{}", FIRST + COUNT)
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
