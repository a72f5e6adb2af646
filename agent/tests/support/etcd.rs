//! Real etcd for the `chainfire_*` tests: members on loopback (`LocalEtcd`, shared with the bench),
//! `etcdctl` to read back what the agent wrote, and a TCP proxy that can cut one session off
//! the store (a partition that only that session sees).
#![allow(dead_code)] // each test file uses a different part

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use super::local_etcd::{Etcdctl, LocalEtcd};
use plasmavmc_agent::chainfire::{ChainFireConfig, Notice, TlsFiles};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

pub fn single() -> LocalEtcd {
    LocalEtcd::start(None, 1).expect("start etcd")
}

pub fn cluster(size: usize) -> LocalEtcd {
    LocalEtcd::start(None, size).expect("start etcd cluster")
}

/// One member that speaks TLS only and requires a client certificate.
pub fn single_tls() -> LocalEtcd {
    LocalEtcd::start_tls(None, 1).expect("start etcd with TLS")
}

/// The CA and client certificate a session needs for `etcd` (started with TLS).
pub fn client_tls(etcd: &LocalEtcd) -> TlsFiles {
    let pki = etcd.pki().expect("etcd started with TLS");
    TlsFiles {
        ca: pki.ca.clone(),
        cert: Some(pki.client_cert.clone()),
        key: Some(pki.client_key.clone()),
    }
}

pub fn config(endpoints: Vec<String>, host: &str, ttl_secs: u64) -> ChainFireConfig {
    ChainFireConfig::new(endpoints, host, Duration::from_secs(ttl_secs))
}

/// `etcdctl` (API v3) against the given endpoints; panics with its stderr on failure.
pub fn etcdctl(endpoints: &[String], args: &[&str]) -> String {
    Etcdctl::plain(endpoints).output(args)
}

/// The value at `key` as JSON, or `None` when absent.
pub fn get_json(endpoints: &[String], key: &str) -> Option<serde_json::Value> {
    Etcdctl::plain(endpoints).get_json(key)
}

/// Every key under `prefix`.
pub fn keys(endpoints: &[String], prefix: &str) -> BTreeSet<String> {
    Etcdctl::plain(endpoints).keys(prefix)
}

/// The store's revision: it moves with every write and never with a keep-alive.
pub fn revision(endpoints: &[String]) -> i64 {
    Etcdctl::plain(endpoints).revision()
}

/// The readings above for any store, TLS and login included (`LocalEtcd::etcdctl`).
impl Etcdctl {
    /// Panics with etcdctl's stderr on failure.
    pub fn output(&self, args: &[&str]) -> String {
        self.run(args).unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub fn get_json(&self, key: &str) -> Option<serde_json::Value> {
        let out = self.output(&["get", key, "--print-value-only"]);
        let value = out.trim_end();
        (!value.is_empty()).then(|| serde_json::from_str(value).expect("JSON value"))
    }

    pub fn keys(&self, prefix: &str) -> BTreeSet<String> {
        self.output(&["get", prefix, "--prefix", "--keys-only"])
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }

    pub fn revision(&self) -> i64 {
        let out = self.output(&[
            "get",
            "/",
            "--prefix",
            "--keys-only",
            "--limit=1",
            "-w",
            "json",
        ]);
        let json: serde_json::Value = serde_json::from_str(&out).expect("etcdctl json");
        json["header"]["revision"]
            .as_i64()
            .expect("header.revision")
    }
}

/// A loopback TCP proxy to one etcd member. `cut()` drops every connection and refuses new
/// ones until `heal()`: the store is gone for whoever talks through the proxy, and only them.
/// `freeze()` is the silent kind of partition: connections stay open, nothing gets through,
/// nobody is told.
pub struct CutProxy {
    pub endpoint: String,
    state: Arc<Mutex<ProxyState>>,
    frozen: tokio::sync::watch::Sender<bool>,
    accept: JoinHandle<()>,
}

#[derive(Default)]
struct ProxyState {
    cut: bool,
    connections: Vec<JoinHandle<()>>,
}

impl CutProxy {
    pub async fn start(upstream: String) -> Self {
        Self::start_at("127.0.0.1:0", upstream).await
    }

    /// A proxy listening on `bind` (`ADDR:PORT`).
    pub async fn start_at(bind: &str, upstream: String) -> Self {
        let listener = TcpListener::bind(bind).await.expect("bind proxy");
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let upstream = upstream.trim_start_matches("http://").to_owned();
        let state = Arc::new(Mutex::new(ProxyState::default()));
        let (frozen, _) = tokio::sync::watch::channel(false);
        let shared = state.clone();
        let freezes = frozen.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut state = shared.lock().unwrap();
                if state.cut {
                    continue; // dropped: connection reset
                }
                let upstream = upstream.clone();
                let mut frozen = freezes.subscribe();
                state.connections.push(tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        // Both sockets stay open and silent for as long as the test runs.
                        () = until_frozen(&mut frozen) => std::future::pending().await,
                    }
                }));
            }
        });
        CutProxy {
            endpoint,
            state,
            frozen,
            accept,
        }
    }

    pub fn cut(&self) {
        let mut state = self.state.lock().unwrap();
        state.cut = true;
        state.connections.drain(..).for_each(|c| c.abort());
    }

    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    pub fn heal(&self) {
        self.state.lock().unwrap().cut = false;
        self.frozen.send_replace(false);
    }
}

async fn until_frozen(frozen: &mut tokio::sync::watch::Receiver<bool>) {
    while !*frozen.borrow_and_update() {
        if frozen.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

use plasmavmc_agent::chainfire::{HandleRecord, LocalVm, SpecSummary, VmKey, VmRecord};
use std::collections::BTreeMap;

pub fn vm_key(name: &str) -> VmKey {
    VmKey::new("acme", "web", name)
}

/// A local VM as the daemon would report it; `pid` adds a handle (it runs here).
pub fn local_vm(name: &str, state: &str, ha: bool, pid: Option<u32>) -> (VmKey, LocalVm) {
    let record = VmRecord {
        name: name.into(),
        org_id: "acme".into(),
        project_id: "web".into(),
        host: String::new(), // the session fills in its host id
        state: state.into(),
        spec: SpecSummary {
            vcpus: 2,
            memory_mib: 512,
            disks: vec!["root".into()],
            nics: vec!["lan".into()],
            ha,
        },
        pending: vec![],
        last_error: None,
        updated_at: plasmavmc_agent::chainfire::records::now(),
    };
    let handle = pid.map(|pid| HandleRecord {
        host: "set-by-test".into(),
        pid,
        qmp_socket: format!("/run/plasmavmc/vms/{name}/qmp.sock"),
        started_at: "2024-01-01T00:00:00Z".into(),
    });
    (
        vm_key(name),
        LocalVm {
            record,
            handle,
            wants_to_run: true,
            arriving: false,
        },
    )
}

pub fn picture(vms: impl IntoIterator<Item = (VmKey, LocalVm)>) -> BTreeMap<VmKey, LocalVm> {
    vms.into_iter().collect()
}

/// Polls `check` every 50 ms until it holds; panics naming `what` after `limit`.
pub async fn eventually(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The error of the session's next `Disconnected` notice; panics if none comes within `limit`
/// (a session that hangs instead of failing fails the test too).
pub async fn next_disconnect(notices: &mut broadcast::Receiver<Notice>, limit: Duration) -> String {
    let disconnected = async {
        loop {
            if let Notice::Disconnected { error } = notices.recv().await.expect("session alive") {
                return error;
            }
        }
    };
    tokio::time::timeout(limit, disconnected)
        .await
        .unwrap_or_else(|_| panic!("no Disconnected notice within {limit:?}"))
}
