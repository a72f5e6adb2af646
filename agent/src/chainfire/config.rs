//! How to reach the store, and the timings derived from the lease TTL.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use etcd_client::{Certificate, ConnectOptions, GetOptions, Identity, TlsOptions};

use super::members::Members;
use super::{fence, keys};

/// Below this, the store TTL (one second less) would fall under etcd's own minimum of 2 s.
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainFireConfig {
    /// `http://host:port` (or `https://` with `tls`), one per member.
    pub endpoints: Vec<String>,
    pub host_id: String,
    /// A host that stops is seen failed, and its HA VMs free, within this long. Whole seconds
    /// (etcd's granularity), at least 3.
    pub lease_ttl: Duration,
    pub tls: Option<TlsFiles>,
    pub user: Option<(String, Password)>,
    /// Where the lease trust is kept for fence guards and the next agent (`trust`); None: the
    /// session neither writes nor resumes one.
    pub trust_file: Option<PathBuf>,
    /// Published in this host's record: its migration channel and QEMU.
    pub host_facts: super::records::HostFacts,
}

/// A ChainFire password: never printed, not even in a `{:?}` of the config.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    pub fn new(password: impl Into<String>) -> Self {
        Password(password.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA that signed the members' certificates.
    pub ca: PathBuf,
    /// Client certificate and key, for clusters that require client authentication.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl ChainFireConfig {
    pub fn new(endpoints: Vec<String>, host_id: impl Into<String>, lease_ttl: Duration) -> Self {
        ChainFireConfig {
            endpoints,
            host_id: host_id.into(),
            lease_ttl,
            tls: None,
            user: None,
            trust_file: None,
            host_facts: Default::default(),
        }
    }

    pub fn check(&self) -> anyhow::Result<()> {
        if self.endpoints.is_empty() {
            bail!("chainfire: no endpoints");
        }
        if self.host_id.is_empty() || self.host_id.contains('/') {
            bail!(
                "chainfire: host id {:?} must be non-empty and without '/'",
                self.host_id
            );
        }
        if self.lease_ttl.subsec_nanos() != 0 || self.lease_ttl < MIN_LEASE_TTL {
            bail!(
                "chainfire: lease TTL {:?} must be whole seconds, at least {MIN_LEASE_TTL:?}",
                self.lease_ttl
            );
        }
        if let Some(tls) = &self.tls {
            if tls.cert.is_some() != tls.key.is_some() {
                bail!("chainfire: TLS client certificate and key go together");
            }
        }
        Ok(())
    }

    /// The TTL asked of the store: a second under `lease_ttl`, because etcd expires leases in a
    /// sweep every 500 ms, so a lease lives up to half a second past its TTL.
    pub fn store_ttl(&self) -> Duration {
        self.lease_ttl - Duration::from_secs(1)
    }

    /// Keep-alives go out four times per fencing window, so one lost reply does not fence.
    pub fn keepalive_interval(&self) -> Duration {
        let ttl = self.store_ttl();
        (ttl - fence::margin(ttl)) / 4
    }

    /// Bound on any single request, so a dead store is noticed within the fencing window.
    pub fn op_timeout(&self) -> Duration {
        (self.store_ttl() / 2).min(Duration::from_secs(5))
    }

    pub fn connect_options(&self) -> anyhow::Result<ConnectOptions> {
        // No HTTP/2 keep-alive pings: etcd sends GOAWAY ("too_many_pings") to clients pinging
        // more often than its --grpc-keepalive-min-time (5 s). Dead connections are noticed by
        // the session itself: keep-alive replies, request timeouts, watch progress requests.
        // Requiring a leader: a member cut off from the others, or amid an election, says "no
        // leader" at once instead of letting requests time out, and ends watches and keep-alive
        // streams it can no longer serve, so the session moves on to another member.
        let mut options = ConnectOptions::new()
            .with_connect_timeout(self.op_timeout())
            .with_require_leader(true);
        if let Some((user, password)) = &self.user {
            // etcd drops a token unused for --auth-token-ttl (5 min), and a quiet session writes
            // nothing for longer: log in again rather than fail the next write.
            options = options
                .with_user(user, password.expose())
                .with_auto_token_refresh(true);
        }
        if let Some(tls) = &self.tls {
            let read = |path: &PathBuf| {
                std::fs::read(path)
                    .with_context(|| format!("chainfire TLS: reading {}", path.display()))
            };
            let mut tls_options =
                TlsOptions::new().ca_certificate(Certificate::from_pem(read(&tls.ca)?));
            if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
                tls_options = tls_options.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            options = options.with_tls(tls_options);
        } else if self.endpoints.iter().any(|e| e.starts_with("https://")) {
            // etcd-client would go on with an empty trust store and fail every handshake.
            bail!("https endpoints need the CA of the store's certificates (--chainfire-ca)");
        }
        Ok(options)
    }

    /// Where a task's connections start: a member picked by the host id.
    pub fn members(&self) -> Members {
        Members::new(self.endpoints.len(), &self.host_id)
    }

    /// A client pinned to one member that has answered, tried in `members`' order (see
    /// [`Members`] for why one member per client). Each member's first read is done here, so that
    /// a TLS, login or permission problem fails the connection, named as such, rather than a
    /// later request. Fails when no member answers, with each member's reason.
    pub async fn connect(&self, members: &mut Members) -> anyhow::Result<etcd_client::Client> {
        let options = self
            .connect_options()
            .with_context(|| format!("chainfire: connecting to {}", self.target()))?;
        let mut failures = Vec::new();
        for member in members.order() {
            let endpoint = &self.endpoints[member];
            match self.connect_to(endpoint, options.clone()).await {
                Ok(client) => {
                    tracing::debug!(%endpoint, "chainfire: connected");
                    members.connected(member);
                    return Ok(client);
                }
                Err(e) => failures.push((endpoint, format!("{e:#}"))),
            }
        }
        let reasons = match failures.as_slice() {
            [(_, only)] => only.clone(),
            all => all
                .iter()
                .map(|(endpoint, reason)| format!("{endpoint}: {reason}"))
                .collect::<Vec<_>>()
                .join("; "),
        };
        bail!("chainfire: connecting to {}: {reasons}", self.target())
    }

    async fn connect_to(
        &self,
        endpoint: &str,
        options: ConnectOptions,
    ) -> anyhow::Result<etcd_client::Client> {
        let limit = self.op_timeout();
        let connecting = async {
            let mut client = etcd_client::Client::connect([endpoint], Some(options)).await?;
            let probe = GetOptions::new()
                .with_prefix()
                .with_count_only()
                .with_serializable();
            client.get(keys::ROOT, Some(probe)).await?;
            anyhow::Ok(client)
        };
        tokio::time::timeout(limit, connecting)
            .await
            .with_context(|| format!("no answer within {limit:?}"))?
    }

    /// What the connection was tried with, for errors (never the password): `https://cf1:2379
    /// with CA /etc/cf/ca.pem and client certificate /etc/cf/hv.pem as user plasmavmc`.
    fn target(&self) -> String {
        let mut target = self.endpoints.join(",");
        if let Some(tls) = &self.tls {
            target += &format!(" with CA {}", tls.ca.display());
            target += &match &tls.cert {
                Some(cert) => format!(" and client certificate {}", cert.display()),
                None => " and no client certificate".to_owned(),
            };
        }
        if let Some((user, _)) = &self.user {
            target += &format!(" as user {user}");
        }
        target
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timings_leave_the_holder_time_to_fence() {
        for secs in [3, 4, 10, 30] {
            let config = ChainFireConfig::new(
                vec!["http://127.0.0.1:1".into()],
                "h",
                Duration::from_secs(secs),
            );
            config.check().unwrap();
            let ttl = config.store_ttl();
            assert_eq!(ttl + Duration::from_secs(1), config.lease_ttl);
            assert!(config.keepalive_interval() * 3 < ttl - fence::margin(ttl));
        }
    }

    #[test]
    fn the_password_never_shows_in_debug_output() {
        let config = ChainFireConfig {
            user: Some(("root".into(), Password::new("s3cret"))),
            ..ChainFireConfig::new(
                vec!["http://127.0.0.1:1".into()],
                "h",
                Duration::from_secs(3),
            )
        };
        let printed = format!("{config:?}");
        assert!(
            printed.contains("root") && !printed.contains("s3cret"),
            "{printed}"
        );
    }

    #[test]
    fn bad_configs_are_refused() {
        let ok = ChainFireConfig::new(
            vec!["http://127.0.0.1:1".into()],
            "h",
            Duration::from_secs(3),
        );
        for ttl in [Duration::from_millis(3500), Duration::from_secs(2)] {
            assert!(ChainFireConfig {
                lease_ttl: ttl,
                ..ok.clone()
            }
            .check()
            .is_err());
        }
        assert!(ChainFireConfig {
            host_id: "a/b".into(),
            ..ok.clone()
        }
        .check()
        .is_err());
        assert!(ChainFireConfig {
            endpoints: vec![],
            ..ok
        }
        .check()
        .is_err());
    }
}
