//! Signal subscriptions. Each [`SignalStream`] has its own match rule,
//! registered with the bus (so the bus sends only what some subscription
//! wants) and checked again locally (so each stream gets only what its own
//! rule accepts). Rules on a well-known sender follow that name's current
//! owner, tracked through `NameOwnerChanged`.
//!
//! Validating a rule and matching it against a signal is
//! `pbus_proto::matches`, the code the bus runs; this module keeps the
//! subscription plumbing.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use pbus_proto::matches::{Rule, RuleError, SignalView};
use pbus_proto::names::BusName;
use pbus_proto::v1::{self, ArgMatch};
use pbus_proto::{BUS_NAME, BUS_PATH};
use tokio::sync::mpsc;

use crate::message::Incoming;
use crate::{Connection, Error};

/// A received signal, shared between the subscriptions it matched.
pub type Signal = Arc<Incoming>;

/// Which signals to receive. Unset fields match anything.
///
/// ```
/// let rule = pbus::MatchRule::new()
///     .sender("org.example.Sensors")
///     .member("TemperatureChanged")
///     .arg(0, "kitchen");
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MatchRule {
    rule: v1::MatchRule,
}

impl MatchRule {
    /// A rule that matches every signal.
    pub fn new() -> Self {
        Self::default()
    }

    /// Only signals from this unique or well-known name.
    pub fn sender(mut self, sender: &str) -> Self {
        self.rule.sender = sender.to_owned();
        self
    }

    /// Only signals on this exact path.
    pub fn path(mut self, path: &str) -> Self {
        self.rule.path = path.to_owned();
        self.rule.path_namespace = false;
        self
    }

    /// Only signals on this path or below it.
    pub fn path_namespace(mut self, path: &str) -> Self {
        self.rule.path = path.to_owned();
        self.rule.path_namespace = true;
        self
    }

    /// Only signals with this name.
    pub fn member(mut self, member: &str) -> Self {
        self.rule.member = member.to_owned();
        self
    }

    /// Only signals whose string argument `index` equals `value`.
    pub fn arg(mut self, index: u32, value: &str) -> Self {
        self.rule.args.retain(|arg| arg.index != index);
        self.rule.args.push(ArgMatch {
            index,
            value: value.to_owned(),
        });
        self
    }

    /// Receive copies of calls, replies and unicast signals addressed to
    /// other peers instead of broadcasts (needs the `monitor` right).
    /// Copies are flagged `MONITOR_COPY` and carry no fds or memfd
    /// payloads; subscribe a plain rule as well to see broadcast signals,
    /// each of which then arrives on that stream only.
    ///
    /// The first such subscription makes the connection a monitor, which
    /// the bus refuses while the connection owns or is queued for a name or
    /// has calls in flight either way. A monitor is receive-only until it
    /// disconnects: it may still call the bus (more rules, `ping`, stats),
    /// but owning names, calling peers, emitting signals and replying are
    /// refused with ACCESS_DENIED (detail `receive-only`), and so are calls
    /// made to it. Use a connection of its own for monitoring.
    pub fn eavesdrop(mut self, enabled: bool) -> Self {
        self.rule.eavesdrop = enabled;
        self
    }

    /// The rule as sent to the bus.
    pub fn to_wire(&self) -> v1::MatchRule {
        self.rule.clone()
    }

    /// The rule validated as the bus validates it: an invalid name is
    /// [`Error::InvalidName`], any other fault [`Error::InvalidMatchRule`].
    fn validate(&self) -> Result<Rule, Error> {
        Rule::from_wire(self.rule.clone()).map_err(|error| match error {
            RuleError::Name(error) => Error::InvalidName(error),
            other => Error::InvalidMatchRule(other),
        })
    }

    fn well_known_sender(&self) -> Option<&str> {
        let sender = self.rule.sender.as_str();
        (!sender.is_empty() && !sender.starts_with(':') && sender != BUS_NAME).then_some(sender)
    }
}

fn owner_rule(name: &str) -> MatchRule {
    MatchRule::new()
        .sender(BUS_NAME)
        .path(BUS_PATH)
        .member("NameOwnerChanged")
        .arg(0, name)
}

#[derive(Debug, Default)]
pub(crate) struct TrackedOwner {
    owner: Option<String>,
    /// A NameOwnerChanged was seen since tracking began, so it is newer
    /// than any GetNameOwner answer still in flight.
    updated_by_signal: bool,
    subscriptions: usize,
}

struct Entry {
    id: u64,
    /// The stream's rule, validated.
    rule: Rule,
    tx: mpsc::UnboundedSender<Signal>,
}

/// Every live subscription of a connection.
#[derive(Default)]
pub(crate) struct Subscriptions {
    next_id: u64,
    entries: Vec<Entry>,
    owners: HashMap<String, TrackedOwner>,
    closed: bool,
}

impl Subscriptions {
    /// Hands a signal to every subscription whose rule accepts it.
    pub(crate) fn deliver(&mut self, signal: Incoming) {
        if signal.member() == "NameOwnerChanged" && signal.sender().unique_name == BUS_NAME {
            if let [name, _, new_owner] = signal.args() {
                if let Some(tracked) = self.owners.get_mut(name) {
                    tracked.owner = (!new_owner.is_empty()).then(|| new_owner.clone());
                    tracked.updated_by_signal = true;
                }
            }
        }
        let copy = signal.header().flags & pbus_proto::v1::HeaderFlag::MonitorCopy as u32 != 0;
        let signal = Arc::new(signal);
        let sender = signal.sender().unique_name.as_str();
        let view = SignalView {
            sender,
            path: signal.path(),
            member: signal.member(),
            args: signal.args(),
        };
        // A rule's well-known sender matches the name's owner as last seen.
        let sender_owns = |name: &str| {
            self.owners
                .get(name)
                .and_then(|tracked| tracked.owner.as_deref())
                == Some(sender)
        };
        for entry in &self.entries {
            // Copies go to eavesdropping subscriptions only, and only
            // copies do: the bus delivers a broadcast because of a plain
            // rule, never an eavesdropping one, so handing it to both
            // streams of a connection that has both (pbusctl monitor) made
            // every broadcast appear twice.
            if copy != entry.rule.eavesdrop {
                continue;
            }
            if entry.rule.matches(&view, sender_owns) {
                let _ = entry.tx.send(Arc::clone(&signal));
            }
        }
    }

    pub(crate) fn close_all(&mut self) {
        self.closed = true;
        self.entries.clear();
    }
}

/// A stream of signals matching one rule. Dropping it removes the rule
/// from the bus. Signals wait here until read, without a bound: read them,
/// or drop the stream.
pub struct SignalStream {
    rx: mpsc::UnboundedReceiver<Signal>,
    id: u64,
    rule: MatchRule,
    connection: Connection,
}

impl std::fmt::Debug for SignalStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignalStream")
            .field("rule", &self.rule)
            .finish_non_exhaustive()
    }
}

impl SignalStream {
    /// The next signal, or `None` when the connection closed.
    pub async fn next(&mut self) -> Option<Signal> {
        self.rx.recv().await
    }

    /// The rule this stream was created with.
    pub fn rule(&self) -> &MatchRule {
        &self.rule
    }
}

impl Stream for SignalStream {
    type Item = Signal;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Signal>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for SignalStream {
    fn drop(&mut self) {
        let mut subscriptions = self
            .connection
            .inner
            .subscriptions
            .lock()
            .expect("subscriptions lock");
        subscriptions.entries.retain(|entry| entry.id != self.id);
        let mut rules = vec![self.rule.clone()];
        if let Some(name) = self.rule.well_known_sender() {
            if let Some(tracked) = subscriptions.owners.get_mut(name) {
                tracked.subscriptions -= 1;
                if tracked.subscriptions == 0 {
                    subscriptions.owners.remove(name);
                    rules.push(owner_rule(name));
                }
            }
        }
        drop(subscriptions);
        if self.connection.is_closed() {
            return;
        }
        let connection = self.connection.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                for rule in rules {
                    let _ = connection.remove_match(&rule).await;
                }
            });
        }
    }
}

impl Connection {
    /// Subscribes to signals matching `rule`.
    ///
    /// ```no_run
    /// # async fn example(connection: pbus::Connection) -> Result<(), pbus::Error> {
    /// let mut changes = connection
    ///     .subscribe(pbus::MatchRule::new().member("Changed"))
    ///     .await?;
    /// while let Some(signal) = changes.next().await {
    ///     println!("{} from {}", signal.member(), signal.sender().unique_name);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn subscribe(&self, rule: MatchRule) -> Result<SignalStream, Error> {
        let validated = rule.validate()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let track = rule.well_known_sender().map(str::to_owned);
        let (id, first_tracker) = {
            let mut subscriptions = self.inner.subscriptions.lock().expect("subscriptions lock");
            if subscriptions.closed {
                return Err(Error::Disconnected);
            }
            subscriptions.next_id += 1;
            let id = subscriptions.next_id;
            let first_tracker = match &track {
                Some(name) => {
                    let tracked = subscriptions.owners.entry(name.clone()).or_default();
                    tracked.subscriptions += 1;
                    tracked.subscriptions == 1
                }
                None => false,
            };
            subscriptions.entries.push(Entry {
                id,
                rule: validated,
                tx,
            });
            (id, first_tracker)
        };
        // From here on, dropping the stream undoes the registration.
        let stream = SignalStream {
            rx,
            id,
            rule,
            connection: self.clone(),
        };
        if let (Some(name), true) = (&track, first_tracker) {
            self.add_match(&owner_rule(name)).await?;
            let owner = self.get_name_owner(name).await.ok();
            let mut subscriptions = self.inner.subscriptions.lock().expect("subscriptions lock");
            if let Some(tracked) = subscriptions.owners.get_mut(name) {
                if !tracked.updated_by_signal {
                    tracked.owner = owner;
                }
            }
        }
        self.add_match(&stream.rule).await?;
        Ok(stream)
    }

    /// Watches the owner of `name`: the current owner now, then every
    /// change.
    pub async fn watch_name_owner(&self, name: &str) -> Result<NameOwnerWatch, Error> {
        BusName::validate(name)?;
        let stream = self.subscribe(owner_rule(name)).await?;
        let current = self.get_name_owner(name).await.ok();
        Ok(NameOwnerWatch { stream, current })
    }
}

/// Changes of one name's owner; see [`Connection::watch_name_owner`].
#[derive(Debug)]
pub struct NameOwnerWatch {
    stream: SignalStream,
    current: Option<String>,
}

impl NameOwnerWatch {
    /// The owner as last seen (unique name), `None` if unowned.
    pub fn current(&self) -> Option<&str> {
        self.current.as_deref()
    }

    /// Waits for the next change; `None` when the connection closed.
    pub async fn changed(&mut self) -> Option<v1::NameOwnerChanged> {
        loop {
            let signal = self.stream.next().await?;
            if let Ok(change) = signal.decode::<v1::NameOwnerChanged>() {
                self.current = (!change.new_owner.is_empty()).then(|| change.new_owner.clone());
                return Some(change);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pbus_proto::v1::{Header, MessageKind, SenderInfo};

    fn signal(sender: &str, member: &str, args: &[&str]) -> Incoming {
        let header = Header {
            kind: MessageKind::Signal as i32,
            path: "/p".into(),
            member: member.into(),
            args: args.iter().map(|arg| (*arg).to_owned()).collect(),
            sender: Some(SenderInfo {
                unique_name: sender.into(),
                ..SenderInfo::default()
            }),
            ..Header::default()
        };
        Incoming::from_parts(header, b"", Vec::new()).unwrap()
    }

    /// Subscriptions with one stream per rule; returns their receivers.
    fn subscribed(rules: &[MatchRule]) -> (Subscriptions, Vec<mpsc::UnboundedReceiver<Signal>>) {
        let mut subscriptions = Subscriptions::default();
        let mut receivers = Vec::new();
        for (id, rule) in rules.iter().enumerate() {
            let (tx, rx) = mpsc::unbounded_channel();
            subscriptions.entries.push(Entry {
                id: id as u64,
                rule: rule.validate().unwrap(),
                tx,
            });
            receivers.push(rx);
        }
        (subscriptions, receivers)
    }

    fn count(rx: &mut mpsc::UnboundedReceiver<Signal>) -> usize {
        std::iter::from_fn(|| rx.try_recv().ok()).count()
    }

    #[test]
    fn each_stream_gets_what_its_rule_accepts() {
        let (mut subscriptions, mut rx) = subscribed(&[
            MatchRule::new().member("A"),
            MatchRule::new().member("B").arg(1, "x"),
            MatchRule::new().sender(":1.7"),
        ]);
        subscriptions.deliver(signal(":1.7", "A", &[]));
        subscriptions.deliver(signal(":1.8", "B", &["w", "x"]));
        subscriptions.deliver(signal(":1.8", "B", &["x"]));
        assert_eq!(count(&mut rx[0]), 1);
        assert_eq!(count(&mut rx[1]), 1);
        assert_eq!(count(&mut rx[2]), 1);
    }

    #[test]
    fn a_well_known_sender_follows_its_tracked_owner() {
        let (mut subscriptions, mut rx) = subscribed(&[MatchRule::new().sender("org.example.S")]);
        subscriptions
            .owners
            .insert("org.example.S".into(), TrackedOwner::default());
        subscriptions.deliver(signal(":1.5", "M", &[]));
        assert_eq!(count(&mut rx[0]), 0, "nobody owns the name yet");
        subscriptions.deliver(signal(
            BUS_NAME,
            "NameOwnerChanged",
            &["org.example.S", "", ":1.5"],
        ));
        subscriptions.deliver(signal(":1.5", "M", &[]));
        subscriptions.deliver(signal(":1.6", "M", &[]));
        assert_eq!(count(&mut rx[0]), 1, "only the owner's signal");
    }

    #[test]
    fn rules_the_bus_would_refuse_are_refused_here() {
        assert!(matches!(
            MatchRule::new().sender("nodots").validate(),
            Err(Error::InvalidName(_))
        ));
        assert!(matches!(
            MatchRule::new().path_namespace("").validate(),
            Err(Error::InvalidMatchRule(RuleError::NamespaceWithoutPath))
        ));
        assert!(matches!(
            MatchRule::new().arg(64, "x").validate(),
            Err(Error::InvalidMatchRule(RuleError::ArgIndexTooHigh))
        ));
    }
}
