//! Small pieces of bus life the tests keep needing, on the client
//! library's side: owning a name, listing the unique names on the bus,
//! and a healthy echo pair whose latency a test watches while others
//! misbehave.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use pbus::{Connection, RequestNameFlags, RequestNameResult};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::messages::Text;
use crate::{within, TestBus};

/// Requests `name` for `connection` with `flags`; panics unless it becomes
/// the primary owner.
pub async fn own_name(connection: &Connection, name: &str, flags: RequestNameFlags) {
    assert_eq!(
        connection
            .request_name(name, flags)
            .await
            .unwrap_or_else(|error| panic!("RequestName {name}: {error}")),
        RequestNameResult::PrimaryOwner,
        "{name}"
    );
}

/// The unique names of every peer on the bus that `connection` may see.
pub async fn unique_names(connection: &Connection) -> BTreeSet<String> {
    connection
        .list_names(true)
        .await
        .expect("ListNames")
        .into_iter()
        .map(|entry| entry.name)
        .filter(|name| name.starts_with(':'))
        .collect()
}

/// An echo service and a caller that keeps calling it, measuring its
/// slowest call, until stopped: the "everyone else" of a test about one
/// misbehaving client.
#[derive(Debug)]
pub struct EchoPair {
    service: Connection,
    stop: oneshot::Sender<()>,
    calls: JoinHandle<(u32, Duration)>,
}

impl EchoPair {
    /// The well-known name the echo service owns.
    pub const NAME: &'static str = "org.pbus.test.Echo";

    /// Starts the service (owning [`NAME`](Self::NAME), answering `Echo`
    /// with its request) and the caller, which checks every answer, waits
    /// `pause` between calls and makes at least `min_calls` before it
    /// honours a stop. A call may take up to 30 s before the caller fails:
    /// the test judges the slowest call, not this ceiling.
    pub async fn start(bus: &TestBus, min_calls: u32, pause: Duration) -> Self {
        let service = bus.connect_owning(Self::NAME).await;
        service
            .serve("Echo", |request: Text, _call| async move { Ok(request) })
            .expect("serve Echo");
        let caller = bus.connect().await;
        let (stop, mut stopped) = oneshot::channel::<()>();
        let calls = tokio::spawn(async move {
            let mut calls = 0u32;
            let mut slowest = Duration::ZERO;
            loop {
                let started = Instant::now();
                let reply: Text = caller
                    .method_call(Self::NAME, "Echo")
                    .timeout(Duration::from_secs(30))
                    .call(&Text::new(calls.to_string()))
                    .await
                    .expect("the echo pair's call failed");
                assert_eq!(reply.text, calls.to_string());
                slowest = slowest.max(started.elapsed());
                calls += 1;
                if calls >= min_calls && stopped.try_recv().is_ok() {
                    return (calls, slowest);
                }
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
        });
        Self {
            service,
            stop,
            calls,
        }
    }

    /// Stops the caller (within a minute) and closes the service; returns
    /// how many calls were made and the slowest one.
    pub async fn stop(self) -> (u32, Duration) {
        let _ = self.stop.send(());
        let result = within("the echo pair", Duration::from_secs(60), self.calls)
            .await
            .expect("the echo pair's caller");
        self.service.close();
        result
    }
}
