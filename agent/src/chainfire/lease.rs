//! The session's lease: granted once (or resumed from the previous agent on this host), kept
//! alive by keep-alives (no writes), re-granted only when the server says it is gone. Every
//! acknowledged keep-alive moves `last_acked_sent`, the clock self-fencing runs on.

use std::time::Duration;

use anyhow::{bail, Context};
use tokio::sync::watch;
use tokio::time::{sleep_until, timeout, Instant};

use super::backoff::Backoff;
use super::clock::BootTime;
use super::config::ChainFireConfig;
use super::fence::LeaseStatus;
use super::members::Members;

/// Runs until aborted; the store being away only delays it.
pub async fn keep_alive(config: ChainFireConfig, status: watch::Sender<Option<LeaseStatus>>) {
    let mut backoff = Backoff::new(Duration::from_secs(1));
    let mut members = config.members();
    loop {
        if let Err(e) = keep_alive_connected(&config, &mut members, &status, &mut backoff).await {
            if lease_gone(&e) {
                let lease = status.borrow().map(|l| l.id);
                tracing::warn!(
                    ?lease,
                    "chainfire lease: gone from the store; granting a new one"
                );
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
    members: &mut Members,
    status: &watch::Sender<Option<LeaseStatus>>,
    backoff: &mut Backoff,
) -> anyhow::Result<()> {
    let mut client = config.connect(members).await?;
    let limit = config.op_timeout();
    let current = *status.borrow();
    let mut id = match current {
        Some(lease) => lease.id, // ours, or the previous agent's on this host: resume it
        None => grant(&mut client, config, status).await?,
    };
    loop {
        let (mut keeper, mut replies) = timeout(limit, client.lease_keep_alive(id))
            .await
            .context("opening keep-alive stream timed out")??;
        loop {
            let sent = (Instant::now(), BootTime::now());
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
                    lease.last_acked_sent = sent.1;
                    lease.ttl = Duration::from_secs(reply.ttl() as u64);
                }
            });
            backoff.reset();
            sleep_until(sent.0 + config.keepalive_interval()).await;
        }
    }
}

async fn grant(
    client: &mut etcd_client::Client,
    config: &ChainFireConfig,
    status: &watch::Sender<Option<LeaseStatus>>,
) -> anyhow::Result<i64> {
    let sent = BootTime::now();
    let asked = config.store_ttl();
    let granted = timeout(
        config.op_timeout(),
        client.lease_grant(asked.as_secs() as i64, None),
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
    let ttl = Duration::from_secs(granted.ttl() as u64);
    tracing::info!(lease = granted.id(), ?ttl, "chainfire lease: granted");
    if ttl != asked {
        tracing::warn!(
            ?asked,
            ?ttl,
            "chainfire lease: the store raised the TTL to its minimum; this host is seen failed \
             only after {ttl:?} (and up to 0.5 s more), not within --lease-ttl"
        );
    }
    status.send_replace(Some(LeaseStatus {
        id: granted.id(),
        ttl,
        last_acked_sent: sent,
    }));
    Ok(granted.id())
}

/// The server no longer knows the lease (it expired while the store was out of reach, or the
/// previous agent's lease was not resumed in time). The keep-alive stream reports it as an error
/// rather than a zero TTL.
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
