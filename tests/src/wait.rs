//! Waiting without sleeping as an assertion: every helper here polls or
//! awaits a real condition and uses its timeout only as an upper bound,
//! panicking with a description of what never happened.

use std::future::Future;
use std::time::Duration;

use pbus::{Signal, SignalStream};
use tokio::time::Instant;

/// Polls `condition` every 10 ms until it holds; panics after `timeout`
/// naming `what` was awaited.
pub async fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Like [`wait_for`] with an async condition.
pub async fn wait_for_async<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !condition().await {
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Awaits `future`, panicking if it takes longer than `timeout`.
pub async fn within<T>(what: &str, timeout: Duration, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(timeout, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {timeout:?}: {what}"),
    }
}

/// The next signal on `stream`; panics on timeout or if the stream ended.
pub async fn expect_signal(stream: &mut SignalStream, timeout: Duration) -> Signal {
    match tokio::time::timeout(timeout, stream.next()).await {
        Ok(Some(signal)) => signal,
        Ok(None) => panic!("signal stream {:?} ended", stream.rule()),
        Err(_) => panic!(
            "no signal within {timeout:?} on a stream with rule {:?}",
            stream.rule()
        ),
    }
}

/// Every signal already delivered to `stream` and not yet taken, without
/// waiting. Use it after a sentinel proved that everything sent earlier has
/// arrived.
pub fn drain_signals(stream: &mut SignalStream) -> Vec<Signal> {
    use futures::FutureExt;
    let mut signals = Vec::new();
    while let Some(Some(signal)) = stream.next().now_or_never() {
        signals.push(signal);
    }
    signals
}
