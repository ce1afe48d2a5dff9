//! Starting and stopping the daemon: SIGTERM exits 0, removes the socket
//! file and disconnects every client (calls still waiting fail with
//! Disconnected, signal streams end); a second daemon refuses a socket a
//! live daemon serves; a stale socket file left by a killed daemon is
//! replaced.
#![forbid(unsafe_code)]

use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

use pbus::{Error, MatchRule, MethodError};
use pbus_tests::messages::Text;
use pbus_tests::{pbusd_command, wait_for, within, RawError, TestBus, TIMEOUT};
use tokio::sync::mpsc;

const SERVICE: &str = "org.pbus.test.Shutdown";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_disconnects_everyone_and_exits_cleanly() {
    let mut bus = TestBus::start();
    let service = bus.connect_owning(SERVICE).await;
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel();
    service
        .serve("Hang", move |_request: Text, _call| {
            let arrived_tx = arrived_tx.clone();
            async move {
                let _ = arrived_tx.send(());
                std::future::pending::<Result<Text, MethodError>>().await
            }
        })
        .unwrap();
    let caller = bus.connect().await;
    let mut signals = caller
        .subscribe(MatchRule::new().member("Never"))
        .await
        .unwrap();
    let pending = tokio::spawn({
        let caller = caller.clone();
        async move {
            caller
                .method_call(SERVICE, "Hang")
                .timeout(Duration::from_secs(60))
                .call::<Text, Text>(&Text::new("wait"))
                .await
        }
    });
    within("the call to arrive", TIMEOUT, arrived.recv()).await;
    let mut raw = bus.raw().await;
    raw.sync().await;

    let status = bus.stop();
    assert!(status.success(), "pbusd exited with {status}");
    assert!(
        !bus.socket_path().exists(),
        "the socket file is still there after a clean shutdown"
    );

    let result = within("the pending call to fail", TIMEOUT, pending)
        .await
        .unwrap();
    assert!(
        matches!(result, Err(Error::Disconnected)),
        "a call pending at shutdown ended with {result:?}"
    );
    assert_eq!(
        within("the signal stream to end", TIMEOUT, signals.next())
            .await
            .map(|s| s.member().to_owned()),
        None
    );
    wait_for("both clients to see the disconnect", TIMEOUT, || {
        caller.is_closed() && service.is_closed()
    })
    .await;
    assert!(matches!(caller.ping().await, Err(Error::Disconnected)));
    // At the wire level the connection simply ends.
    let frames = raw
        .read_until_closed(TIMEOUT)
        .await
        .unwrap_or_else(|error| panic!("the raw client was not disconnected: {error}"));
    assert!(
        frames
            .iter()
            .all(|frame| frame.is_bus_signal() || frame.error().is_some()),
        "{frames:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_daemon_refuses_a_live_socket() {
    let bus = TestBus::start();
    let mut second = pbusd_command()
        .arg("--listen")
        .arg(bus.socket_path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn a second pbusd");
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            panic!("a second pbusd kept running on a live socket");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stderr = String::new();
    second
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success(), "the second pbusd exited with {status}");
    assert!(
        stderr.contains("live daemon"),
        "the refusal does not say why: {stderr:?}"
    );
    // The first daemon is unharmed and keeps its socket.
    assert!(bus.socket_path().exists());
    let client = bus.connect().await;
    client.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_socket_is_replaced() {
    let mut first = TestBus::start();
    let client = first.connect().await;
    let status = first.kill();
    assert!(!status.success());
    assert!(
        first.socket_path().exists(),
        "a killed daemon cannot remove its socket"
    );
    wait_for("the client to notice", TIMEOUT, || client.is_closed()).await;
    let refused = std::os::unix::net::UnixStream::connect(first.socket_path()).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);

    let mut second = TestBus::builder().socket_path(first.socket_path()).start();
    let client = second.connect().await;
    client.ping().await.unwrap();
    let mut raw = second.raw().await;
    raw.sync().await;
    assert!(second.stop().success());
    assert!(!second.socket_path().exists());
    assert!(matches!(
        raw.read_until_closed(TIMEOUT).await,
        Ok(_) | Err(RawError::Closed)
    ));
}
