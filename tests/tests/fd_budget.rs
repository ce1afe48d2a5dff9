//! Fds the daemon holds for frames that never complete are charged to the
//! sender's uid in the daemon's fd budget (`max_fds_total`): half-sent
//! frames cannot make the daemon hold fds for free, and the offender is
//! refused with the limit named while other clients keep working.
#![forbid(unsafe_code)]

use pbus::proto::frame::encode_frame;
use pbus::proto::v1::ErrorCode;
use pbus_tests::fdkit::{borrow_all, dev_nulls};
use pbus_tests::frames::{call_header, expect_disconnect};
use pbus_tests::{wait_for, TestBus, TIMEOUT};

/// The first half of a call carrying `fds`: the prefix promises a body that
/// never comes, so the daemon must hold the fds for the incomplete frame.
fn half_frame(fds: usize) -> Vec<u8> {
    let header = call_header(1, "org.pbus.test.Nobody", "Take");
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
    let fds = dev_nulls(60);
    let borrowed = borrow_all(&fds);

    // 60 fds held for a half frame fit in the budget (the daemon's own uid
    // owns the pool and is held only to its total)...
    let mut first = bus.raw().await;
    first
        .send_bytes_with_fds(&half_frame(60), &borrowed)
        .await
        .unwrap();
    // (Nothing more can be sent on `first`: it would become the body.)
    let held = baseline + 2 + 60;
    wait_for("the daemon to hold the half frame's fds", TIMEOUT, || {
        bus.fd_count() >= held
    })
    .await;
    // ...a second half frame with 60 more does not: refused, named, closed.
    let mut second = bus.raw().await;
    second
        .send_bytes_with_fds(&half_frame(60), &borrowed)
        .await
        .unwrap();
    // The bus says why it closes the connection.
    expect_disconnect(
        &mut second,
        ErrorCode::LimitsExceeded,
        Some("max_fds_total"),
        "a second half frame over the fd budget",
    )
    .await;
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
