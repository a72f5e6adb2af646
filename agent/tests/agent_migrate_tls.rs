//! Migration over TLS, and the offline move: two real agents (hosts `a` and `b`; `b` in a mount
//! namespace of its own, where the local disk's directory is another one) against a real etcd,
//! one real HA guest with a local raw disk full of random bytes (copied by every move).
//!
//! 1. Both hosts with `--migration-tls-dir` (certificates made here with `openssl`): a live move
//!    a -> b. Every connection through the recording proxies in front of b's ports is encrypted:
//!    the stream opens with a TLS handshake record (plaintext would open with QEMU's `QEVM`), and
//!    no piece of the disk crosses the NBD connection readable. b's copy of the disk is the disk.
//! 2. `--offline` b -> a, over TLS too: `--json` says mode `offline`, a's copy is the disk.
//! 3. b restarted without TLS: a move a -> b is refused before anything starts, saying why; the
//!    VM runs on a as before and b never launched a QEMU.
//!
//! A watcher counts the VM's QEMU processes on both hosts (at most the source and the incoming
//! one) and reads the guest's heartbeats on both consoles (two copies running would interleave)
//! all along; the guest never boots a second time.

#[path = "support/etcd.rs"]
mod etcd;
#[path = "support/agent.rs"]
mod harness;
#[path = "support/local_etcd.rs"]
mod local_etcd;
#[path = "support/qemu_harness.rs"]
mod qemu_harness;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use harness::guest::{HEARTBEAT_FLAG, READY};
use harness::watcher::Watcher;
use harness::*;
use serde_json::{json, Value};

const VM: &str = "tls1";
/// a's migration ports.
const A_PORTS: &str = "18421-18422";
/// b's migration ports (the stream, then the disk copy): its QEMUs listen on 127.0.0.2, a
/// recording proxy on 127.0.0.1 for each.
const B_PORT: u16 = 18431;
/// How a plaintext migration stream starts: QEMU's magic `QEVM`, then its version 3.
const PLAINTEXT_STREAM_START: &[u8] = b"QEVM\0\0\0\x03";
const DISK_BYTES: usize = 16 << 20;

/// The agent's flags on host `id`; `tls`: its `--migration-tls-dir`.
fn flags(endpoint: &str, id: &str, tls: Option<&Path>) -> Vec<String> {
    let mut flags = cluster_agent_flags(endpoint, id, 6);
    if let Some(dir) = tls {
        flags.extend(["--migration-tls-dir".to_owned(), path_str(dir).to_owned()]);
    }
    if id == "b" {
        flags.extend(migration_flags(&format!("{B_PORT}-{}", B_PORT + 1)));
        flags.extend(["--migration-listen".into(), "127.0.0.2".into()]);
    } else {
        flags.extend(migration_flags(A_PORTS));
    }
    flags
}

/// b's agent, in a mount namespace of its own where `a_local` shows `b_local`.
fn start_b(b: &mut Host, endpoint: &str, tls: Option<&Path>, (b_local, a_local): (&Path, &Path)) {
    b.start_agent_with_mount(b_local, a_local, &flags(endpoint, "b", tls));
}

/// `--migration-tls-dir`'s files, made with the test PKI (its server certificate names
/// 127.0.0.1: where the source connects).
fn tls_dir(dir: &Path) -> PathBuf {
    let pki = local_etcd::TestPki::generate(&dir.join("pki")).expect("test PKI");
    let tls = dir.join("migration-tls");
    std::fs::create_dir_all(&tls).unwrap();
    for (from, to) in [
        (&pki.ca, "ca-cert.pem"),
        (&pki.server_cert, "server-cert.pem"),
        (&pki.server_key, "server-key.pem"),
        (&pki.client_cert, "client-cert.pem"),
        (&pki.client_key, "client-key.pem"),
    ] {
        std::fs::copy(from, tls.join(to)).unwrap();
    }
    tls
}

/// A TCP relay from 127.0.0.1:`port` to 127.0.0.2:`port` that keeps what each connection's
/// client sent (the first `keep` bytes).
struct Recorder {
    sent: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Recorder {
    fn start(port: u16, keep: usize) -> Recorder {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind the recording proxy");
        let sent = Arc::new(Mutex::new(Vec::new()));
        let all = sent.clone();
        std::thread::spawn(move || {
            for inbound in listener.incoming().flatten() {
                let Ok(outbound) = TcpStream::connect(("127.0.0.2", port)) else {
                    continue;
                };
                let index = {
                    let mut all = all.lock().unwrap();
                    all.push(Vec::new());
                    all.len() - 1
                };
                let (mut from_client, mut to_server) = (inbound.try_clone().unwrap(), outbound);
                let (mut from_server, mut to_client) = (to_server.try_clone().unwrap(), inbound);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from_server, &mut to_client);
                    let _ = to_client.shutdown(std::net::Shutdown::Both);
                });
                let record = all.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 64 << 10];
                    while let Ok(read) = from_client.read(&mut buf) {
                        if read == 0 || to_server.write_all(&buf[..read]).is_err() {
                            break;
                        }
                        let mut record = record.lock().unwrap();
                        let kept = &mut record[index];
                        let room = keep.saturating_sub(kept.len()).min(read);
                        kept.extend_from_slice(&buf[..room]);
                    }
                    let _ = to_server.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        Recorder { sent }
    }

    fn connections(&self) -> Vec<Vec<u8>> {
        self.sent.lock().unwrap().clone()
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// `migrate VM ARGS --json` on `from`, expected to succeed: its outcome.
fn moved(from: &Host, args: &[&str], what: &str) -> Value {
    let out = from
        .cli(&[&["migrate", VM, "--json"], args].concat())
        .expect_code(0, what);
    serde_json::from_str(out.stdout.trim()).unwrap()
}

#[test]
fn moves_go_over_tls_when_configured_offline_moves_copy_the_disk_and_a_tls_mismatch_is_refused() {
    let etcd = etcd::single();
    let endpoint = etcd.endpoint(0);
    let mut a = Host::new();
    let mut b = Host::another(&a);
    let tls = tls_dir(a.dir.path());
    let stream = Recorder::start(B_PORT, 1 << 20);
    let nbd = Recorder::start(B_PORT + 1, 2 * DISK_BYTES);
    // The local disk: random bytes, in a directory that is b's own under b's mount namespace.
    let (a_local, b_local) = (a.dir.path().join("local"), b.dir.path().join("local"));
    std::fs::create_dir_all(&a_local).unwrap();
    std::fs::create_dir_all(&b_local).unwrap();
    let disk: Vec<u8> = (0..DISK_BYTES as u64)
        .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8 ^ (i >> 13) as u8)
        .collect();
    let image = a_local.join("data.raw");
    std::fs::write(&image, &disk).unwrap();
    let declared = a.vm(json!({
        "ha": {"enable": true},
        "cmdline": format!("{} {HEARTBEAT_FLAG}", guest::guest_cmdline(false)),
        "disks": {"data": {"path": image, "format": "raw", "serial": "data"}},
    }));
    for host in [&a, &b] {
        host.write_config(json!({ VM: declared }));
    }
    a.start_agent_with(&flags(&endpoint, "a", Some(&tls)));
    a.wait_running(VM);
    a.wait_boot(VM);
    let locals = (b_local.as_path(), a_local.as_path());
    start_b(&mut b, &endpoint, Some(&tls), locals);
    b.wait_status("b standing by", AGENT, |s| {
        s["vms"][VM]["heldDown"] == "HA: another host holds it (a)"
    });
    let watcher = Watcher::start(&[&a, &b], &[VM], 2);

    // 1. Live, over TLS.
    watcher.move_starts(VM);
    let outcome = moved(&a, &["--to", "b"], "live move a -> b over TLS");
    assert_eq!(outcome["mode"], "live", "{outcome}");
    watcher.check();
    assert_eq!((a.qemu_count(VM), b.qemu_count(VM)), (0, 1));
    let streams = stream.connections();
    assert!(!streams.is_empty(), "the stream went through the proxy");
    for sent in &streams {
        assert_eq!(
            sent.first(),
            Some(&0x16),
            "the stream opens with a TLS handshake record, not {:?}",
            String::from_utf8_lossy(&sent[..sent.len().min(8)])
        );
        // The magic with its version (8 bytes): the 4 bytes alone turn up by chance in ~1 of 50
        // runs' tens of MiB of ciphertext.
        assert!(
            !contains(sent, PLAINTEXT_STREAM_START),
            "QEMU's plaintext magic crossed"
        );
    }
    let copies = nbd.connections();
    let crossed: usize = copies.iter().map(Vec::len).sum();
    assert!(
        crossed > DISK_BYTES,
        "the disk copy went through the proxy ({crossed} bytes)"
    );
    let piece = &disk[DISK_BYTES / 2..DISK_BYTES / 2 + 64];
    assert!(
        !copies.iter().any(|sent| contains(sent, piece)),
        "the disk's bytes crossed readable"
    );
    assert!(
        std::fs::read(b_local.join("data.raw")).unwrap() == disk,
        "b's copy of the disk is the disk"
    );

    // 2. Offline, b -> a (over TLS as well): the disk comes back to a's own file.
    watcher.move_starts(VM);
    let outcome = moved(&b, &["--to", "a", "--offline"], "offline move b -> a");
    assert_eq!(
        (
            &outcome["vm"],
            &outcome["from"],
            &outcome["to"],
            &outcome["mode"]
        ),
        (&json!(VM), &json!("b"), &json!("a"), &json!("offline")),
        "{outcome}"
    );
    watcher.check();
    assert_eq!((a.qemu_count(VM), b.qemu_count(VM)), (1, 0));
    let pid = a.wait_running(VM);
    assert!(
        std::fs::read(&image).unwrap() == disk,
        "a's copy of the disk is the disk"
    );
    let beats = a.console(VM).matches(guest::HEARTBEAT).count();
    a.wait_status("the guest runs on a", AGENT, |_| {
        a.console(VM).matches(guest::HEARTBEAT).count() > beats + 2
    });
    let boots = a.console(VM).matches(READY).count() + b.console(VM).matches(READY).count();
    assert_eq!(boots, 1, "the guest never booted again");

    // 3. b without TLS: refused before anything starts.
    b.kill_agent();
    start_b(&mut b, &endpoint, None, locals);
    b.wait_status("b standing by without TLS", AGENT, |s| {
        s["vms"][VM]["heldDown"] == "HA: another host holds it (a)"
    });
    let refused = a
        .cli(&["migrate", VM, "--to", "b"])
        .expect_code(2, "a move to a host without TLS");
    assert!(
        refused.stderr.contains("TLS") && refused.stderr.contains("--migration-tls-dir"),
        "says why: {refused:?}"
    );
    assert_eq!(a.wait_running(VM), pid, "the same QEMU runs on a");
    assert_eq!(b.qemu_count(VM), 0, "b never launched one");
    watcher.check();
}
