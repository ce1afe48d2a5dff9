//! Fds the daemon holds for frames that never complete are charged to the
//! sender's uid in the daemon's fd budget (`max_fds_total`): half-sent
//! frames cannot make the daemon hold fds for free, and the offender is
//! refused with the limit named while other clients keep working.
#![forbid(unsafe_code)]

use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use pbus::proto::frame::encode_frame;
use pbus::proto::v1::{ErrorCode, Header, MessageKind};
use pbus_tests::TestBus;

const TIMEOUT: Duration = Duration::from_secs(10);

fn dev_null() -> OwnedFd {
    OwnedFd::from(std::fs::File::open("/dev/null").unwrap())
}

/// The first half of a call carrying `fds`: the prefix promises a body that
/// never comes, so the daemon must hold the fds for the incomplete frame.
fn half_frame(fds: usize) -> Vec<u8> {
    let header = Header {
        kind: MessageKind::MethodCall as i32,
        serial: 1,
        destination: "org.pbus.test.Nobody".into(),
        member: "Take".into(),
        ..Header::default()
    };
    let mut bytes = Vec::new();
    encode_frame(&mut bytes, &header, &[0u8; 4096], fds as u16);
    bytes.truncate(bytes.len() - 2048);
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fds_of_incomplete_frames_count_against_the_fd_budget() {
    let bus = TestBus::with_config("[limits]\nmax_fds_total = 100\nmax_fds_per_message = 253\n");
    let baseline = bus.settled_fd_count().await;
    let probe = bus.connect().await;
    probe.ping().await.unwrap();
    let fds: Vec<OwnedFd> = (0..60).map(|_| dev_null()).collect();
    let borrowed: Vec<_> = fds.iter().map(AsFd::as_fd).collect();

    // 60 fds held for a half frame fit in the budget (the daemon's own uid
    // owns the pool and is held only to its total)...
    let mut first = bus.raw().await;
    first
        .send_bytes_with_fds(&half_frame(60), &borrowed)
        .await
        .unwrap();
    // (Nothing more can be sent on `first`: it would become the body.)
    let held = baseline + 2 + 60;
    pbus_tests::wait_for("the daemon to hold the half frame's fds", TIMEOUT, || {
        bus.fd_count() >= held
    })
    .await;
    // ...a second half frame with 60 more does not: refused, named, closed.
    let mut second = bus.raw().await;
    second
        .send_bytes_with_fds(&half_frame(60), &borrowed)
        .await
        .unwrap();
    let frames = second.read_until_closed(TIMEOUT).await.unwrap();
    let refusal = frames
        .iter()
        .find_map(|frame| frame.error().cloned())
        .expect("the bus said why it closed the connection");
    assert_eq!(
        refusal.code,
        ErrorCode::LimitsExceeded as i32,
        "{refusal:?}"
    );
    assert_eq!(refusal.detail, "max_fds_total");
    // The daemon never held more than its budget.
    assert!(
        bus.fd_count() < baseline + 100,
        "the daemon holds {} fds, baseline {baseline}",
        bus.fd_count()
    );
    // Others still work; and once the first client goes, its fds are gone
    // and the budget is back.
    probe.ping().await.unwrap();
    drop(first);
    drop(second);
    bus.wait_for_fd_count(baseline + 1, TIMEOUT).await;
    let stats = probe.stats().await.unwrap();
    assert_eq!(
        stats.fds_total, 1,
        "only the probe's socket is charged: {stats:?}"
    );
}
