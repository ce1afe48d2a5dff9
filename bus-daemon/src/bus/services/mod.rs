//! Built-in services: peers of the core that live inside the daemon and are
//! addressed by well-known name like any other service. The bus driver
//! (`org.pbus.Bus`: names, match rules, identity, stats, policy) is the
//! first; the file broker comes next.
//!
//! A call to a service is routed like any call (the name resolves to the
//! service instead of a connection), handled on the routing thread, and
//! answered with frames the bus emits ([`super::emitted`]), fds included.
//! What needs blocking work (reading policy files, opening files) is not
//! done here: the service hands a [`Job`] to the server through
//! [`Action::Job`](super::Action::Job), the server runs it off the routing
//! thread and gives back its [`JobOutput`] with [`Bus::handle_job_done`],
//! and the service answers the callers that waited for it then.

pub(super) mod driver;

use super::*;

/// A built-in service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    /// The bus driver, `org.pbus.Bus`.
    Driver,
}

impl Service {
    /// Every built-in service.
    pub const ALL: [Service; 1] = [Service::Driver];

    /// The well-known name the service answers on.
    pub fn name(self) -> &'static str {
        match self {
            Self::Driver => BUS_NAME,
        }
    }

    /// The service that owns `name`, if a built-in one does.
    pub fn for_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|service| service.name() == name)
    }
}

/// Blocking work a service needs done off the routing thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Job {
    /// Load the configured policy (files, or the built-in one).
    LoadPolicy,
}

/// What a [`Job`] produced, handed back with [`Bus::handle_job_done`].
#[derive(Debug)]
pub enum JobOutput {
    /// The loaded policy, or why it could not be loaded.
    Policy(Result<Arc<Policy>, String>),
}

/// Names one job handed out by [`Bus::poll_action`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(pub u64);

/// A job handed out and not done yet: who waits for it.
#[derive(Debug)]
pub(super) struct PendingJob {
    pub(super) service: Service,
    pub(super) job: Job,
    /// Calls answered when the job is done: (caller, serial).
    pub(super) waiters: Vec<(PeerId, u64)>,
}

/// What a finished job did, for the server's log.
#[derive(Debug, PartialEq, Eq)]
pub enum JobDone {
    /// A policy was installed for this many peers.
    PolicyInstalled {
        /// Peers whose snapshots were rebuilt.
        peers: usize,
    },
    /// The policy could not be loaded; the old one stays.
    PolicyRefused(String),
    /// The job was not known (already done).
    Unknown,
}

impl<Io> Bus<Io> {
    /// Dispatches a call to a built-in service.
    pub(super) fn call_service(
        &mut self,
        service: Service,
        from: PeerId,
        header: &HeaderView<'_>,
        body: &[u8],
        fds: Vec<OwnedFd>,
        now: Instant,
    ) -> Result<(), BusError> {
        match service {
            Service::Driver => {
                if !fds.is_empty() {
                    return Err(BusError::FdsNotSupported("the bus accepts no fds".into()));
                }
                self.handle_bus_call(from, header, body, now)
            }
        }
    }

    /// Queues `job` for `service` (joining the same job if one is already
    /// waiting to be done); `waiter` is answered when it is done.
    pub(super) fn start_job(&mut self, service: Service, job: Job, waiter: Option<(PeerId, u64)>) {
        if let Some(pending) = self
            .pending_jobs
            .values_mut()
            .find(|pending| pending.service == service && pending.job == job)
        {
            pending.waiters.extend(waiter);
            return;
        }
        self.next_job += 1;
        let id = JobId(self.next_job);
        self.pending_jobs.insert(
            id,
            PendingJob {
                service,
                job: job.clone(),
                waiters: waiter.into_iter().collect(),
            },
        );
        self.jobs.push_back((id, job));
    }

    /// Asks for the policy to be reloaded (SIGHUP): a [`Job::LoadPolicy`]
    /// comes out of [`poll_action`](Self::poll_action).
    pub fn request_policy_reload(&mut self) {
        self.start_job(Service::Driver, Job::LoadPolicy, None);
    }

    /// The server finished job `id`: the service it belongs to uses the
    /// output and answers whoever waited.
    pub fn handle_job_done(&mut self, id: JobId, output: JobOutput) -> JobDone {
        let Some(pending) = self.pending_jobs.remove(&id) else {
            return JobDone::Unknown;
        };
        match (pending.service, output) {
            (Service::Driver, JobOutput::Policy(result)) => {
                match self.finish_policy_reload(&pending.waiters, result) {
                    Ok(peers) => JobDone::PolicyInstalled { peers },
                    Err(why) => JobDone::PolicyRefused(why),
                }
            }
        }
    }
}
