//! A thousand clients at once: each connects, makes ten calls to one echo
//! service while all the others are connected and calling too, and checks
//! every answer. Afterwards the daemon's fd count returns to what it was
//! before they came, so no connection left anything behind.
#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pbus::Connection;
use pbus_tests::messages::Text;
use pbus_tests::{unique_names, within, TestBus};
use tokio::sync::{Barrier, Semaphore};

const CLIENTS: usize = 1000;
const CALLS_PER_CLIENT: usize = 10;
const SERVICE: &str = "org.pbus.test.Echo";
/// Handshakes in flight at once, well under the daemon's limits on
/// incomplete handshakes (per uid and in total) and the listen backlog:
/// this test is about many established connections, not a connect storm.
const CONNECTING_AT_ONCE: usize = 16;

/// Connects, retrying while the listen backlog is full (a non-blocking
/// connect then fails with EAGAIN).
async fn connect(bus_address: pbus::Address) -> Connection {
    let mut attempts = 0;
    loop {
        match Connection::builder()
            .address(bus_address.clone())
            .build()
            .await
        {
            Ok(connection) => return connection,
            Err(pbus::Error::Io(error))
                if error.kind() == std::io::ErrorKind::WouldBlock && attempts < 1000 =>
            {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(error) => panic!("client cannot connect: {error}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_clients() {
    let limit = pbus_sys::process::raise_fd_limit(None).expect("raise RLIMIT_NOFILE");
    assert!(
        limit.soft >= (CLIENTS as u64) * 2 + 100,
        "RLIMIT_NOFILE {} is too low for {CLIENTS} clients",
        limit.soft
    );
    let started = Instant::now();
    let bus = TestBus::start();
    let service = bus.connect_owning(SERVICE).await;
    service
        .serve("Echo", |request: Text, call: pbus::MethodCall| async move {
            Ok(Text::new(format!(
                "{}|{}",
                request.text,
                call.incoming.sender().unique_name
            )))
        })
        .unwrap();
    let baseline = bus.settled_fd_count().await;

    // Everyone connects (a bounded number of handshakes at a time), then
    // everyone calls at once.
    let connecting = Arc::new(Semaphore::new(CONNECTING_AT_ONCE));
    let all_connected = Arc::new(Barrier::new(CLIENTS + 1));
    let calls_done = Arc::new(Barrier::new(CLIENTS + 1));
    let mut clients = Vec::with_capacity(CLIENTS);
    for index in 0..CLIENTS {
        let connecting = Arc::clone(&connecting);
        let all_connected = Arc::clone(&all_connected);
        let calls_done = Arc::clone(&calls_done);
        let address = bus.address();
        clients.push(tokio::spawn(async move {
            let permit = connecting.acquire_owned().await.unwrap();
            let connection = connect(address).await;
            drop(permit);
            all_connected.wait().await;
            let mut answered = 0;
            for call in 0..CALLS_PER_CLIENT {
                let text = format!("{index}.{call}");
                let reply: Text = connection
                    .method_call(SERVICE, "Echo")
                    .timeout(Duration::from_secs(60))
                    .call(&Text::new(text.clone()))
                    .await
                    .unwrap_or_else(|error| panic!("client {index} call {call}: {error}"));
                assert_eq!(
                    reply.text,
                    format!("{text}|{}", connection.unique_name()),
                    "client {index} got someone else's answer"
                );
                answered += 1;
            }
            // Stay connected until everyone has finished calling.
            calls_done.wait().await;
            drop(connection);
            answered
        }));
    }
    within(
        "all clients to connect",
        Duration::from_secs(60),
        all_connected.wait(),
    )
    .await;
    let connected_fds = bus.fd_count();
    assert!(
        connected_fds >= baseline + CLIENTS,
        "the daemon holds {connected_fds} fds with {CLIENTS} clients (baseline {baseline})"
    );
    assert_eq!(
        unique_names(&service).await.len(),
        CLIENTS + 1,
        "every client (and the service) is on the bus"
    );
    within(
        "all clients to finish calling",
        Duration::from_secs(60),
        calls_done.wait(),
    )
    .await;
    let mut answered = 0;
    for client in clients {
        answered += within("a client task", Duration::from_secs(30), client)
            .await
            .expect("client task");
    }
    assert_eq!(answered, CLIENTS * CALLS_PER_CLIENT);

    // Every connection is gone from the daemon again.
    bus.wait_for_fd_count(baseline, Duration::from_secs(20))
        .await;
    assert_eq!(
        unique_names(&service).await,
        BTreeSet::from([service.unique_name().to_owned()]),
        "only the service is left"
    );
    eprintln!(
        "{CLIENTS} clients x {CALLS_PER_CLIENT} calls in {:?}; daemon rss {} KiB",
        started.elapsed(),
        bus.rss_kib()
    );
}
