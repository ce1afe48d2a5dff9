//! Emitting signals: [`Connection::emit_signal`] for a broadcast, and
//! [`Connection::signal`] with its [`SignalBuilder`] for a unicast
//! destination, match-rule arguments, fds and memfds. Receiving signals is
//! [`crate::signals`]'s.

use pbus_proto::names::{BusName, MemberName, ObjectPath};
use pbus_proto::v1::{Header, MessageKind};
use prost::{Message, Name};

use super::Connection;
use crate::message::Outgoing;
use crate::Error;

impl Connection {
    /// Emits a broadcast signal to every subscriber whose match rule
    /// accepts it. `args` are strings subscribers can filter on.
    pub async fn emit_signal<M: Message + Name>(
        &self,
        path: &str,
        member: &str,
        args: &[&str],
        body: &M,
    ) -> Result<(), Error> {
        self.signal(path, member)
            .args(args.iter().map(|s| (*s).to_owned()).collect())
            .emit(Outgoing::new(body))
            .await
    }

    /// A signal with options (unicast destination, fds, memfds).
    pub fn signal(&self, path: &str, member: &str) -> SignalBuilder {
        SignalBuilder {
            connection: self.clone(),
            path: path.to_owned(),
            member: member.to_owned(),
            destination: String::new(),
            args: Vec::new(),
        }
    }
}

/// Options for one signal; see [`Connection::signal`].
#[must_use = "a signal does nothing until .emit(..).await"]
#[derive(Debug)]
pub struct SignalBuilder {
    connection: Connection,
    path: String,
    member: String,
    destination: String,
    args: Vec<String>,
}

impl SignalBuilder {
    /// Sends to one peer instead of broadcasting (fds allowed then).
    pub fn destination(mut self, destination: &str) -> Self {
        self.destination = destination.to_owned();
        self
    }

    /// String arguments for match rules.
    pub fn args(mut self, args: Vec<String>) -> Self {
        self.args = args;
        self
    }

    /// Sends the signal.
    pub async fn emit(self, body: Outgoing) -> Result<(), Error> {
        MemberName::validate(&self.member)?;
        if !self.path.is_empty() {
            ObjectPath::validate(&self.path)?;
        }
        if !self.destination.is_empty() {
            BusName::validate(&self.destination)?;
        }
        let mut header = Header {
            kind: MessageKind::Signal as i32,
            serial: self.connection.next_serial(),
            destination: self.destination,
            path: self.path,
            member: self.member,
            args: self.args,
            ..Header::default()
        };
        self.connection.send(&mut header, body).await
    }
}
