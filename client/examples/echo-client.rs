//! Echo client: calls `org.example.Echo` once and prints the answer.
//!
//! ```text
//! cargo run --example echo-client -- "hello, bus"
//! ```

#[path = "common/echo.rs"]
mod echo;

use std::time::Duration;

use echo::{EchoReply, EchoRequest, SERVICE};
use pbus::Connection;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let text = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "hello".to_owned());
    let connection = Connection::builder()
        .client_name("echo-client")
        .build()
        .await?;
    let reply: EchoReply = connection
        .method_call(SERVICE, "Echo")
        .timeout(Duration::from_secs(5))
        .call(&EchoRequest { text })
        .await?;
    println!(
        "{} (echoed for {} uid={} pid={})",
        reply.text, reply.caller, reply.caller_uid, reply.caller_pid
    );
    Ok(())
}
