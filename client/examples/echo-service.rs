//! Echo service: owns `org.example.Echo`, answers `Echo` calls with the
//! text and the caller's identity as the bus stamped it, and emits an
//! `Echoed` signal for each call.
//!
//! ```text
//! cargo run --example echo-service
//! ```

#[path = "common/echo.rs"]
mod echo;

use echo::{EchoReply, EchoRequest, SERVICE};
use pbus::{Connection, RequestNameFlags, RequestNameResult};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let connection = Connection::builder()
        .client_name("echo-service")
        .build()
        .await?;
    let result = connection
        .request_name(SERVICE, RequestNameFlags::default())
        .await?;
    if result != RequestNameResult::PrimaryOwner {
        anyhow::bail!("{SERVICE} is taken ({result:?})");
    }
    connection.serve(
        "Echo",
        |request: EchoRequest, call: pbus::MethodCall| async move {
            let sender = call.incoming.sender();
            let reply = EchoReply {
                text: request.text.clone(),
                caller: sender.unique_name.clone(),
                caller_uid: sender.uid,
                caller_pid: sender.pid,
            };
            call.connection
                .emit_signal("/org/example/echo", "Echoed", &[&request.text], &request)
                .await?;
            Ok(reply)
        },
    )?;
    println!("{SERVICE} ready as {}", connection.unique_name());
    tokio::signal::ctrl_c().await?;
    Ok(())
}
