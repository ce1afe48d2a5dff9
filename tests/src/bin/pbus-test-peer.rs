//! `pbus-test-peer`: a small bus client the integration tests run as a
//! separate process (possibly under another uid via `setpriv`), so they can
//! compare what the bus stamps on its messages with what the kernel says
//! about a real child.
//!
//! ```text
//! pbus-test-peer SOCKET serve NAME
//!     own NAME; answer `WhoAmI` calls with an `Identity` holding this
//!     process's own ids and the caller as the bus stamped it; print
//!     `ready <unique-name>`.
//! pbus-test-peer SOCKET call DESTINATION METHOD TEXT
//!     print `connected <unique-name>`, call DESTINATION.METHOD with a
//!     `Text`, then print `ok <reply text>` or
//!     `error <code> <error name> <detail or ->`.
//! ```
//!
//! Either way it then runs until its stdin closes, so the test decides
//! when the process (and its connection) goes away. Exit status 2 means it
//! could not connect or was used wrongly.
#![forbid(unsafe_code)]

use std::io::Read;
use std::process::ExitCode;
use std::time::Duration;

use pbus::{Address, Connection, RequestNameFlags, RequestNameResult};
use pbus_tests::messages::{Identity, Text};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("pbus-test-peer: {message}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: &[String]) -> Result<(), String> {
    let [socket, command, rest @ ..] = args else {
        return Err("usage: pbus-test-peer SOCKET serve NAME | call DEST METHOD TEXT".into());
    };
    let connection = Connection::builder()
        .address(Address::unix(socket))
        .client_name("pbus-test-peer")
        .build()
        .await
        .map_err(|error| format!("cannot connect to {socket}: {error}"))?;
    match (command.as_str(), rest) {
        ("serve", [name]) => serve(&connection, name).await?,
        ("call", [destination, method, text]) => call(&connection, destination, method, text).await,
        _ => return Err(format!("bad command {command:?} {rest:?}")),
    }
    wait_for_stdin_eof().await;
    Ok(())
}

async fn serve(connection: &Connection, name: &str) -> Result<(), String> {
    let result = connection
        .request_name(name, RequestNameFlags::default())
        .await
        .map_err(|error| format!("RequestName {name}: {error}"))?;
    if result != RequestNameResult::PrimaryOwner {
        return Err(format!("{name} is taken: {result:?}"));
    }
    connection
        .serve(
            "WhoAmI",
            |_request: Text, call: pbus::MethodCall| async move {
                let mut identity = own_identity();
                identity.unique_name = call.connection.unique_name().to_owned();
                identity.caller = Some(call.incoming.sender().clone());
                Ok(identity)
            },
        )
        .map_err(|error| error.to_string())?;
    println!("ready {}", connection.unique_name());
    Ok(())
}

async fn call(connection: &Connection, destination: &str, method: &str, text: &str) {
    println!("connected {}", connection.unique_name());
    let result: Result<Text, pbus::Error> = connection
        .method_call(destination, method)
        .timeout(Duration::from_secs(10))
        .call(&Text::new(text))
        .await;
    match result {
        Ok(reply) => println!("ok {}", reply.text),
        Err(pbus::Error::Remote {
            code, name, detail, ..
        }) => {
            let detail = if detail.is_empty() {
                "-".into()
            } else {
                detail
            };
            println!("error {} {name} {detail}", code as i32);
        }
        Err(other) => println!("error 0 local {other}"),
    }
}

/// This process's ids as the kernel reports them.
fn own_identity() -> Identity {
    let status = pbus_tests::proc_status(std::process::id());
    Identity {
        unique_name: String::new(),
        uid: status.uid,
        gid: status.gid,
        pid: std::process::id(),
        groups: status.groups,
        caller: None,
    }
}

async fn wait_for_stdin_eof() {
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
    })
    .await;
}
