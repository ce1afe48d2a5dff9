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
//!
//! Subcommands for the container and pid-translation tests (see
//! `pbus_tests::containers`, which parses their output):
//!
//! ```text
//! pbus-test-peer SOCKET interact NAME|-
//!     own NAME (unless `-`), answer `WhoAmI` like `serve`, print
//!     `ready <unique-name>`, then answer one line per stdin line:
//!       whoami DEST   call DEST.WhoAmI: `whoami sender=<u> sender_pid=<p>
//!                     own_pid=<p> caller=<u> caller_pid=<p> runtime=<r>
//!                     id=<id> pod=<uid>` (the reply's stamp as this peer
//!                     sees it, DEST's own getpid, and this peer as DEST saw
//!                     it stamped on the call)
//!       identity NAME GetPeerIdentity (`-`: this connection): `identity
//!                     name=<u> pid=<p> host_pid=<p> runtime=<r> id=<id>
//!                     pod=<uid> cgroup=<path>`
//!       ping          Ping the bus: `pong`
//!       listen MEMBER subscribe to broadcast signals named MEMBER:
//!                     `listening MEMBER`
//!       emit MEMBER TEXT
//!                     broadcast signal MEMBER (path `/test`) with a `Text`:
//!                     `emitted MEMBER`
//!       next-signal MEMBER
//!                     the next MEMBER signal received (waits up to 10 s):
//!                     `signal sender=<u> sender_pid=<p> text=<t>
//!                     runtime=<r> id=<id> pod=<uid>`
//!     Failures answer `error <code> <error name>`; empty values print `-`.
//!     It exits when stdin closes.
//! pbus-test-peer SOCKET connect-and-exit
//!     connect, send HELLO, print `sent <pid>` and exit at once without
//!     waiting for the answer.
//! pbus-test-peer SOCKET hand-over
//!     like connect-and-exit, but first pass the connected socket over
//!     stdin (which must be a Unix socket) with SCM_RIGHTS, so another
//!     process keeps it open after this one is gone.
//! ```
//!
//! Commands for the fd, memfd and quota tests (each connects only the
//! connection it describes, and also runs until stdin closes):
//!
//! ```text
//! pbus-test-peer SOCKET echo NAME
//!     own NAME; answer `Echo` calls with the `Text` they carry; print
//!     `ready <unique-name>`.
//! pbus-test-peer SOCKET fd-sink NAME
//!     own NAME; answer `Take` calls with `took <number of fds>`; print
//!     `ready <unique-name>`, and `disconnected` if the connection ends
//!     (e.g. because received fds were truncated).
//! pbus-test-peer SOCKET send-fds DESTINATION COUNT
//!     (raw client) print `connected <unique-name>`, send a `Take` call
//!     with COUNT fds (of /dev/null), then print `answer <code> <detail>
//!     <message>` (code 0 for a METHOD_RETURN) or, if the bus hangs up,
//!     `closed <code> <detail> <message>` of its last ERROR.
//! pbus-test-peer SOCKET flood DESTINATION SIZE MAX
//!     (raw client) print `connected <unique-name>`, then send unicast
//!     signals with SIZE-byte bodies one at a time until one is refused or
//!     MAX were accepted; print `flooded <accepted> <code> <detail>
//!     <message>` (code 0 if none was refused).
//! pbus-test-peer SOCKET fd-flood RECEIVERS FRAMES FDS
//!     (raw clients) connect RECEIVERS connections that never read after
//!     the handshake, print `connected <unique-name>` for a flooder, send
//!     FRAMES unicast signals with FDS fds (of /dev/null) each to the
//!     receivers in turn (a Ping after each), then wait until no refusal has arrived for a
//!     second and print `fd-flooded <sent> <refused> <detail of the last
//!     refusal or ->`. The receivers stay connected until stdin closes.
//! pbus-test-peer SOCKET ping-loop
//!     print `connected <unique-name>`, then ping the bus every 10 ms and
//!     print `pong <round trip in microseconds>` for each.
//! ```
//!
//! Details and messages print as `-` when empty.
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
    if let Some(result) = run_extra(socket, command, rest).await {
        return result;
    }
    if let Some(result) = run_unconnected(socket, command, rest) {
        return result;
    }
    let connection = connect_library(socket).await?;
    match (command.as_str(), rest) {
        ("serve", [name]) => serve(&connection, name).await?,
        ("call", [destination, method, text]) => call(&connection, destination, method, text).await,
        ("interact", [name]) => interact(&connection, name).await?,
        _ => return Err(format!("bad command {command:?} {rest:?}")),
    }
    wait_for_stdin_eof().await;
    Ok(())
}

async fn serve(connection: &Connection, name: &str) -> Result<(), String> {
    own(connection, name).await?;
    serve_who_am_i(connection)?;
    println!("ready {}", connection.unique_name());
    Ok(())
}

/// Answers `WhoAmI` calls with this process's own ids and the caller as
/// the bus stamped it.
fn serve_who_am_i(connection: &Connection) -> Result<(), String> {
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
        .map_err(|error| error.to_string())
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

/// The lines of stdin, read on a thread of their own; the channel ends
/// with stdin.
fn stdin_lines() -> tokio::sync::mpsc::UnboundedReceiver<String> {
    use std::io::BufRead;
    let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    lines
}

async fn wait_for_stdin_eof() {
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
    })
    .await;
}

/// The subcommands that must not connect through the client library
/// (`connect-and-exit`, `hand-over`); `None` for every other command.
fn run_unconnected(socket: &str, command: &str, rest: &[String]) -> Option<Result<(), String>> {
    let hand_over = match (command, rest) {
        ("connect-and-exit", []) => false,
        ("hand-over", []) => true,
        _ => return None,
    };
    Some(connect_and_exit(socket, hand_over))
}

/// Connects, sends HELLO and returns at once (the process then exits);
/// with `hand_over`, the connected socket is first passed over stdin.
fn connect_and_exit(socket: &str, hand_over: bool) -> Result<(), String> {
    use std::io::{IoSlice, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    use pbus_proto::v1::Feature;

    let mut stream = UnixStream::connect(socket)
        .map_err(|error| format!("cannot connect to {socket}: {error}"))?;
    let (header, hello) = pbus_tests::frames::hello(
        pbus_proto::PROTOCOL_VERSION,
        Feature::FdPassing as u32,
        "pbus-test-peer (gone at once)",
    );
    let mut frame = Vec::new();
    pbus_proto::frame::encode_frame(&mut frame, &header, &hello, 0);
    stream
        .write_all(&frame)
        .map_err(|error| format!("cannot send HELLO: {error}"))?;
    if hand_over {
        let stdin = std::io::stdin();
        let sent = pbus_sys::fdpass::send_with_fds(
            stdin.as_fd(),
            &[IoSlice::new(b"S")],
            &[stream.as_fd()],
        )
        .map_err(|error| format!("cannot pass the socket over stdin: {error}"))?;
        if sent != 1 {
            return Err("passing the socket over stdin wrote nothing".into());
        }
    }
    println!("sent {}", std::process::id());
    Ok(())
}

/// `interact`: serve WhoAmI (owning `name` unless it is `-`), then answer
/// the commands on stdin until it closes.
async fn interact(connection: &Connection, name: &str) -> Result<(), String> {
    if name != "-" {
        own(connection, name).await?;
    }
    serve_who_am_i(connection)?;
    println!("ready {}", connection.unique_name());
    let mut lines = stdin_lines();
    let mut streams: std::collections::HashMap<String, pbus::SignalStream> =
        std::collections::HashMap::new();
    while let Some(line) = lines.recv().await {
        let words: Vec<&str> = line.split_whitespace().collect();
        let answer = match words.as_slice() {
            ["whoami", destination] => who_is(connection, destination).await,
            ["identity", name] => identity_of(connection, name).await,
            ["ping"] => match connection.ping().await {
                Ok(_) => "pong".to_owned(),
                Err(error) => error_line(&error),
            },
            ["listen", member] => match connection
                .subscribe(pbus::MatchRule::new().member(member))
                .await
            {
                Ok(stream) => {
                    streams.insert((*member).to_owned(), stream);
                    format!("listening {member}")
                }
                Err(error) => error_line(&error),
            },
            ["emit", member, text] => match connection
                .emit_signal("/test", member, &[], &Text::new(*text))
                .await
            {
                Ok(()) => format!("emitted {member}"),
                Err(error) => error_line(&error),
            },
            ["next-signal", member] => match streams.get_mut(*member) {
                Some(stream) => next_signal(stream).await,
                None => format!("error 0 not-listening-to-{member}"),
            },
            _ => format!("error 0 bad-command {}", line.replace(' ', "_")),
        };
        println!("{answer}");
    }
    Ok(())
}

/// `-` for an empty value, so every `key=value` is one word.
fn or_dash(value: &str) -> &str {
    if value.is_empty() {
        "-"
    } else {
        value
    }
}

/// `<detail> <message>` of an error, each `-` when empty.
fn detail_and_message(info: &pbus_proto::v1::ErrorInfo) -> String {
    format!("{} {}", or_dash(&info.detail), or_dash(&info.message))
}

fn container_words(container: Option<&pbus_proto::v1::ContainerInfo>) -> String {
    let container = container.cloned().unwrap_or_default();
    let runtime = pbus_proto::v1::ContainerRuntime::try_from(container.runtime)
        .map(|runtime| runtime.as_str_name().to_owned())
        .unwrap_or_else(|_| container.runtime.to_string());
    format!(
        "runtime={runtime} id={} pod={}",
        or_dash(&container.id),
        or_dash(&container.pod_uid)
    )
}

fn error_line(error: &pbus::Error) -> String {
    match error {
        pbus::Error::Remote { code, name, .. } => format!("error {} {name}", *code as i32),
        other => format!("error 0 local:{}", other.to_string().replace(' ', "_")),
    }
}

async fn who_is(connection: &Connection, destination: &str) -> String {
    let result = connection
        .method_call(destination, "WhoAmI")
        .timeout(Duration::from_secs(10))
        .send(pbus::Outgoing::new(&Text::new("who")))
        .await;
    let reply = match result {
        Ok(Some(reply)) => reply,
        Ok(None) => return "error 0 no-reply".into(),
        Err(error) => return error_line(&error),
    };
    let identity: Identity = match reply.decode() {
        Ok(identity) => identity,
        Err(error) => return error_line(&error),
    };
    let sender = reply.sender();
    let caller = identity.caller.unwrap_or_default();
    format!(
        "whoami sender={} sender_pid={} own_pid={} caller={} caller_pid={} {}",
        or_dash(&sender.unique_name),
        sender.pid,
        identity.pid,
        or_dash(&caller.unique_name),
        caller.pid,
        container_words(sender.container.as_ref())
    )
}

async fn identity_of(connection: &Connection, name: &str) -> String {
    let name = if name == "-" { "" } else { name };
    match connection.peer_identity(name).await {
        Ok(identity) => format!(
            "identity name={} pid={} host_pid={} {} cgroup={}",
            or_dash(&identity.unique_name),
            identity.pid,
            identity.host_pid,
            container_words(identity.container.as_ref()),
            or_dash(&identity.cgroup)
        ),
        Err(error) => error_line(&error),
    }
}

/// Runs one of the commands for the fd, memfd and quota tests; `None` if
/// `command` is not one of them.
async fn run_extra(socket: &str, command: &str, rest: &[String]) -> Option<Result<(), String>> {
    let result = match (command, rest) {
        ("echo", [name]) => echo(socket, name).await,
        ("fd-sink", [name]) => fd_sink(socket, name).await,
        ("send-fds", [destination, count]) => match count.parse() {
            Ok(count) => send_fds(socket, destination, count).await,
            Err(error) => Err(format!("bad fd count {count:?}: {error}")),
        },
        ("flood", [destination, size, max]) => match (size.parse(), max.parse()) {
            (Ok(size), Ok(max)) => flood(socket, destination, size, max).await,
            _ => Err(format!("bad size or count {size:?} {max:?}")),
        },
        ("fd-flood", [receivers, frames, fds]) => {
            match (receivers.parse(), frames.parse(), fds.parse()) {
                (Ok(receivers), Ok(frames), Ok(fds)) => {
                    fd_flood(socket, receivers, frames, fds).await
                }
                _ => Err(format!("bad numbers {receivers:?} {frames:?} {fds:?}")),
            }
        }
        ("ping-loop", []) => ping_loop(socket).await,
        ("policy-probe", [name]) => policy_probe(socket, name).await,
        _ => return None,
    };
    Some(result)
}

async fn connect_library(socket: &str) -> Result<Connection, String> {
    Connection::builder()
        .address(Address::unix(socket))
        .client_name("pbus-test-peer")
        .build()
        .await
        .map_err(|error| format!("cannot connect to {socket}: {error}"))
}

async fn connect_raw(socket: &str) -> Result<pbus_tests::RawClient, String> {
    let client = pbus_tests::RawClient::connect_hello(std::path::Path::new(socket))
        .await
        .map_err(|error| format!("cannot connect to {socket}: {error}"))?;
    println!("connected {}", client.unique_name());
    Ok(client)
}

async fn own(connection: &Connection, name: &str) -> Result<(), String> {
    match connection
        .request_name(name, RequestNameFlags::default())
        .await
    {
        Ok(RequestNameResult::PrimaryOwner) => Ok(()),
        Ok(other) => Err(format!("{name} is taken: {other:?}")),
        Err(error) => Err(format!("RequestName {name}: {error}")),
    }
}

async fn echo(socket: &str, name: &str) -> Result<(), String> {
    let connection = connect_library(socket).await?;
    own(&connection, name).await?;
    connection
        .serve("Echo", |request: Text, _call| async move { Ok(request) })
        .map_err(|error| error.to_string())?;
    println!("ready {}", connection.unique_name());
    // Keep the connection until stdin closes.
    wait_for_stdin_eof().await;
    drop(connection);
    Ok(())
}

async fn fd_sink(socket: &str, name: &str) -> Result<(), String> {
    let connection = connect_library(socket).await?;
    own(&connection, name).await?;
    connection
        .serve_raw("Take", |call: pbus::MethodCall| async move {
            let count = call.incoming.fds().len();
            Ok(pbus::Outgoing::new(&Text::new(format!("took {count}"))))
        })
        .map_err(|error| error.to_string())?;
    println!("ready {}", connection.unique_name());
    let closed = async {
        while !connection.is_closed() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::select! {
        _ = wait_for_stdin_eof() => return Ok(()),
        _ = closed => println!("disconnected"),
    }
    wait_for_stdin_eof().await;
    Ok(())
}

async fn send_fds(socket: &str, destination: &str, count: usize) -> Result<(), String> {
    use pbus_proto::v1::MessageKind;
    use pbus_tests::RawError;
    let mut client = connect_raw(socket).await?;
    let fds = pbus_tests::fdkit::dev_nulls(count);
    let serial = client
        .send_call_with_fds(destination, "Take", &fds)
        .await
        .map_err(|error| format!("cannot send {count} fds: {error}"))?;
    drop(fds);
    let mut last_error = None;
    loop {
        match client.recv(pbus_tests::TIMEOUT).await {
            Ok(frame)
                if frame.header.reply_serial == serial
                    && matches!(frame.kind(), MessageKind::MethodReturn | MessageKind::Error) =>
            {
                let info = frame.header.error.unwrap_or_default();
                println!("answer {} {}", info.code, detail_and_message(&info));
                wait_for_stdin_eof().await;
                return Ok(());
            }
            Ok(frame) if frame.kind() == MessageKind::Error => {
                last_error = frame.header.error;
            }
            Ok(_) => {}
            Err(RawError::Closed) => {
                let info = last_error.unwrap_or_default();
                println!("closed {} {}", info.code, detail_and_message(&info));
                wait_for_stdin_eof().await;
                return Ok(());
            }
            Err(error) => return Err(format!("waiting for the answer: {error}")),
        }
    }
}

async fn flood(socket: &str, destination: &str, size: usize, max: u64) -> Result<(), String> {
    let mut client = connect_raw(socket).await?;
    // Serials from 1000 on encode in two bytes, so every frame of the
    // flood has the same size (and the same quota charge).
    while client.next_serial() < 1000 {}
    let body = vec![b'f'; size];
    let mut accepted = 0u64;
    while accepted < max {
        let serial = client
            .send_signal(destination, "/org/pbus/test/flood", "Flood", &[], &body)
            .await
            .map_err(|error| format!("send: {error}"))?;
        if let Some(info) = client.refusal_of(serial).await {
            println!(
                "flooded {accepted} {} {}",
                info.code,
                detail_and_message(&info)
            );
            wait_for_stdin_eof().await;
            return Ok(());
        }
        accepted += 1;
    }
    println!("flooded {accepted} 0 - -");
    wait_for_stdin_eof().await;
    Ok(())
}

async fn fd_flood(
    socket: &str,
    receivers: usize,
    frames: usize,
    fds_per_frame: usize,
) -> Result<(), String> {
    use pbus_proto::v1::MessageKind;
    let path = std::path::Path::new(socket);
    let mut sinks = Vec::new();
    for _ in 0..receivers {
        let sink = pbus_tests::RawClient::connect_hello(path)
            .await
            .map_err(|error| format!("cannot connect a receiver: {error}"))?;
        sinks.push(sink);
    }
    let mut flooder = connect_raw(socket).await?;
    let mut serials = Vec::new();
    for index in 0..frames {
        let destination = sinks[index % receivers].unique_name().to_owned();
        let header = pbus_tests::frames::signal_header(
            flooder.next_serial(),
            &destination,
            "/org/pbus/test/flood",
            "Fds",
        );
        let fds = pbus_tests::fdkit::dev_nulls(fds_per_frame);
        flooder
            .send_with_fds(&header, &[], &pbus_tests::fdkit::borrow_all(&fds))
            .await
            .map_err(|error| format!("send: {error}"))?;
        serials.push(header.serial);
        // One frame at a time: the bus passes each on before the next
        // arrives, so only fds in flight pile up, not fds it holds.
        flooder.sync().await;
    }
    // Refusals of frames the bus could not pass come when it tries to
    // write them: collect until a second goes by without one.
    let mut refused = 0usize;
    let mut last = None;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        flooder.sync().await;
        let before = refused;
        for frame in flooder.take_inbox() {
            if frame.kind() == MessageKind::Error && serials.contains(&frame.header.reply_serial) {
                refused += 1;
                last = frame.header.error;
            }
        }
        if refused == before {
            break;
        }
    }
    let detail = last.map_or_else(|| "-".to_owned(), |info| detail_and_message(&info));
    println!("fd-flooded {frames} {refused} {detail}");
    wait_for_stdin_eof().await;
    drop(sinks);
    Ok(())
}

async fn ping_loop(socket: &str) -> Result<(), String> {
    let connection = connect_library(socket).await?;
    println!("connected {}", connection.unique_name());
    let pings = async {
        loop {
            let started = std::time::Instant::now();
            match connection.ping().await {
                Ok(_) => println!("pong {}", started.elapsed().as_micros()),
                Err(error) => {
                    println!("ping-error {error}");
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::select! {
        _ = wait_for_stdin_eof() => return Ok(()),
        _ = pings => {}
    }
    wait_for_stdin_eof().await;
    Ok(())
}

async fn next_signal(stream: &mut pbus::SignalStream) -> String {
    let signal = match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
        Ok(Some(signal)) => signal,
        Ok(None) => return "error 0 connection-closed".into(),
        Err(_) => return "error 0 timeout".into(),
    };
    let text = signal
        .decode::<Text>()
        .map(|text| text.text)
        .unwrap_or_else(|_| "?".into());
    let sender = signal.sender();
    format!(
        "signal sender={} sender_pid={} text={} {}",
        or_dash(&sender.unique_name),
        sender.pid,
        or_dash(&text),
        container_words(sender.container.as_ref())
    )
}

/// `pbus-test-peer SOCKET policy-probe NAME|-`, for the policy tests
/// (`tests/tests/policy*.rs`, which parse its answers): own NAME (unless
/// `-`), answer `Echo` and `Other` calls with `<member> fds=<n>
/// memfds=<m>`, count them and unicast `Poke` signals, print `ready
/// <unique-name>`, then answer one line per stdin line:
///
/// ```text
/// call DEST MEMBER       call DEST.MEMBER with a Text: `ok <reply text>`
/// call-fd DEST MEMBER    the same with a pipe's write end attached
/// signal DEST MEMBER     (a raw connection of this process, made on first
///                        use) unicast signal DEST.MEMBER, then a Ping:
///                        `sent` or the bus's error for it
/// received               `received Echo=<n> Other=<n> Poke=<n>`
/// names                  ListNames with unique names: `names <a,b,..|->`
/// has-owner NAME         `has-owner true|false`
/// owner NAME             GetNameOwner: `owner <unique>`
/// queued NAME            ListQueuedOwners: `queued <a,b,..|->`
/// request NAME [FLAGS]   RequestName, FLAGS a comma-separated list of
///                        `allow-replacement`, `replace-existing`,
///                        `do-not-queue`: `request <PrimaryOwner|InQueue|..>`
/// release NAME           ReleaseName: `release <Released|..>`
/// watch                  subscribe to NameOwnerChanged: `watching`
/// changes-until NAME     NameOwnerChanged signals received until one for
///                        NAME (10 s): `changes <name|old|new;..>`
/// listen MEMBER          subscribe to signals MEMBER: `listening MEMBER`
/// emit MEMBER TEXT       broadcast signal MEMBER: `emitted MEMBER`
/// signals-until MEMBER TEXT
///                        MEMBER signals received until one carrying TEXT
///                        (10 s): `signals <sender|text;..>`
/// eavesdrop              AddMatch with eavesdrop: `ok`
/// explain SUBJECT RIGHT TARGET MEMBER
///                        ExplainPolicy (`-` for empty): `explain
///                        <allowed|denied> <deciding rule>`
/// reload                 ReloadPolicy: `reloaded rules=<n> peers=<n>`
/// stats                  GetStats: `stats peers=<a,b,..> uids=<uid:conns,..>`
/// ping                   `pong`
/// ```
///
/// Failures answer `error <code> <name> <detail|-> <message>`; timeouts
/// and local failures have code 0.
async fn policy_probe(socket: &str, name: &str) -> Result<(), String> {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    type Counts = Arc<Mutex<BTreeMap<&'static str, u64>>>;
    fn bump(counts: &Counts, member: &'static str) {
        *counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(member)
            .or_default() += 1;
    }

    let connection = connect_library(socket).await?;
    if name != "-" {
        own(&connection, name).await?;
    }
    let counts: Counts = Arc::new(Mutex::new(
        [("Echo", 0), ("Other", 0), ("Poke", 0)]
            .into_iter()
            .collect(),
    ));
    for member in ["Echo", "Other"] {
        let counts = Arc::clone(&counts);
        connection
            .serve_raw(member, move |call: pbus::MethodCall| {
                bump(&counts, member);
                let text = format!(
                    "{member} fds={} memfds={}",
                    call.incoming.fds().len(),
                    call.incoming.memfds().len() + usize::from(call.incoming.body().is_memfd())
                );
                async move { Ok(pbus::Outgoing::new(&Text::new(text))) }
            })
            .map_err(|error| error.to_string())?;
    }
    let mut pokes = connection
        .subscribe(pbus::MatchRule::new().member("Poke"))
        .await
        .map_err(|error| format!("subscribe to Poke: {error}"))?;
    {
        let counts = Arc::clone(&counts);
        tokio::spawn(async move {
            while pokes.next().await.is_some() {
                bump(&counts, "Poke");
            }
        });
    }
    println!("ready {}", connection.unique_name());
    let mut lines = stdin_lines();
    let mut raw: Option<pbus_tests::RawClient> = None;
    let mut owner_changes: Option<pbus::SignalStream> = None;
    let mut streams: std::collections::HashMap<String, pbus::SignalStream> =
        std::collections::HashMap::new();
    let list = |items: Vec<String>| {
        if items.is_empty() {
            "-".to_owned()
        } else {
            items.join(",")
        }
    };
    let dash = |word: &str| {
        if word == "-" {
            String::new()
        } else {
            word.to_owned()
        }
    };
    while let Some(line) = lines.recv().await {
        let words: Vec<&str> = line.split_whitespace().collect();
        let answer = match words.as_slice() {
            ["call", destination, member] | ["call-fd", destination, member] => {
                let mut outgoing = pbus::Outgoing::new(&Text::new("probe"));
                if words[0] == "call-fd" {
                    let (_read, write) = std::io::pipe().map_err(|error| error.to_string())?;
                    outgoing = outgoing.fd(write.into());
                }
                match connection
                    .method_call(destination, member)
                    .timeout(Duration::from_secs(10))
                    .send(outgoing)
                    .await
                {
                    Ok(Some(reply)) => match reply.decode::<Text>() {
                        Ok(text) => format!("ok {}", text.text),
                        Err(error) => probe_error(&error),
                    },
                    Ok(None) => "error 0 no-reply - -".to_owned(),
                    Err(error) => probe_error(&error),
                }
            }
            ["signal", destination, member] => {
                if raw.is_none() {
                    raw = Some(
                        pbus_tests::RawClient::connect_hello(std::path::Path::new(socket))
                            .await
                            .map_err(|error| format!("raw connection: {error}"))?,
                    );
                }
                let client = raw.as_mut().expect("just made");
                let body = prost::Message::encode_to_vec(&Text::new("poke"));
                let serial = client
                    .send_signal(destination, "/test", member, &[], &body)
                    .await
                    .map_err(|error| format!("send: {error}"))?;
                match client.refusal_of(serial).await {
                    None => "sent".to_owned(),
                    Some(info) => format!(
                        "error {} {} {}",
                        info.code,
                        or_dash(&info.name),
                        detail_and_message(&info)
                    ),
                }
            }
            ["received"] => {
                let counts = counts
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .clone();
                let words: Vec<String> = counts.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("received {}", words.join(" "))
            }
            ["names"] => match connection.list_names(true).await {
                Ok(names) => format!(
                    "names {}",
                    list(names.into_iter().map(|entry| entry.name).collect())
                ),
                Err(error) => probe_error(&error),
            },
            ["has-owner", name] => match connection.name_has_owner(name).await {
                Ok(has) => format!("has-owner {has}"),
                Err(error) => probe_error(&error),
            },
            ["owner", name] => match connection.get_name_owner(name).await {
                Ok(owner) => format!("owner {owner}"),
                Err(error) => probe_error(&error),
            },
            ["queued", name] => match connection.list_queued_owners(name).await {
                Ok(owners) => format!("queued {}", list(owners)),
                Err(error) => probe_error(&error),
            },
            ["request", name] | ["request", name, _] => {
                let mut flags = RequestNameFlags::default();
                for flag in words.get(2).map_or("", |f| *f).split(',') {
                    match flag {
                        "" => {}
                        "allow-replacement" => flags.allow_replacement = true,
                        "replace-existing" => flags.replace_existing = true,
                        "do-not-queue" => flags.do_not_queue = true,
                        other => return Err(format!("unknown RequestName flag {other:?}")),
                    }
                }
                match connection.request_name(name, flags).await {
                    Ok(result) => format!("request {result:?}"),
                    Err(error) => probe_error(&error),
                }
            }
            ["release", name] => match connection.release_name(name).await {
                Ok(result) => format!("release {result:?}"),
                Err(error) => probe_error(&error),
            },
            ["watch"] => match connection
                .subscribe(
                    pbus::MatchRule::new()
                        .path(pbus_proto::BUS_PATH)
                        .member("NameOwnerChanged"),
                )
                .await
            {
                Ok(stream) => {
                    owner_changes = Some(stream);
                    "watching".to_owned()
                }
                Err(error) => probe_error(&error),
            },
            ["changes-until", name] => match owner_changes.as_mut() {
                None => "error 0 not-watching - -".to_owned(),
                Some(stream) => {
                    let mut seen = Vec::new();
                    loop {
                        match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
                            Ok(Some(signal)) => {
                                let args = signal.args().join("|");
                                let last = signal.args().first().map(String::as_str) == Some(name);
                                seen.push(args);
                                if last {
                                    break format!("changes {}", seen.join(";"));
                                }
                            }
                            Ok(None) => break "error 0 connection-closed - -".to_owned(),
                            Err(_) => break format!("error 0 timeout - {}", seen.join(";")),
                        }
                    }
                }
            },
            ["listen", member] => match connection
                .subscribe(pbus::MatchRule::new().member(member))
                .await
            {
                Ok(stream) => {
                    streams.insert((*member).to_owned(), stream);
                    format!("listening {member}")
                }
                Err(error) => probe_error(&error),
            },
            ["emit", member, text] => match connection
                .emit_signal("/test", member, &[], &Text::new(*text))
                .await
            {
                Ok(()) => format!("emitted {member}"),
                Err(error) => probe_error(&error),
            },
            ["signals-until", member, text] => match streams.get_mut(*member) {
                None => "error 0 not-listening - -".to_owned(),
                Some(stream) => {
                    let mut seen = Vec::new();
                    loop {
                        match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
                            Ok(Some(signal)) => {
                                let got = signal
                                    .decode::<Text>()
                                    .map(|text| text.text)
                                    .unwrap_or_default();
                                let last = got == *text;
                                seen.push(format!("{}|{got}", signal.sender().unique_name));
                                if last {
                                    break format!("signals {}", seen.join(";"));
                                }
                            }
                            Ok(None) => break "error 0 connection-closed - -".to_owned(),
                            Err(_) => break format!("error 0 timeout - {}", seen.join(";")),
                        }
                    }
                }
            },
            ["eavesdrop"] => match connection
                .add_match(&pbus::MatchRule::new().eavesdrop(true))
                .await
            {
                Ok(()) => "ok".to_owned(),
                Err(error) => probe_error(&error),
            },
            ["explain", subject, right, target, member] => match connection
                .explain_policy(&dash(subject), right, &dash(target), &dash(member))
                .await
            {
                Ok(reply) => format!(
                    "explain {} {}",
                    if reply.allowed { "allowed" } else { "denied" },
                    or_dash(&reply.rule)
                ),
                Err(error) => probe_error(&error),
            },
            ["reload"] => match connection.reload_policy().await {
                Ok(reply) => format!("reloaded rules={} peers={}", reply.rules, reply.peers),
                Err(error) => probe_error(&error),
            },
            ["stats"] => match connection.stats().await {
                Ok(stats) => format!(
                    "stats peers={} uids={}",
                    list(
                        stats
                            .peers
                            .into_iter()
                            .map(|peer| peer.unique_name)
                            .collect()
                    ),
                    list(
                        stats
                            .uids
                            .iter()
                            .map(|uid| format!("{}:{}", uid.uid, uid.connections))
                            .collect()
                    )
                ),
                Err(error) => probe_error(&error),
            },
            ["ping"] => match connection.ping().await {
                Ok(_) => "pong".to_owned(),
                Err(error) => probe_error(&error),
            },
            _ => format!("error 0 bad-command - {line}"),
        };
        println!("{}", answer.replace('\n', " "));
    }
    Ok(())
}

/// `error <code> <name> <detail|-> <message>` for `policy-probe`.
fn probe_error(error: &pbus::Error) -> String {
    match error {
        pbus::Error::Remote {
            code,
            name,
            detail,
            message,
        } => format!(
            "error {} {name} {} {}",
            *code as i32,
            or_dash(detail),
            or_dash(message)
        ),
        other => format!("error 0 local - {other}"),
    }
}
