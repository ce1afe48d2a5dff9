//! The bus driver: the methods of the `org.pbus.Bus` peer (RequestName,
//! ReleaseName, ListNames, ListQueuedOwners, GetNameOwner, NameHasOwner,
//! AddMatch, RemoveMatch, GetPeerIdentity, Ping). Each request body is the
//! matching `*Request` message; each answer is a METHOD_RETURN from the bus
//! or an ERROR.
//!
//! Well-known names are claimed, released and resolved in the caller's
//! name scope (see [`crate::bus::scopes`] and [`crate::bus::names::ScopedNames`]):
//! a container's requests never meet a host owner or another
//! container's, and what the asker may not see looks like nothing.

use std::time::Instant;

use pbus_policy::{Operation, Right};
use pbus_proto::header::HeaderView;
use pbus_proto::names::{BusName, WellKnownName};
use pbus_proto::v1::{
    AddMatchRequest, Empty, ExplainPolicyReply, ExplainPolicyRequest, GetNameOwnerReply,
    GetNameOwnerRequest, GetPeerIdentityRequest, GetStatsReply, GetStatsRequest, HeaderFlag,
    ListNamesReply, ListNamesRequest, ListQueuedOwnersReply, ListQueuedOwnersRequest, NameEntry,
    NameHasOwnerReply, NameHasOwnerRequest, PeerStats, PingReply, QuotaUse, ReleaseNameReply,
    ReleaseNameRequest, ReleaseNameResult, ReloadPolicyRequest, RemoveMatchRequest,
    RequestNameReply, RequestNameRequest, RequestNameResult, UidStats,
};
use pbus_proto::BUS_NAME;
use prost::Message;

use crate::bus::matches::Rule;
use crate::bus::names::{flags, ReleaseOutcome, RequestOutcome};
use crate::bus::scopes::ScopeId;
use crate::bus::{Bus, BusError, Peer, PeerId};

fn decode<M: Message + Default>(body: &[u8]) -> Result<M, BusError> {
    M::decode(body).map_err(|e| BusError::InvalidArgs(format!("undecodable request body: {e}")))
}

fn well_known(name: &str) -> Result<WellKnownName, BusError> {
    let name = WellKnownName::try_from(name).map_err(|e| BusError::InvalidArgs(e.to_string()))?;
    if name.as_str() == BUS_NAME {
        return Err(BusError::InvalidArgs(format!(
            "{BUS_NAME} belongs to the bus"
        )));
    }
    Ok(name)
}

impl<Io> Bus<Io> {
    /// Handles a METHOD_CALL addressed to `org.pbus.Bus`.
    pub(super) fn handle_bus_call(
        &mut self,
        from: PeerId,
        header: &HeaderView<'_>,
        body: &[u8],
        now: Instant,
    ) -> Result<(), BusError> {
        let serial = header.serial;
        let reply_wanted = header.flags & HeaderFlag::NoReplyExpected as u32 == 0;
        macro_rules! reply {
            ($message:expr) => {{
                if reply_wanted {
                    self.queue_bus_reply(from, serial, &$message);
                }
                Ok(())
            }};
        }
        match header.member {
            "RequestName" => {
                if self.peers[&from].monitor {
                    return Err(BusError::ReceiveOnly(
                        "a monitor is receive-only and may not own names".into(),
                    ));
                }
                let reply = self.request_name(from, decode(body)?)?;
                reply!(reply)
            }
            "ReleaseName" => {
                let reply = self.release_name(from, decode(body)?)?;
                reply!(reply)
            }
            "ListNames" => {
                let reply = self.list_names(from, decode(body)?);
                reply!(reply)
            }
            "ListQueuedOwners" => {
                let reply = self.list_queued_owners(from, decode(body)?)?;
                reply!(reply)
            }
            "GetNameOwner" => {
                let request: GetNameOwnerRequest = decode(body)?;
                let owner = self.visible_owner(from, &request.name)?;
                reply!(GetNameOwnerReply {
                    owner: owner.unique_name().into_string()
                })
            }
            "NameHasOwner" => {
                let request: NameHasOwnerRequest = decode(body)?;
                BusName::try_from(request.name.as_str())
                    .map_err(|e| BusError::InvalidArgs(e.to_string()))?;
                let has_owner = self.visible_owner(from, &request.name).is_ok();
                reply!(NameHasOwnerReply { has_owner })
            }
            "AddMatch" => {
                self.add_match(from, decode(body)?)?;
                reply!(Empty {})
            }
            "RemoveMatch" => {
                self.remove_match(from, decode(body)?)?;
                reply!(Empty {})
            }
            "GetPeerIdentity" => {
                let request: GetPeerIdentityRequest = decode(body)?;
                let target = if request.name.is_empty() {
                    from
                } else {
                    self.visible_owner(from, &request.name)?
                };
                let identity = self.wire_identity(&self.peers[&target], &self.peers[&from]);
                reply!(identity)
            }
            "ReloadPolicy" => {
                let _: ReloadPolicyRequest = decode(body)?;
                if !self.is_privileged(from) {
                    return Err(BusError::AccessDenied {
                        right: "reload",
                        target: " (only root or the daemon's uid may reload the policy)".into(),
                    });
                }
                // Reading files is blocking work: a job for the server, after
                // which the caller is answered.
                self.start_job(
                    super::Service::Driver,
                    super::Job::LoadPolicy,
                    Some((from, serial)),
                );
                Ok(())
            }
            "ExplainPolicy" => {
                let reply = self.explain_policy(from, decode(body)?)?;
                reply!(reply)
            }
            "GetStats" => {
                let _: GetStatsRequest = decode(body)?;
                let stats = self.stats(from);
                reply!(stats)
            }
            "Ping" => reply!(PingReply {
                bus_id: self.bus_id.clone(),
                uptime_ms: now.saturating_duration_since(self.started).as_millis() as u64,
            }),
            other => Err(BusError::UnknownMethod(other.to_owned())),
        }
    }

    fn request_name(
        &mut self,
        from: PeerId,
        request: RequestNameRequest,
    ) -> Result<RequestNameReply, BusError> {
        let name = well_known(&request.name)?;
        if request.flags & !flags::ALL != 0 {
            return Err(BusError::InvalidArgs(format!(
                "unknown flags {:#x}",
                request.flags & !flags::ALL
            )));
        }
        let peer = &self.peers[&from];
        let decision = peer.policy.own(name.as_str());
        if !decision.allowed {
            return Err(BusError::AccessDenied {
                right: decision.right.as_str(),
                target: format!(" to own {name}"),
            });
        }
        if !peer.names.contains(name.as_str())
            && peer.names.len() >= self.limits.max_names_per_connection as usize
        {
            return Err(BusError::LimitExceeded {
                limit: crate::config::Limit::MaxNamesPerConnection,
                message: "too many names owned or queued for".into(),
            });
        }
        let scope = peer.scope;
        let (outcome, change) = self.names.request(scope, &name, from, request.flags);
        let peer = self.peers.get_mut(&from).expect("caller exists");
        match outcome {
            RequestOutcome::Exists => {
                peer.names.remove(name.as_str());
            }
            _ => {
                peer.names.insert(name.clone());
            }
        }
        if let Some(change) = change {
            // A replaced owner that asked DO_NOT_QUEUE loses its claim.
            if let Some(old) = change.old {
                if !self
                    .names
                    .claimants(scope, change.name.as_str())
                    .contains(&old)
                {
                    if let Some(old_peer) = self.peers.get_mut(&old) {
                        old_peer.names.remove(&change.name);
                    }
                }
            }
            self.announce_change(change, None);
        }
        let result = match outcome {
            RequestOutcome::PrimaryOwner => RequestNameResult::PrimaryOwner,
            RequestOutcome::InQueue => RequestNameResult::InQueue,
            RequestOutcome::Exists => RequestNameResult::Exists,
            RequestOutcome::AlreadyOwner => RequestNameResult::AlreadyOwner,
        };
        Ok(RequestNameReply {
            result: result as i32,
        })
    }

    fn release_name(
        &mut self,
        from: PeerId,
        request: ReleaseNameRequest,
    ) -> Result<ReleaseNameReply, BusError> {
        let name = well_known(&request.name)?;
        let scope = self.peers[&from].scope;
        let (outcome, change) = self.names.release(scope, &name, from);
        if outcome == ReleaseOutcome::Released {
            self.peers
                .get_mut(&from)
                .expect("caller exists")
                .names
                .remove(name.as_str());
        }
        if let Some(change) = change {
            self.announce_change(change, None);
        }
        let result = match outcome {
            ReleaseOutcome::Released => ReleaseNameResult::Released,
            ReleaseOutcome::NonExistent => ReleaseNameResult::NonExistent,
            ReleaseOutcome::NotOwner => ReleaseNameResult::NotOwner,
        };
        Ok(ReleaseNameReply {
            result: result as i32,
        })
    }

    /// The owner of `name` if it exists and `from` may see it. A name the
    /// caller may not see is reported exactly like a name nobody owns.
    fn visible_owner(&self, from: PeerId, name: &str) -> Result<PeerId, BusError> {
        self.visible_claim(from, name).map(|(owner, _)| owner)
    }

    /// Like [`visible_owner`](Self::visible_owner), with the scope whose
    /// table holds the name (`None` for a unique name).
    fn visible_claim(
        &self,
        from: PeerId,
        name: &str,
    ) -> Result<(PeerId, Option<ScopeId>), BusError> {
        let asker = &self.peers[&from];
        let owner = if name.starts_with(':') {
            PeerId::from_unique_name(name)
                .filter(|id| self.peers.contains_key(id))
                .map(|id| (id, None))
        } else {
            BusName::try_from(name).map_err(|e| BusError::InvalidArgs(e.to_string()))?;
            self.names
                .resolve(asker.scope, name)
                .map(|resolved| (resolved.owner, Some(resolved.scope)))
        };
        match owner {
            Some((owner, scope))
                if owner == from || asker.policy.may_see(&self.peers[&owner].identity, name) =>
            {
                Ok((owner, scope))
            }
            _ if name.starts_with(':') => Err(BusError::NoSuchPeer(name.to_owned())),
            _ => Err(BusError::NameHasNoOwner(name.to_owned())),
        }
    }

    fn list_names(&self, from: PeerId, request: ListNamesRequest) -> ListNamesReply {
        let asker = &self.peers[&from];
        // The names the asker resolves (its scope's, then the host's it does
        // not shadow), each only if it may see the owner.
        let mut names: Vec<NameEntry> = self
            .names
            .resolvable(asker.scope)
            .filter(|(name, resolved, _)| {
                resolved.owner == from
                    || asker
                        .policy
                        .may_see(&self.peers[&resolved.owner].identity, name)
            })
            .map(|(name, resolved, queued)| NameEntry {
                name: name.to_owned(),
                owner: resolved.owner.unique_name().into_string(),
                queued: queued as u32,
            })
            .collect();
        if request.include_unique {
            names.extend(
                self.peers
                    .values()
                    .filter(|peer| {
                        peer.id == from
                            || asker
                                .policy
                                .may_see(&peer.identity, peer.unique_name.as_str())
                    })
                    .map(|peer| NameEntry {
                        name: peer.unique_name.to_string(),
                        owner: peer.unique_name.to_string(),
                        queued: 0,
                    }),
            );
        }
        names.sort_by(|a, b| a.name.cmp(&b.name));
        ListNamesReply { names }
    }

    fn list_queued_owners(
        &self,
        from: PeerId,
        request: ListQueuedOwnersRequest,
    ) -> Result<ListQueuedOwnersReply, BusError> {
        let name = well_known(&request.name)?;
        let (_, scope) = self.visible_claim(from, name.as_str())?;
        let scope = scope.expect("a well-known name resolves in a scope");
        let asker = &self.peers[&from];
        // The queue of the scope the name resolved in; queued peers the
        // asker may not see stay hidden too.
        Ok(ListQueuedOwnersReply {
            owners: self
                .names
                .claimants(scope, name.as_str())
                .into_iter()
                .filter(|id| {
                    *id == from
                        || self
                            .peers
                            .get(id)
                            .is_some_and(|peer| asker.policy.may_see(&peer.identity, name.as_str()))
                })
                .map(|id| id.unique_name().into_string())
                .collect(),
        })
    }

    /// Queue and quota use of every peer `from` may see (root sees all).
    fn stats(&self, from: PeerId) -> GetStatsReply {
        let asker = &self.peers[&from];
        let privileged = self.is_privileged(from);
        let [max_bytes, max_fds, max_messages] = self.queue_caps();
        let mut peers: Vec<PeerStats> = self
            .peers
            .values()
            .filter(|peer| {
                privileged
                    || peer.id == from
                    || asker
                        .policy
                        .may_see(&peer.identity, peer.unique_name.as_str())
            })
            .map(|peer| {
                let mut by_uid: Vec<QuotaUse> = peer
                    .quota
                    .shares()
                    .iter()
                    .map(|&(uid, [bytes, fds, messages])| QuotaUse {
                        uid,
                        bytes,
                        fds,
                        messages,
                    })
                    .collect();
                by_uid.sort_by_key(|usage| usage.uid);
                let mut names: Vec<String> = peer.names.iter().map(ToString::to_string).collect();
                names.sort();
                PeerStats {
                    unique_name: peer.unique_name.to_string(),
                    uid: peer.identity.uid,
                    pid: peer.identity.pid_seen_from(asker.identity.namespaces.pid),
                    names,
                    queued_bytes: peer.outbox.queued_bytes() as u64,
                    queued_fds: peer.outbox.queued_fds() as u64,
                    queued_messages: peer.quota.messages(),
                    max_queued_bytes: max_bytes,
                    max_queued_fds: max_fds,
                    max_queued_messages: max_messages,
                    queued_by_uid: by_uid,
                    pending_calls: self.calls.count_for_caller(peer.id) as u32,
                    match_rules: peer.matches.len() as u32,
                    sent: peer.counters.sent,
                    received: peer.counters.received,
                    dropped_signals: peer.counters.dropped_signals,
                }
            })
            .collect();
        peers.sort_by_key(|peer| PeerId::from_unique_name(&peer.unique_name));
        let (global_bytes, global_fds) = self.global_pools();
        let mut uids: Vec<UidStats> = self
            .connections_per_uid
            .iter()
            // Per-uid rows are bus-wide (they count peers the asker may not
            // see): for administrators only.
            .filter(|_| privileged)
            .map(|(&uid, &connections)| UidStats {
                uid,
                connections,
                queued_bytes: global_bytes.share_of(uid),
                fds: global_fds.share_of(uid),
            })
            .collect();
        uids.sort_by_key(|stats| stats.uid);
        GetStatsReply {
            peers,
            uids,
            queued_bytes_total: global_bytes.used(),
            max_queued_bytes_total: global_bytes.capacity(),
            fds_total: global_fds.used(),
            max_fds_total: global_fds.capacity(),
            connections: self.peers.len() as u32,
            names: self.names.len() as u32,
            match_rules: self.matches.len() as u32,
            pending_calls: self.calls.len() as u32,
        }
    }

    fn add_match(&mut self, from: PeerId, request: AddMatchRequest) -> Result<(), BusError> {
        let rule = Rule::from_wire(request.rule.unwrap_or_default())
            .map_err(|e| BusError::InvalidArgs(e.to_string()))?;
        let peer = &self.peers[&from];
        if peer.matches.len() + peer.monitor_matches.len()
            >= self.limits.max_matches_per_connection as usize
        {
            return Err(BusError::LimitExceeded {
                limit: crate::config::Limit::MaxMatchesPerConnection,
                message: "too many match rules".into(),
            });
        }
        if rule.eavesdrop {
            let decision = peer.policy.monitor();
            if !decision.allowed {
                return Err(BusError::AccessDenied {
                    right: decision.right.as_str(),
                    target: " to eavesdrop".into(),
                });
            }
            if !peer.monitor {
                self.check_may_become_monitor(from)?;
            }
            let peer = self.peers.get_mut(&from).expect("caller exists");
            peer.monitor = true;
            let id = self.monitors.add(from, rule);
            peer.monitor_matches.push(id);
            return Ok(());
        }
        let id = self.matches.add(from, rule);
        self.peers
            .get_mut(&from)
            .expect("caller exists")
            .matches
            .push(id);
        Ok(())
    }

    /// A connection becomes a monitor (receive-only, for good) with its
    /// first eavesdropping rule, and only if it takes no part in traffic
    /// of its own then: it owns and is queued for no name, waits for no
    /// reply (the AddMatch being handled is a bus call and not counted)
    /// and owes none. Otherwise a name, a call or a reply would be caught
    /// half-way by the switch.
    fn check_may_become_monitor(&self, from: PeerId) -> Result<(), BusError> {
        let peer = &self.peers[&from];
        if let Some(name) = peer.names.iter().min() {
            return Err(BusError::MonitorRefused(format!(
                "it owns or is queued for {name}; release its names first"
            )));
        }
        let waiting = self.calls.count_for_caller(from);
        if waiting > 0 {
            return Err(BusError::MonitorRefused(format!(
                "{waiting} of its calls are waiting for replies"
            )));
        }
        let owed = self.calls.count_for_callee(from);
        if owed > 0 {
            return Err(BusError::MonitorRefused(format!(
                "it has {owed} calls to answer"
            )));
        }
        Ok(())
    }

    fn remove_match(&mut self, from: PeerId, request: RemoveMatchRequest) -> Result<(), BusError> {
        let rule = Rule::from_wire(request.rule.unwrap_or_default())
            .map_err(|e| BusError::InvalidArgs(e.to_string()))?;
        let peer = self.peers.get_mut(&from).expect("caller exists");
        let (ids, registry) = if rule.eavesdrop {
            (&mut peer.monitor_matches, &mut self.monitors)
        } else {
            (&mut peer.matches, &mut self.matches)
        };
        let position = ids
            .iter()
            .position(|id| registry.rule(*id) == Some(&rule))
            .ok_or_else(|| BusError::InvalidArgs("no such match rule".into()))?;
        let id = ids.swap_remove(position);
        registry.remove(id);
        Ok(())
    }

    /// Root and the daemon's own uid, on the host, may administer the bus:
    /// root inside a container (a container cgroup, or its own pid
    /// namespace) may not.
    fn is_privileged(&self, peer: PeerId) -> bool {
        let identity = &self.peers[&peer].identity;
        (identity.uid == 0 || identity.uid == self.bus_sender.uid)
            && !identity.container.is_container()
            && identity.namespaces.pid == self.own_pid_namespace
    }

    /// How the policy decides one operation between live peers.
    fn explain_policy(
        &self,
        from: PeerId,
        request: ExplainPolicyRequest,
    ) -> Result<ExplainPolicyReply, BusError> {
        let subject = if request.subject.is_empty() {
            from
        } else {
            self.visible_owner(from, &request.subject)?
        };
        if subject != from && !self.is_privileged(from) {
            return Err(BusError::AccessDenied {
                right: "monitor",
                target: " (only root may explain other peers' rights)".into(),
            });
        }
        let right = Right::parse(&request.right)
            .ok_or_else(|| BusError::InvalidArgs(format!("unknown right {:?}", request.right)))?;
        let subject_peer = &self.peers[&subject];
        let target = || -> Result<&Peer<Io>, BusError> {
            let id = self.visible_owner(from, &request.target)?;
            Ok(&self.peers[&id])
        };
        let names_of = |peer: &Peer<Io>| -> Vec<String> {
            let mut names: Vec<String> = self
                .owned_names(peer)
                .into_iter()
                .map(str::to_owned)
                .collect();
            if !request.target.starts_with(':') && !names.contains(&request.target) {
                names.push(request.target.clone());
            }
            names
        };
        let operation = match right {
            Right::Own => Operation::Own {
                name: well_known(&request.target)?.into_string(),
            },
            Right::See => Operation::See {
                owner: (*target()?.identity).clone(),
                name: request.target.clone(),
            },
            Right::Talk => {
                let receiver = target()?;
                Operation::Talk {
                    receiver: (*receiver.identity).clone(),
                    names: names_of(receiver),
                    member: request.member.clone(),
                }
            }
            Right::Receive => {
                let sender = target()?;
                Operation::Receive {
                    sender: (*sender.identity).clone(),
                    names: self
                        .owned_names(sender)
                        .into_iter()
                        .map(str::to_owned)
                        .collect(),
                    member: request.member.clone(),
                }
            }
            Right::PassFds => {
                let receiver = target()?;
                Operation::PassFds {
                    receiver: (*receiver.identity).clone(),
                    names: names_of(receiver),
                }
            }
            Right::Memfd => {
                let receiver = target()?;
                Operation::Memfd {
                    receiver: (*receiver.identity).clone(),
                    names: names_of(receiver),
                }
            }
            Right::Monitor => Operation::Monitor,
            Right::File => {
                return Err(BusError::NotSupported(
                    "file rights are explained offline: pbusctl policy explain --file".into(),
                ))
            }
        };
        let explanation = self.policy.explain(&subject_peer.identity, &operation);
        Ok(ExplainPolicyReply {
            allowed: explanation.decision.allowed,
            right: explanation.decision.right.as_str().to_owned(),
            rule: explanation
                .decision
                .rule
                .as_ref()
                .map(|rule| rule.to_string())
                .unwrap_or_default(),
            reason: explanation.decision.reason.to_string(),
            explanation: explanation.to_string(),
        })
    }
}
