//! The accept loop: the router on hyper's HTTP/1 connections, with what `axum::serve`
//! lacks for a server any pod in the namespace can reach: a cap on open connections and a
//! deadline for a request's headers, so idle or slow (slowloris) clients can neither
//! exhaust file descriptors nor hold connections for ever. A stop lets requests in flight
//! finish, and closes the listener at once so new connections are refused.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::warn;

/// What one client may hold of the worker.
#[derive(Clone, Copy, Debug)]
pub struct Guards {
    /// Connections open at once; more wait in the listen backlog until one closes.
    pub max_connections: usize,
    /// How long a client may take to send a request's headers, on a new connection or
    /// between requests of a kept-alive one; then the connection is closed.
    pub header_timeout: Duration,
}

/// Serves `app` until `stop` resolves, then waits for the requests in flight.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    guards: Guards,
    stop: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(guards.max_connections));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(guards.header_timeout);
    tokio::pin!(stop);
    loop {
        // A slot first: over the cap, clients wait in the kernel's backlog instead of
        // costing this process a file descriptor and a task each.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            () = &mut stop => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors, mostly: wait for some to close.
                    warn!(%error, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let connection =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            // A client that went away, or sent garbage, is that client's problem.
            let _ = connection.await;
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
