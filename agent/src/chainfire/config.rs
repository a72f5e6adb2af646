//! How to reach the store, and the timings derived from the lease TTL.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use etcd_client::{Certificate, ConnectOptions, GetOptions, Identity, TlsOptions};

use super::keys;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainFireConfig {
    /// `http://host:port` (or `https://` with `tls`), one per member.
    pub endpoints: Vec<String>,
    pub host_id: String,
    /// Whole seconds (etcd's granularity), at least 2.
    pub lease_ttl: Duration,
    pub tls: Option<TlsFiles>,
    pub user: Option<(String, String)>,
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
        if self.lease_ttl.subsec_nanos() != 0 || self.lease_ttl < Duration::from_secs(2) {
            bail!(
                "chainfire: lease TTL {:?} must be whole seconds, at least 2",
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

    pub fn ttl_secs(&self) -> i64 {
        self.lease_ttl.as_secs() as i64
    }

    /// How long before the server could expire the lease the holder stops its HA VMs.
    pub fn fence_margin(&self) -> Duration {
        (self.lease_ttl / 3).max(Duration::from_secs(1))
    }

    /// Keep-alives go out four times per fencing window, so one lost reply does not fence.
    pub fn keepalive_interval(&self) -> Duration {
        (self.lease_ttl - self.fence_margin()) / 4
    }

    /// Bound on any single request, so a dead store is noticed within the fencing window.
    pub fn op_timeout(&self) -> Duration {
        (self.lease_ttl / 2).min(Duration::from_secs(5))
    }

    pub fn connect_options(&self) -> anyhow::Result<ConnectOptions> {
        // HTTP/2 pings notice a dead connection. etcd closes one whose pings come less than
        // --grpc-keepalive-min-time (5 s by default) apart while no data flows (three strikes,
        // GOAWAY): twice that, or an idle watch is cut every few seconds.
        const HTTP2_PING_INTERVAL: Duration = Duration::from_secs(10);
        let mut options = ConnectOptions::new()
            .with_connect_timeout(self.op_timeout())
            .with_keep_alive(HTTP2_PING_INTERVAL, self.op_timeout())
            .with_keep_alive_while_idle(true);
        if let Some((user, password)) = &self.user {
            // etcd drops a token unused for --auth-token-ttl (5 min), and a quiet session writes
            // nothing for longer: log in again rather than fail the next write.
            options = options
                .with_user(user, password)
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

    /// A client that has reached the store: its first read is done here, so that a TLS, login
    /// or permission problem fails the connection, named as such, rather than a later request.
    pub async fn connect(&self) -> anyhow::Result<etcd_client::Client> {
        let connecting = async {
            let options = self.connect_options()?;
            let mut client = etcd_client::Client::connect(&self.endpoints, Some(options)).await?;
            let probe = GetOptions::new()
                .with_prefix()
                .with_count_only()
                .with_serializable();
            client.get(keys::ROOT, Some(probe)).await?;
            anyhow::Ok(client)
        };
        tokio::time::timeout(self.op_timeout(), connecting)
            .await
            .with_context(|| format!("chainfire: connecting to {} timed out", self.target()))?
            .with_context(|| format!("chainfire: connecting to {}", self.target()))
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
        for secs in [2, 3, 10, 30] {
            let config = ChainFireConfig::new(
                vec!["http://127.0.0.1:1".into()],
                "h",
                Duration::from_secs(secs),
            );
            config.check().unwrap();
            assert!(config.fence_margin() >= Duration::from_secs(1));
            assert!(config.keepalive_interval() * 3 < config.lease_ttl - config.fence_margin());
        }
    }

    #[test]
    fn bad_configs_are_refused() {
        let ok = ChainFireConfig::new(
            vec!["http://127.0.0.1:1".into()],
            "h",
            Duration::from_secs(3),
        );
        assert!(ChainFireConfig {
            lease_ttl: Duration::from_millis(2500),
            ..ok.clone()
        }
        .check()
        .is_err());
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
