//! The daemon's side of ChainFire: the session config from the command line, and the notices
//! the session sends, logged.

use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::ChainfireOptions;
use crate::chainfire::{ChainFireConfig, Notice, SessionHandle, TlsFiles};

/// `--lease-ttl` when not given.
const DEFAULT_LEASE_TTL: u64 = 10;

/// The session config the flags describe; the password is read from its file.
pub fn chainfire_config(options: &ChainfireOptions) -> Result<ChainFireConfig> {
    let Some(host_id) = options.host_id.clone() else {
        bail!("--chainfire needs --host-id: this host's id in the cluster");
    };
    let ttl = Duration::from_secs(options.lease_ttl.unwrap_or(DEFAULT_LEASE_TTL));
    let mut config = ChainFireConfig::new(options.endpoints.clone(), host_id, ttl);
    config.tls = match (&options.ca, &options.cert, &options.key) {
        (Some(ca), cert, key) => Some(TlsFiles {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        }),
        (None, None, None) => None,
        (None, _, _) => bail!("--chainfire-cert/--chainfire-key need --chainfire-ca"),
    };
    config.user = match (&options.user, &options.password_file) {
        (Some(user), Some(file)) => {
            let password = std::fs::read_to_string(file)
                .with_context(|| format!("--chainfire-password-file {}", file.display()))?;
            Some((
                user.clone(),
                password.trim_end_matches(['\n', '\r']).to_owned(),
            ))
        }
        (None, None) => None,
        _ => bail!("--chainfire-user and --chainfire-password-file go together"),
    };
    config.check()?;
    Ok(config)
}

/// Logs what the session reports, until it stops.
pub fn log_notices(session: &SessionHandle) {
    let mut notices = session.notices();
    tokio::spawn(async move {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            match notices.recv().await {
                Ok(Notice::Connected { revision }) => {
                    tracing::info!(revision, "chainfire: connected")
                }
                Ok(Notice::Disconnected { error }) => {
                    tracing::warn!(%error, "chainfire: disconnected; VMs untouched, retrying")
                }
                Ok(Notice::Resynced { revision }) => {
                    tracing::info!(revision, "chainfire: watch compacted, resynced")
                }
                Ok(Notice::Store(event)) => tracing::debug!(?event, "chainfire: store change"),
                Ok(Notice::Wrote(write)) => tracing::info!(?write, "chainfire: wrote"),
                Err(RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "chainfire: notices skipped")
                }
                Err(RecvError::Closed) => break,
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> ChainfireOptions {
        ChainfireOptions {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            host_id: Some("a".into()),
            lease_ttl: None,
            ca: None,
            cert: None,
            key: None,
            user: None,
            password_file: None,
        }
    }

    #[test]
    fn host_id_is_required() {
        let error = chainfire_config(&ChainfireOptions {
            host_id: None,
            ..options()
        })
        .unwrap_err();
        assert!(format!("{error:#}").contains("--host-id"), "{error:#}");
    }

    #[test]
    fn defaults_and_password_file() {
        let config = chainfire_config(&options()).unwrap();
        assert_eq!(config.lease_ttl, Duration::from_secs(DEFAULT_LEASE_TTL));
        assert_eq!(config.user, None);

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        let config = chainfire_config(&ChainfireOptions {
            user: Some("root".into()),
            password_file: Some(file),
            lease_ttl: Some(3),
            ..options()
        })
        .unwrap();
        assert_eq!(config.user, Some(("root".into(), "s3cret".into())));
        assert_eq!(config.lease_ttl, Duration::from_secs(3));
    }

    #[test]
    fn half_given_credentials_are_refused() {
        assert!(chainfire_config(&ChainfireOptions {
            user: Some("root".into()),
            ..options()
        })
        .is_err());
        assert!(chainfire_config(&ChainfireOptions {
            cert: Some("c.pem".into()),
            key: Some("k.pem".into()),
            ..options()
        })
        .is_err());
    }
}
