//! Typed wrappers for the bus's own methods (`org.pbus.Bus`): names,
//! match rules, peer identity, ping.

use pbus_proto::v1::{
    AddMatchRequest, Empty, GetNameOwnerReply, GetNameOwnerRequest, GetPeerIdentityRequest,
    ListNamesReply, ListNamesRequest, ListQueuedOwnersReply, ListQueuedOwnersRequest, NameEntry,
    NameHasOwnerReply, NameHasOwnerRequest, PeerIdentity, PingReply, PingRequest, ReleaseNameReply,
    ReleaseNameRequest, ReleaseNameResult, RemoveMatchRequest, RequestNameReply,
    RequestNameRequest, RequestNameResult,
};
use pbus_proto::{BUS_NAME, BUS_PATH};
use prost::{Message, Name};

use crate::signals::MatchRule;
use crate::{Connection, Error};

/// Flags for [`Connection::request_name`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestNameFlags {
    /// Let another peer take the name with `replace_existing`.
    pub allow_replacement: bool,
    /// Take the name if its owner allows replacement.
    pub replace_existing: bool,
    /// Fail instead of queueing.
    pub do_not_queue: bool,
}

impl RequestNameFlags {
    /// The wire bits.
    pub fn bits(self) -> u32 {
        u32::from(self.allow_replacement)
            | u32::from(self.replace_existing) << 1
            | u32::from(self.do_not_queue) << 2
    }
}

impl Connection {
    async fn bus_call<Req: Message + Name, Rep: Message + Default + Name>(
        &self,
        method: &str,
        request: &Req,
    ) -> Result<Rep, Error> {
        self.method_call(BUS_NAME, method)
            .path(BUS_PATH)
            .call(request)
            .await
    }

    /// Asks for ownership of a well-known name.
    pub async fn request_name(
        &self,
        name: &str,
        flags: RequestNameFlags,
    ) -> Result<RequestNameResult, Error> {
        let reply: RequestNameReply = self
            .bus_call(
                "RequestName",
                &RequestNameRequest {
                    name: name.to_owned(),
                    flags: flags.bits(),
                },
            )
            .await?;
        RequestNameResult::try_from(reply.result)
            .map_err(|_| Error::Protocol(format!("unknown RequestName result {}", reply.result)))
    }

    /// Releases a name (or leaves its queue).
    pub async fn release_name(&self, name: &str) -> Result<ReleaseNameResult, Error> {
        let reply: ReleaseNameReply = self
            .bus_call(
                "ReleaseName",
                &ReleaseNameRequest {
                    name: name.to_owned(),
                },
            )
            .await?;
        ReleaseNameResult::try_from(reply.result)
            .map_err(|_| Error::Protocol(format!("unknown ReleaseName result {}", reply.result)))
    }

    /// Names this connection may see, with owners and queue lengths.
    pub async fn list_names(&self, include_unique: bool) -> Result<Vec<NameEntry>, Error> {
        let reply: ListNamesReply = self
            .bus_call("ListNames", &ListNamesRequest { include_unique })
            .await?;
        Ok(reply.names)
    }

    /// The primary owner of `name` then its queue, as unique names.
    pub async fn list_queued_owners(&self, name: &str) -> Result<Vec<String>, Error> {
        let reply: ListQueuedOwnersReply = self
            .bus_call(
                "ListQueuedOwners",
                &ListQueuedOwnersRequest {
                    name: name.to_owned(),
                },
            )
            .await?;
        Ok(reply.owners)
    }

    /// The unique name owning `name`.
    pub async fn get_name_owner(&self, name: &str) -> Result<String, Error> {
        let reply: GetNameOwnerReply = self
            .bus_call(
                "GetNameOwner",
                &GetNameOwnerRequest {
                    name: name.to_owned(),
                },
            )
            .await?;
        Ok(reply.owner)
    }

    /// Whether `name` has an owner (that this connection may see).
    pub async fn name_has_owner(&self, name: &str) -> Result<bool, Error> {
        let reply: NameHasOwnerReply = self
            .bus_call(
                "NameHasOwner",
                &NameHasOwnerRequest {
                    name: name.to_owned(),
                },
            )
            .await?;
        Ok(reply.has_owner)
    }

    /// The identity of the peer owning `name` (unique or well-known) as the
    /// bus sees it; an empty name asks about this connection.
    pub async fn peer_identity(&self, name: &str) -> Result<PeerIdentity, Error> {
        self.bus_call(
            "GetPeerIdentity",
            &GetPeerIdentityRequest {
                name: name.to_owned(),
            },
        )
        .await
    }

    /// Queue and quota use of the peers this connection may see, and
    /// daemon-wide totals.
    pub async fn stats(&self) -> Result<pbus_proto::v1::GetStatsReply, Error> {
        self.bus_call("GetStats", &pbus_proto::v1::GetStatsRequest {})
            .await
    }

    /// Asks the bus to re-read its policy files (root or the daemon's uid
    /// only). An invalid policy leaves the old one in force and the error
    /// says why, with file, line and column.
    pub async fn reload_policy(&self) -> Result<pbus_proto::v1::ReloadPolicyReply, Error> {
        self.bus_call("ReloadPolicy", &pbus_proto::v1::ReloadPolicyRequest {})
            .await
    }

    /// How the policy in force decides `right` for `subject` (a peer name;
    /// empty for this connection) on `target` (and `member` for talk and
    /// receive).
    pub async fn explain_policy(
        &self,
        subject: &str,
        right: &str,
        target: &str,
        member: &str,
    ) -> Result<pbus_proto::v1::ExplainPolicyReply, Error> {
        self.bus_call(
            "ExplainPolicy",
            &pbus_proto::v1::ExplainPolicyRequest {
                subject: subject.to_owned(),
                right: right.to_owned(),
                target: target.to_owned(),
                member: member.to_owned(),
            },
        )
        .await
    }

    /// Pings the bus.
    pub async fn ping(&self) -> Result<PingReply, Error> {
        self.bus_call("Ping", &PingRequest {}).await
    }

    /// Adds a match rule on the bus without a local subscription (see
    /// [`Connection::subscribe`] for the usual way).
    pub async fn add_match(&self, rule: &MatchRule) -> Result<(), Error> {
        let _: Empty = self
            .bus_call(
                "AddMatch",
                &AddMatchRequest {
                    rule: Some(rule.to_wire()),
                },
            )
            .await?;
        Ok(())
    }

    /// Removes a match rule added with [`add_match`](Self::add_match).
    pub async fn remove_match(&self, rule: &MatchRule) -> Result<(), Error> {
        let _: Empty = self
            .bus_call(
                "RemoveMatch",
                &RemoveMatchRequest {
                    rule: Some(rule.to_wire()),
                },
            )
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_bits_match_the_wire_enum() {
        use pbus_proto::v1::RequestNameFlag as F;
        let all = RequestNameFlags {
            allow_replacement: true,
            replace_existing: true,
            do_not_queue: true,
        };
        assert_eq!(
            all.bits(),
            F::AllowReplacement as u32 | F::ReplaceExisting as u32 | F::DoNotQueue as u32
        );
        assert_eq!(RequestNameFlags::default().bits(), 0);
    }
}
