//! TLS with client certificates and etcd user/password authentication, against a real etcd
//! (certificates made at test time with `openssl`): sessions publish through them, a wrong
//! password or missing TLS material fails at once with an error naming the cause, an invalidated
//! token is renewed without dropping the session, and the real agent binary publishes its host
//! key through both from its command-line flags.

#[path = "support/etcd.rs"]
mod etcd;
#[path = "support/agent.rs"]
mod harness;
#[path = "support/local_etcd.rs"]
mod local_etcd;
#[path = "support/qemu_harness.rs"]
mod qemu_harness;

use std::time::Duration;

use etcd::*;
use plasmavmc_agent::chainfire::{ChainFireConfig, Notice, Password, Session, TlsFiles};

const WAIT: Duration = Duration::from_secs(15);
const PASSWORD: &str = "s3cret-for-tests";
const DB: &str = "/plasmavmc/vms/acme/web/db";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_over_tls_with_a_client_certificate() {
    let etcd = single_tls();
    let etcdctl = etcd.etcdctl();
    // Only the CA; etcdctl retries the refused handshake until its timeouts, short here.
    let without_certificate = Etcdctl {
        endpoints: etcd.endpoints(),
        flags: vec![
            format!("--cacert={}", etcd.pki().unwrap().ca.display()),
            "--dial-timeout=500ms".into(),
            "--command-timeout=500ms".into(),
        ],
    };
    assert!(
        without_certificate.run(&["get", "x"]).is_err(),
        "the store must refuse clients without a certificate"
    );

    let session = Session::start(tls_config(&etcd, client_tls(&etcd))).unwrap();
    session.sync(picture([local_vm("db", "running", false, Some(7))]));
    eventually("db published over TLS", WAIT, || {
        etcdctl.get_json(DB).is_some()
    })
    .await;
    let db = etcdctl.get_json(DB).unwrap();
    assert_eq!(
        (db["host"].as_str(), db["state"].as_str()),
        (Some("h1"), Some("running"))
    );
    assert_eq!(
        etcdctl.get_json("/plasmavmc/hosts/h1").unwrap()["hostId"],
        "h1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_tls_material_fails_at_once_and_says_what_is_missing() {
    let etcd = single_tls();
    let no_tls = ChainFireConfig {
        tls: None,
        ..tls_config(&etcd, client_tls(&etcd))
    };
    let error = first_disconnect(no_tls).await;
    assert!(error.contains("--chainfire-ca"), "{error}");

    let no_certificate = TlsFiles {
        cert: None,
        key: None,
        ..client_tls(&etcd)
    };
    // The server's refusal comes after the client's side of the TLS 1.3 handshake: the cause
    // shows as an alert or a closed connection, so the error also says what the client lacked.
    let error = first_disconnect(tls_config(&etcd, no_certificate)).await;
    assert!(
        error.contains("connecting to https://") && error.contains("and no client certificate"),
        "{error}"
    );
    assert!(etcd.etcdctl().keys("/plasmavmc/").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_with_the_right_password() {
    let mut etcd = single();
    etcd.enable_auth(PASSWORD).unwrap();
    assert!(
        Etcdctl::plain(&etcd.endpoints())
            .run(&["get", "x"])
            .is_err(),
        "the store must refuse clients without a login"
    );
    let session = Session::start(auth_config(&etcd, PASSWORD)).unwrap();
    session.sync(picture([local_vm("db", "running", false, Some(7))]));
    eventually("db published as root", WAIT, || {
        etcd.etcdctl().get_json(DB).is_some()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_writes_nothing_and_says_authentication_failed() {
    let mut etcd = single();
    etcd.enable_auth(PASSWORD).unwrap();
    let before = etcd.etcdctl().revision();
    let session = Session::start(auth_config(&etcd, "not-the-password")).unwrap();
    let mut notices = session.notices();
    session.sync(picture([local_vm("db", "running", false, Some(7))]));
    let error = next_disconnect(&mut notices, WAIT).await;
    assert!(
        error.contains("as user root") && error.contains("authentication failed"),
        "{error}"
    );
    assert!(!error.contains("not-the-password"), "{error}");
    // A second failed attempt: the session keeps trying, and still nothing lands.
    next_disconnect(&mut notices, WAIT).await;
    assert!(etcd.etcdctl().keys("/plasmavmc/").is_empty());
    assert_eq!(etcd.etcdctl().revision(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidated_token_is_renewed_without_dropping_the_session() {
    let mut etcd = single();
    etcd.enable_auth(PASSWORD).unwrap();
    let etcdctl = etcd.etcdctl();
    let session = Session::start(auth_config(&etcd, PASSWORD)).unwrap();
    session.sync(picture([local_vm("db", "running", false, Some(7))]));
    eventually("db published", WAIT, || etcdctl.get_json(DB).is_some()).await;

    // Turning auth off and on drops every token, as an expiry (--auth-token-ttl) does.
    let mut notices = session.notices();
    etcdctl.output(&["auth", "disable"]);
    etcdctl.output(&["auth", "enable"]);
    session.sync(picture([local_vm("db", "stopped", false, None)]));
    eventually("db stopped", WAIT, || {
        etcdctl.get_json(DB).unwrap()["state"] == "stopped"
    })
    .await;
    while let Ok(notice) = notices.try_recv() {
        assert!(
            !matches!(notice, Notice::Disconnected { .. }),
            "the session dropped on a stale token: {notice:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_publishes_its_host_over_tls_with_a_password() {
    let mut etcd = single_tls();
    etcd.enable_auth(PASSWORD).unwrap();
    let pki = etcd.pki().unwrap();
    let mut host = harness::Host::new();
    host.write_config(serde_json::json!({}));
    let password_file = host.dir.path().join("chainfire-password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    let path = harness::path_str;
    host.start_agent_with(&[
        "--chainfire",
        &etcd.endpoint(0),
        "--host-id",
        "h1",
        "--lease-ttl",
        "3",
        "--chainfire-ca",
        path(&pki.ca),
        "--chainfire-cert",
        path(&pki.client_cert),
        "--chainfire-key",
        path(&pki.client_key),
        "--chainfire-user",
        "root",
        "--chainfire-password-file",
        path(&password_file),
    ]);
    let etcdctl = etcd.etcdctl();
    eventually("/plasmavmc/hosts/h1 in the store", harness::AGENT, || {
        etcdctl.get_json("/plasmavmc/hosts/h1").is_some()
    })
    .await;
    let record = etcdctl.get_json("/plasmavmc/hosts/h1").unwrap();
    assert_eq!(record["hostId"], "h1", "{record:#}");
}

fn tls_config(etcd: &LocalEtcd, tls: TlsFiles) -> ChainFireConfig {
    ChainFireConfig {
        tls: Some(tls),
        ..config(etcd.endpoints(), "h1", 3)
    }
}

fn auth_config(etcd: &LocalEtcd, password: &str) -> ChainFireConfig {
    ChainFireConfig {
        user: Some(("root".into(), Password::new(password))),
        ..config(etcd.endpoints(), "h1", 3)
    }
}

/// Starts a session with `config` and returns the error of its first failed connection.
async fn first_disconnect(config: ChainFireConfig) -> String {
    let session = Session::start(config).unwrap();
    next_disconnect(&mut session.notices(), WAIT).await
}
