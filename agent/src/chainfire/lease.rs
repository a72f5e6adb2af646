//! The session's lease: granted once, kept alive by keep-alives (no writes), re-granted only
//! when the server says it expired. Every acknowledged keep-alive moves `last_acked_sent`, the
//! clock self-fencing runs on.

use std::time::Duration;

use anyhow::{bail, Context};
use tokio::sync::watch;
use tokio::time::{sleep_until, timeout, Instant};

use super::backoff::Backoff;
use super::config::ChainFireConfig;
use super::fence::LeaseStatus;

/// Runs until aborted; the store being away only delays it.
pub async fn keep_alive(config: ChainFireConfig, status: watch::Sender<Option<LeaseStatus>>) {
    let mut backoff = Backoff::new(Duration::from_secs(1));
    loop {
        if let Err(e) = keep_alive_connected(&config, &status, &mut backoff).await {
            if lease_gone(&e) {
                tracing::warn!("chainfire lease: expired in the store; granting a new one");
                status.send_replace(None);
                continue;
            }
            tracing::warn!(error = %format!("{e:#}"), "chainfire lease: keep-alive interrupted; retrying");
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

async fn keep_alive_connected(
    config: &ChainFireConfig,
    status: &watch::Sender<Option<LeaseStatus>>,
    backoff: &mut Backoff,
) -> anyhow::Result<()> {
    let mut client = config.connect().await?;
    let limit = config.op_timeout();
    let current = *status.borrow();
    let mut id = match current {
        Some(lease) => lease.id,
        None => grant(&mut client, config, status).await?,
    };
    loop {
        let (mut keeper, mut replies) = timeout(limit, client.lease_keep_alive(id))
            .await
            .context("opening keep-alive stream timed out")??;
        loop {
            let sent = Instant::now();
            keeper.keep_alive().await?;
            let reply = timeout(limit, replies.message())
                .await
                .context("keep-alive reply timed out")??
                .context("keep-alive stream ended")?;
            if reply.ttl() <= 0 {
                tracing::warn!(
                    lease = id,
                    "chainfire lease: expired in the store; granting a new one"
                );
                id = grant(&mut client, config, status).await?;
                break;
            }
            status.send_modify(|s| {
                if let Some(lease) = s.as_mut().filter(|l| l.id == id) {
                    lease.last_acked_sent = sent.into_std();
                }
            });
            backoff.reset();
            sleep_until(sent + config.keepalive_interval()).await;
        }
    }
}

async fn grant(
    client: &mut etcd_client::Client,
    config: &ChainFireConfig,
    status: &watch::Sender<Option<LeaseStatus>>,
) -> anyhow::Result<i64> {
    let sent = Instant::now();
    let granted = timeout(
        config.op_timeout(),
        client.lease_grant(config.ttl_secs(), None),
    )
    .await
    .context("lease grant timed out")??;
    if granted.ttl() <= 0 {
        bail!(
            "lease grant returned TTL {}: {}",
            granted.ttl(),
            granted.error()
        );
    }
    tracing::info!(
        lease = granted.id(),
        ttl = granted.ttl(),
        "chainfire lease: granted"
    );
    status.send_replace(Some(LeaseStatus {
        id: granted.id(),
        last_acked_sent: sent.into_std(),
    }));
    Ok(granted.id())
}

/// The server no longer knows the lease (it expired while the store was out of reach). The
/// keep-alive stream reports it as an error rather than a zero TTL.
fn lease_gone(error: &anyhow::Error) -> bool {
    error
        .chain()
        .filter_map(|cause| cause.downcast_ref::<etcd_client::Error>())
        .any(|e| match e {
            etcd_client::Error::GRpcStatus(status) => status.message().contains("lease not found"),
            etcd_client::Error::LeaseKeepAliveError(message) => message.contains("not found"),
            _ => false,
        })
}
