//! The `/metrics` endpoint (`--metrics-listen`): plain HTTP/1.1 through hyper. A scrape encodes
//! what is in memory and never waits for a VM; connections are capped and slow clients dropped.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Scrapers and browsers at once; more are refused (closed) until one goes.
const MAX_CONNECTIONS: usize = 64;
/// A client has this long to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// No connection lives longer (a scraper simply reconnects).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(600);

pub async fn bind(address: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .with_context(|| format!("binding the metrics endpoint --metrics-listen {address}"))
}

/// The text of one scrape (from memory: it must not wait).
pub type Scrape = Arc<dyn Fn() -> String + Send + Sync>;

/// Serves `/metrics` (the text `scrape` makes) until the agent stops.
pub async fn serve(listener: TcpListener, scrape: Scrape) {
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of fds, most likely: let some go before trying again.
                tracing::warn!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            tracing::debug!(
                "metrics endpoint: {MAX_CONNECTIONS} connections open; one more closed"
            );
            continue;
        };
        let scrape = Arc::clone(&scrape);
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |request| {
                let response = respond(&*scrape, &request);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
        });
    }
}

fn respond<B>(scrape: &dyn Fn() -> String, request: &Request<B>) -> Response<Full<Bytes>> {
    let reply = |status, content_type, body: String| {
        Response::builder()
            .status(status)
            .header(CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    };
    const TEXT: &str = "text/plain; charset=utf-8";
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        let mut response = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "GET or HEAD only\n".into(),
        );
        response
            .headers_mut()
            .insert(ALLOW, "GET, HEAD".parse().expect("a valid header"));
        return response;
    }
    match request.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            scrape(),
        ),
        "/" => reply(
            StatusCode::OK,
            TEXT,
            "plasmavmc agent: Prometheus metrics at /metrics\n".into(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found; try /metrics\n".into(),
        ),
    }
}
