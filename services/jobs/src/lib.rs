//! The jobs service: batch jobs held on the validator side (docs/jobs.md §3). A tenant
//! creates a job, puts its inputs in parts (each within one message, so the job may be
//! larger than any message), and starts it; the service cuts the parts into shard tasks,
//! submits them through ingress as the tenant (its quotas and rate limits apply),
//! resubmits a shard that ends unverified, and stores each verified shard's outputs. The
//! tenant follows progress, fetches verified shards in order while the job runs, and may
//! cancel it; a deadline ends it.
//!
//! Durable: the job's record (KV `jobs`) is written before a request is answered and
//! within 200 ms of shard ends, inputs and outputs live in the object store `job-data`,
//! and a shard's outputs are stored before its record says verified. A restarted service loads every unfinished job, reads back from RESULTS
//! the results of the shards it had running, and carries on; a shard submitted but not
//! yet recorded is submitted again under the same request id, which ingress answers with
//! the same task. One service per stack: two would each run every unfinished job (their
//! record writes are compare-and-set, so the second writer of a change stops running it).
//!
//! Tenants reach jobs only through requests on `sundara.jobs.<tenant>.<op>`, and the
//! service takes the tenant from the subject: one tenant's jobs, inputs and outputs are
//! not found by another.

mod cache;
pub mod client;
pub mod job;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv, object_store::ObjectStore};
use bytes::Bytes;
use futures::StreamExt;
use job::{Ended, JobRecord, Limits};
use sundara_common::{Endpoints, Registry, Shutdown, js_err, nats};
use sundara_schemas::{
    ClientResult, JobAnswer, JobOp, JobRefusal, JobReply, JobRequest, JobState, MAX_MESSAGE_BYTES, ResultStatus,
    SubmitOutcome, SubmitReply, SubmitRequest, Tensor, codec::decode_unversioned, decode, encode, now_ms,
    subjects as subj,
};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

/// `sundara jobs serve`'s flags.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Parts of inputs one job may have.
    #[arg(long, env = "SUNDARA_JOBS_MAX_PARTS", default_value_t = Limits::default().max_parts)]
    pub max_parts: u32,
    /// Shard tasks one job may be cut into.
    #[arg(long, env = "SUNDARA_JOBS_MAX_SHARDS", default_value_t = Limits::default().max_shards)]
    pub max_shards: u32,
    /// Bytes of inputs one job may hold.
    #[arg(long, env = "SUNDARA_JOBS_MAX_JOB_BYTES", default_value_t = Limits::default().max_job_bytes)]
    pub max_job_bytes: u64,
    /// Shard tasks one job may have in flight; a job asking more gets this many.
    #[arg(long, env = "SUNDARA_JOBS_MAX_IN_FLIGHT", default_value_t = Limits::default().max_in_flight)]
    pub max_in_flight: u32,
    /// Unfinished jobs one tenant may have at once.
    #[arg(long, env = "SUNDARA_JOBS_MAX_ACTIVE", default_value_t = 8)]
    pub max_active_jobs: usize,
    /// Bytes of inputs one tenant's unfinished jobs may hold together (a job's inputs are
    /// deleted when it ends).
    #[arg(long, env = "SUNDARA_JOBS_MAX_TENANT_BYTES", default_value_t = 1 << 30)]
    pub max_tenant_bytes: u64,
    /// Longest deadline a job may have, in seconds from its creation (below the week the
    /// jobs' data is kept).
    #[arg(long, env = "SUNDARA_JOBS_MAX_DEADLINE_SECS", default_value_t = 24 * 3600)]
    pub max_deadline_secs: u64,
}

impl Default for Args {
    fn default() -> Self {
        let limits = Limits::default();
        Args {
            max_parts: limits.max_parts,
            max_shards: limits.max_shards,
            max_job_bytes: limits.max_job_bytes,
            max_in_flight: limits.max_in_flight,
            max_active_jobs: 8,
            max_tenant_bytes: 1 << 30,
            max_deadline_secs: limits.max_deadline_ms / 1000,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub endpoints: Endpoints,
    pub limits: Limits,
    pub max_active_jobs: usize,
    pub max_tenant_bytes: u64,
    /// How often deadlines are checked and running shards' results read back from RESULTS
    /// (what the results subscription may have missed: a reconnect, a restart).
    pub recheck: Duration,
}

impl Config {
    pub fn from_args(args: Args, endpoints: Endpoints) -> Config {
        let limits = Limits {
            max_parts: args.max_parts,
            max_shards: args.max_shards,
            max_job_bytes: args.max_job_bytes,
            max_in_flight: args.max_in_flight.max(1),
            max_deadline_ms: args.max_deadline_secs.min(6 * 24 * 3600) * 1000,
            ..Limits::default()
        };
        Config {
            endpoints,
            limits,
            max_active_jobs: args.max_active_jobs,
            max_tenant_bytes: args.max_tenant_bytes,
            recheck: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    #[error(transparent)]
    Common(#[from] sundara_common::Error),
}

pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), JobsError> {
    let grace = sundara_common::SHUTDOWN_GRACE;
    sundara_common::stop_within("jobs", &shutdown.clone(), grace, run_until_stopped(config, shutdown)).await
}

/// What reaches the service's one task besides requests.
enum Event {
    /// A result of a tenant with jobs running, as published: decoded only when it is a
    /// shard's (most of a tenant's results may be other tasks').
    Published { task_id: String, payload: Bytes },
    /// A shard's submission was answered (or could not be).
    Submitted { key: String, shard: u32, answer: Result<SubmitOutcome, String> },
    /// A verified shard's outputs were written to the object store (or could not be).
    Stored { key: String, shard: u32, task_id: String, encoded: Bytes, stored: Result<(), String> },
}

/// An answer to a request: built now, or a verified shard's outputs as stored.
enum Answered {
    Answer(JobAnswer),
    Encoded(Bytes),
}

impl From<JobAnswer> for Answered {
    fn from(answer: JobAnswer) -> Answered {
        Answered::Answer(answer)
    }
}

/// Bytes of verified shards' outputs kept in memory for followers.
const OUTPUT_CACHE_BYTES: usize = 64 << 20;

/// An unfinished job as the service holds it.
struct Active {
    record: JobRecord,
    /// The KV revision the record was read or last written at.
    revision: u64,
    dirty: bool,
    /// Shards whose submission is on its way.
    submitting: HashSet<u32>,
    /// The part last read, for the next shard of it.
    part: Option<(u32, Arc<Vec<Tensor>>)>,
    /// After a refusal that means "later" (the tenant's limits), no submission before this.
    later_until: Option<tokio::time::Instant>,
    /// When the record was last written: shard ends are written together, once per
    /// [`WRITE_EVERY`] at most.
    written: tokio::time::Instant,
}

struct Service {
    nats: async_nats::Client,
    kv: kv::Store,
    /// KV `jobs`' stream: a tenant's keys are listed from its subjects.
    records: jetstream::stream::Stream<()>,
    data: ObjectStore,
    results: jetstream::stream::Stream<()>,
    registry: Registry,
    config: Config,
    jobs: HashMap<String, Active>,
    /// Running shard task → (job key, shard).
    tasks: HashMap<String, (String, u32)>,
    /// Tenants whose results are followed, with their forwarding task.
    following: HashMap<String, tokio::task::JoinHandle<()>>,
    events: mpsc::Sender<Event>,
    recent: cache::OutputCache,
    /// When the running shards' results were last read back.
    rechecked: tokio::time::Instant,
}

async fn run_until_stopped(config: Config, shutdown: Shutdown) -> Result<(), JobsError> {
    let client = nats::connect(&config.endpoints.nats, "sundara-jobs").await?;
    let js = jetstream::new(client.clone());
    nats::await_provisioned(&js, Duration::from_secs(60)).await?;
    let kv = js.get_key_value(subj::JOBS_BUCKET).await.map_err(js_err)?;
    let records = js.get_stream_no_info(format!("KV_{}", subj::JOBS_BUCKET)).await.map_err(js_err)?;
    let data = js.get_object_store(subj::JOB_DATA).await.map_err(js_err)?;
    let results = js.get_stream_no_info(subj::RESULTS_STREAM).await.map_err(js_err)?;
    let registry = Registry::open(&js).await?;
    let mut requests = client.queue_subscribe(subj::JOBS_ALL, "jobs".into()).await.map_err(js_err)?;
    let (events, mut incoming) = mpsc::channel(4096);
    let mut service = Service {
        nats: client,
        kv,
        records,
        data,
        results,
        registry,
        config,
        jobs: HashMap::new(),
        tasks: HashMap::new(),
        following: HashMap::new(),
        events,
        recent: cache::OutputCache::new(OUTPUT_CACHE_BYTES),
        rechecked: tokio::time::Instant::now(),
    };
    service.recover().await?;
    tracing::info!(jobs = service.jobs.len(), "jobs service serving");
    let mut tick = tokio::time::interval(WRITE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(msg) = requests.next() => service.on_request(msg).await,
            Some(event) = incoming.recv() => service.on_event(event).await,
            _ = tick.tick() => service.on_tick().await,
        }
        service.pump().await;
    }
    service.flush(true).await;
    for (_, follower) in service.following.drain() {
        follower.abort();
    }
    Ok(())
}

fn refused(code: JobRefusal, reason: impl Into<String>) -> JobAnswer {
    JobAnswer::Refused { code, reason: reason.into() }
}

fn unavailable(e: impl std::fmt::Display) -> JobAnswer {
    refused(JobRefusal::Unavailable, e.to_string())
}

impl Service {
    /// Loads every unfinished job and reads back the results of the shards it had running.
    async fn recover(&mut self) -> Result<(), JobsError> {
        let mut keys = self.kv.keys().await.map_err(js_err)?;
        let mut loaded = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(js_err)?;
            if let Some((record, revision)) = self.read(&key).await?
                && !record.state.is_final()
            {
                loaded.push((record, revision));
            }
        }
        for (record, revision) in loaded {
            self.hold(record, revision);
        }
        self.recheck_running().await;
        Ok(())
    }

    async fn read(&self, key: &str) -> Result<Option<(JobRecord, u64)>, sundara_common::Error> {
        let Some(entry) = self.kv.entry(key).await.map_err(js_err)? else { return Ok(None) };
        if entry.operation != kv::Operation::Put {
            return Ok(None);
        }
        match decode_unversioned::<JobRecord>(&entry.value, MAX_MESSAGE_BYTES) {
            Ok(record) => Ok(Some((record, entry.revision))),
            Err(e) => {
                tracing::error!(key, error = %e, "unreadable job record; left as it is");
                Ok(None)
            }
        }
    }

    /// Holds an unfinished job: its running shards' tasks routed to it, its tenant's
    /// results followed.
    fn hold(&mut self, record: JobRecord, revision: u64) {
        let key = record.key();
        for (shard, task) in record.running() {
            self.tasks.insert(task.to_string(), (key.clone(), shard));
        }
        self.follow(&record.tenant);
        let active = Active {
            record,
            revision,
            dirty: false,
            submitting: HashSet::new(),
            part: None,
            later_until: None,
            written: tokio::time::Instant::now(),
        };
        self.jobs.insert(key, active);
    }

    /// Forwards `tenant`'s results to the service's task (core NATS: every result as it is
    /// published; what this misses, [`Service::recheck_running`] reads back).
    fn follow(&mut self, tenant: &str) {
        if self.following.contains_key(tenant) {
            return;
        }
        let (nats, events, subject) = (self.nats.clone(), self.events.clone(), subj::results_of(tenant));
        let follower = tokio::spawn(async move {
            let Ok(mut results) = nats.subscribe(subject.clone()).await else {
                tracing::warn!(subject, "cannot follow results; relying on read-backs");
                return;
            };
            while let Some(msg) = results.next().await {
                let Some((_, task_id)) = subj::result_parts(&msg.subject) else { continue };
                let event = Event::Published { task_id: task_id.to_string(), payload: msg.payload };
                if events.send(event).await.is_err() {
                    return;
                }
            }
        });
        self.following.insert(tenant.to_string(), follower);
    }

    /// Stops following tenants that have no unfinished job left.
    fn unfollow_idle(&mut self) {
        let busy: HashSet<&str> = self.jobs.values().map(|a| a.record.tenant.as_str()).collect();
        self.following.retain(|tenant, follower| {
            let keep = busy.contains(tenant.as_str());
            if !keep {
                follower.abort();
            }
            keep
        });
    }

    async fn on_request(&mut self, msg: async_nats::Message) {
        let Some(reply) = msg.reply.clone() else { return };
        let answered = match subj::jobs_tenant(&msg.subject) {
            None => refused(JobRefusal::BadRequest, "no tenant in the subject").into(),
            Some(tenant) => {
                let tenant = tenant.to_string();
                match decode::<JobRequest>(&msg.payload, MAX_MESSAGE_BYTES) {
                    Ok(JobRequest { op: JobOp::Fetch { job_id, shard }, .. }) => {
                        self.fetch(&tenant, &job_id, shard).await
                    }
                    Ok(request) => self.answer(&tenant, request.op, msg.payload.len() as u64).await.into(),
                    Err(e) => refused(JobRefusal::BadRequest, e.to_string()).into(),
                }
            }
        };
        let (label, encoded) = match answered {
            Answered::Encoded(bytes) => ("ok", bytes),
            Answered::Answer(answer) => (answer_label(&answer), Bytes::from(encode(&JobReply::new(answer)))),
        };
        metrics::counter!("sundara_job_requests_total", "answer" => label).increment(1);
        if let Err(e) = self.nats.publish(reply, encoded).await {
            tracing::warn!(error = %e, "cannot answer a job request");
        }
    }

    async fn answer(&mut self, tenant: &str, op: JobOp, size: u64) -> JobAnswer {
        let now = now_ms();
        match op {
            JobOp::Create(spec) => self.create(tenant, spec, now).await,
            JobOp::Put { job_id, part, inputs } => self.put(tenant, &job_id, part, inputs, size).await,
            JobOp::Start { job_id } => self.change(tenant, &job_id, |r, limits| r.start(now, limits)).await,
            JobOp::Cancel { job_id } => self.change(tenant, &job_id, |r, _| r.cancel(now)).await,
            JobOp::Show { job_id } => match self.lookup(tenant, &job_id).await {
                Ok(record) => JobAnswer::Status(record.status(now)),
                Err(answer) => answer,
            },
            JobOp::List {} => self.list(tenant, now).await,
            JobOp::Fetch { .. } => unreachable!("fetched in on_request"),
        }
    }

    async fn create(&mut self, tenant: &str, spec: sundara_schemas::JobSpec, now: u64) -> JobAnswer {
        let active = self.jobs.values().filter(|a| a.record.tenant == tenant).count();
        if active >= self.config.max_active_jobs {
            let why =
                format!("{active} unfinished jobs, the most a tenant may have; wait for one to end or cancel one");
            return refused(JobRefusal::TooManyJobs, why);
        }
        // Pinned: every shard runs the version the job was created with.
        let mut spec = spec;
        match self.registry.resolve(&spec.model).await {
            Ok(Some(meta)) => spec.model = format!("{}@{}", meta.name, meta.version),
            Ok(None) => return refused(JobRefusal::UnknownModel, format!("no model {:?} is registered", spec.model)),
            Err(e) => return unavailable(e),
        }
        let job_id = uuid::Uuid::now_v7().simple().to_string();
        let salt = uuid::Uuid::new_v4().simple().to_string();
        let record = match JobRecord::create(job_id, tenant, spec, salt, now, &self.config.limits) {
            Ok(record) => record,
            Err((code, reason)) => return refused(code, reason),
        };
        let status = record.status(now);
        match self.kv.create(record.key(), Bytes::from(encode(&record))).await {
            Ok(revision) => {
                self.hold(record, revision);
                JobAnswer::Status(status)
            }
            Err(e) => unavailable(e),
        }
    }

    /// Stores part `part` of an uploading job's inputs.
    async fn put(&mut self, tenant: &str, job_id: &str, part: u32, inputs: Vec<Tensor>, size: u64) -> JobAnswer {
        let key = job::key(tenant, job_id);
        let Some(active) = self.jobs.get(&key) else { return self.not_active(tenant, job_id).await };
        let Some(rows) = sundara_runtime::batch::rows(&inputs) else {
            return refused(JobRefusal::BadRequest, format!("part {part} has no inputs"));
        };
        if inputs.iter().any(|t| t.shape.first() != Some(&rows)) {
            return refused(JobRefusal::BadRequest, format!("part {part}'s inputs do not share a first dimension"));
        }
        // Checked against the record, the model and the tenant's bytes before any is stored.
        let mut checked = active.record.clone();
        if let Err((code, reason)) = checked.put_part(part, rows, size, &self.config.limits) {
            return refused(code, reason);
        }
        let inputs = match self.admit_part(&checked.spec.model, part, inputs).await {
            Ok(inputs) => inputs,
            Err(answer) => return answer,
        };
        let held: u64 = self.jobs.values().filter(|a| a.record.tenant == tenant).map(|a| a.record.input_bytes()).sum();
        let after = held - self.jobs[&key].record.input_bytes() + checked.input_bytes();
        if after > self.config.max_tenant_bytes {
            let why = format!(
                "the tenant's unfinished jobs would hold {after} bytes of inputs, over its limit of {}",
                self.config.max_tenant_bytes
            );
            return refused(JobRefusal::TooLarge, why);
        }
        let name = job::part_object(tenant, job_id, part);
        let bytes = encode(&inputs);
        if let Err(e) = self.data.put(name.as_str(), &mut bytes.as_slice()).await {
            return unavailable(e);
        }
        let active = self.jobs.get_mut(&key).expect("held above");
        active.record = checked;
        active.dirty = true;
        self.flush_one(&key).await;
        self.status_of(&key)
    }

    /// `inputs` checked as ingress checks a task's against the job's model (names, dtypes,
    /// shapes, bounds): a part that no shard of could run is refused at once.
    async fn admit_part(&self, model: &str, part: u32, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, JobAnswer> {
        let meta = match self.registry.resolve(model).await {
            Ok(Some(meta)) => meta,
            Ok(None) => {
                return Err(refused(JobRefusal::UnknownModel, format!("model {model} is no longer registered")));
            }
            Err(e) => return Err(unavailable(e)),
        };
        let request = SubmitRequest::new(model, inputs);
        match sundara_ingress::admit(&request, &meta, &sundara_schemas::Limits::default()) {
            Ok(()) => Ok(request.inputs),
            Err(rejection) => {
                let why = format!("part {part}: {}: {}", rejection.code.as_str(), rejection.reason);
                Err(refused(JobRefusal::BadRequest, why))
            }
        }
    }

    /// Applies `change` to a job this service holds, writes it, and answers its status.
    async fn change(
        &mut self,
        tenant: &str,
        job_id: &str,
        change: impl FnOnce(&mut JobRecord, &Limits) -> Result<(), job::Refused>,
    ) -> JobAnswer {
        let key = job::key(tenant, job_id);
        let Some(active) = self.jobs.get_mut(&key) else { return self.not_active(tenant, job_id).await };
        let mut changed = active.record.clone();
        if let Err((code, reason)) = change(&mut changed, &self.config.limits) {
            return refused(code, reason);
        }
        active.record = changed;
        active.dirty = true;
        self.flush_one(&key).await;
        self.status_of(&key)
    }

    /// A finished job's answer for a request that needs it unfinished, or not found.
    async fn not_active(&self, tenant: &str, job_id: &str) -> JobAnswer {
        match self.lookup(tenant, job_id).await {
            Ok(record) => refused(JobRefusal::WrongState, format!("the job is {}", record.state.as_str())),
            Err(answer) => answer,
        }
    }

    /// The job `job_id` of `tenant`, held or stored.
    async fn lookup(&self, tenant: &str, job_id: &str) -> Result<JobRecord, JobAnswer> {
        if !job::valid_id(job_id) {
            return Err(refused(JobRefusal::NotFound, format!("no job {job_id:?}")));
        }
        let key = job::key(tenant, job_id);
        if let Some(active) = self.jobs.get(&key) {
            return Ok(active.record.clone());
        }
        match self.read(&key).await {
            Ok(Some((record, _))) => Ok(record),
            Ok(None) => Err(refused(JobRefusal::NotFound, format!("no job {job_id}"))),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn list(&self, tenant: &str, now: u64) -> JobAnswer {
        // The tenant's keys from the bucket's stream subjects, filtered by the server.
        let prefix = format!("$KV.{}.{tenant}.", subj::JOBS_BUCKET);
        let mut subjects = match self.records.info_with_subjects(format!("{prefix}*")).await {
            Ok(subjects) => subjects,
            Err(e) => return unavailable(e),
        };
        let mut ids = Vec::new();
        while let Some(Ok((subject, _))) = subjects.next().await {
            if let Some(id) = subject.strip_prefix(&prefix) {
                ids.push(id.to_string());
            }
        }
        // uuid v7 ids sort by creation: newest first, at most 100.
        ids.sort_unstable_by(|a, b| b.cmp(a));
        let mut statuses = Vec::new();
        for id in ids.into_iter().take(100) {
            if let Ok(record) = self.lookup(tenant, &id).await {
                statuses.push(record.status(now));
            }
        }
        JobAnswer::List(statuses)
    }

    /// A verified shard's outputs as stored (an encoded `JobReply`): from memory when
    /// verified recently, else from the object store.
    async fn fetch(&self, tenant: &str, job_id: &str, shard: u32) -> Answered {
        let record = match self.lookup(tenant, job_id).await {
            Ok(record) => record,
            Err(answer) => return answer.into(),
        };
        match record.shards.get(shard as usize).map(|s| &s.state) {
            Some(job::ShardState::Verified { .. }) => {}
            Some(_) => return refused(JobRefusal::WrongState, format!("shard {shard} is not verified yet")).into(),
            None => {
                let why = format!("shard {shard}: the job has {}", record.shards.len());
                return refused(JobRefusal::BadRequest, why).into();
            }
        }
        let name = job::output_object(tenant, job_id, shard);
        if let Some(encoded) = self.recent.get(&name) {
            return Answered::Encoded(encoded);
        }
        match self.read_object(&name).await {
            Ok(bytes) => Answered::Encoded(bytes.into()),
            Err(e) => unavailable(e).into(),
        }
    }

    async fn read_object(&self, name: &str) -> Result<Vec<u8>, sundara_common::Error> {
        let mut object = self.data.get(name).await.map_err(js_err)?;
        let mut bytes = Vec::new();
        object
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| sundara_common::Error::Registry(format!("reading {name}: {e}")))?;
        Ok(bytes)
    }

    fn status_of(&self, key: &str) -> JobAnswer {
        JobAnswer::Status(self.jobs[key].record.status(now_ms()))
    }

    async fn on_event(&mut self, event: Event) {
        match event {
            Event::Published { task_id, payload } => {
                if self.tasks.contains_key(&task_id)
                    && let Ok(result) = decode::<ClientResult>(&payload, MAX_MESSAGE_BYTES)
                {
                    self.on_result(result).await;
                }
            }
            Event::Submitted { key, shard, answer } => self.on_submitted(key, shard, answer),
            Event::Stored { key, shard, task_id, encoded, stored } => {
                self.on_stored(key, shard, task_id, encoded, stored)
            }
        }
    }

    fn on_submitted(&mut self, key: String, shard: u32, answer: Result<SubmitOutcome, String>) {
        let Some(active) = self.jobs.get_mut(&key) else { return };
        active.submitting.remove(&shard);
        match answer {
            Ok(SubmitOutcome::Accepted { task_id, .. }) => {
                if active.record.state == JobState::Running {
                    self.tasks.insert(task_id.clone(), (key, shard));
                    active.record.submitted(shard, task_id);
                    active.dirty = true;
                }
            }
            // Later: the shard stays queued, and the job submits nothing for `LATER`.
            Ok(SubmitOutcome::Rejected { code, reason }) if retry_later(code) => {
                active.later_until = Some(tokio::time::Instant::now() + LATER);
                if active.record.wait(code.as_str(), &reason) {
                    active.dirty = true;
                }
            }
            Ok(SubmitOutcome::Rejected { code, reason }) => {
                active.record.refused(shard, &format!("{code:?}: {reason}"), now_ms());
                active.dirty = true;
            }
            Err(e) => tracing::warn!(job = %key, shard, error = %e, "shard submission failed; will retry"),
        }
    }

    /// A shard's task ended. Verified: its outputs are written to the object store (off
    /// this task) and the record says verified once they are. Failed: retried or the end.
    async fn on_result(&mut self, result: ClientResult) {
        let Some((key, shard)) = self.tasks.remove(&result.task_id) else { return };
        let Some(active) = self.jobs.get_mut(&key) else { return };
        match result.status {
            ResultStatus::Verified { outputs, .. } => {
                let first_row = active.record.shards[shard as usize].first_row;
                let task_id = result.task_id;
                let outputs = JobAnswer::Outputs { shard, first_row, task_id: task_id.clone(), outputs };
                let encoded = Bytes::from(encode(&JobReply::new(outputs)));
                let name = job::output_object(&active.record.tenant, &active.record.job_id, shard);
                let (data, events) = (self.data.clone(), self.events.clone());
                tokio::spawn(async move {
                    let written = data.put(name.as_str(), &mut encoded.as_ref()).await;
                    let stored = written.map(|_| ()).map_err(|e| e.to_string());
                    let _ = events.send(Event::Stored { key, shard, task_id, encoded, stored }).await;
                });
            }
            ResultStatus::Failed { code, reason } => {
                let ended = active.record.failed(shard, &result.task_id, &format!("{code:?}: {reason}"), now_ms());
                Self::ended(active, ended);
            }
        }
    }

    /// A verified shard's outputs are stored (the record says so now), or could not be (its
    /// result is read back again at the next recheck).
    fn on_stored(&mut self, key: String, shard: u32, task_id: String, encoded: Bytes, stored: Result<(), String>) {
        let Some(active) = self.jobs.get_mut(&key) else { return };
        if let Err(e) = stored {
            tracing::warn!(job = %key, shard, error = %e, "cannot store a shard's outputs; will read the result back");
            self.tasks.insert(task_id, (key, shard));
            return;
        }
        let name = job::output_object(&active.record.tenant, &active.record.job_id, shard);
        let ended = active.record.verified(shard, &task_id, now_ms());
        Self::ended(active, ended);
        self.recent.insert(name, encoded);
    }

    /// Counts a shard's end and marks its job for writing.
    fn ended(active: &mut Active, ended: Ended) {
        let label = match ended {
            Ended::Ignored => return,
            Ended::Verified => "verified",
            Ended::Requeued => "retried",
            Ended::JobFailed => "failed",
        };
        active.dirty = true;
        metrics::counter!("sundara_job_shards_total", "end" => label).increment(1);
    }

    /// Every [`WRITE_EVERY`]: deadlines (the pump that follows writes what changed); every
    /// recheck period, the running shards' results read back and the gauges.
    async fn on_tick(&mut self) {
        let now = now_ms();
        for active in self.jobs.values_mut() {
            if active.record.expire(now) {
                active.dirty = true;
            }
        }
        if self.rechecked.elapsed() >= self.config.recheck {
            self.rechecked = tokio::time::Instant::now();
            self.recheck_running().await;
            self.gauges();
        }
    }

    /// Reads back from RESULTS the result of every running shard: one the subscription
    /// missed (a reconnect, a restart) is never waited on longer than one recheck.
    async fn recheck_running(&mut self) {
        let running: Vec<(String, String)> = self
            .jobs
            .values()
            .flat_map(|a| a.record.running().map(|(_, task)| (a.record.tenant.clone(), task.to_string())))
            .collect();
        for (tenant, task) in running {
            let Ok(raw) = self.results.direct_get_last_for_subject(subj::result(&tenant, &task)).await else {
                continue;
            };
            if let Ok(result) = decode::<ClientResult>(&raw.payload, MAX_MESSAGE_BYTES) {
                self.on_result(result).await;
            }
        }
    }

    /// Submits what each running job has room for, writes the changed records, and lets
    /// finished jobs go.
    async fn pump(&mut self) {
        let keys: Vec<String> = self.jobs.keys().cloned().collect();
        let now = tokio::time::Instant::now();
        for key in keys {
            let shards = {
                let active = &self.jobs[&key];
                if active.later_until.is_some_and(|until| now < until) {
                    continue;
                }
                active.record.to_submit(&active.submitting)
            };
            for shard in shards {
                self.submit(&key, shard).await;
            }
        }
        self.flush(false).await;
        let finished: Vec<String> =
            self.jobs.iter().filter(|(_, a)| a.record.state.is_final() && !a.dirty).map(|(k, _)| k.clone()).collect();
        for key in finished {
            if let Some(active) = self.jobs.remove(&key) {
                self.tasks.retain(|_, (k, _)| *k != key);
                self.drop_inputs(&active.record).await;
                let state = active.record.state.as_str();
                metrics::counter!("sundara_jobs_ended_total", "state" => state).increment(1);
                tracing::info!(job = %key, state, reason = ?active.record.reason, "job ended");
            }
        }
        self.unfollow_idle();
    }

    /// Deletes an ended job's inputs (its outputs stay for `fetch`): they count against no
    /// limit after it, and hold no space. One left by a failure ages out with the store.
    async fn drop_inputs(&self, record: &JobRecord) {
        for part in (0..record.parts.len() as u32).filter(|p| record.parts[*p as usize].is_some()) {
            let name = job::part_object(&record.tenant, &record.job_id, part);
            if let Err(e) = self.data.delete(name.as_str()).await {
                tracing::warn!(object = name, error = %e, "cannot delete an ended job's inputs; they age out");
            }
        }
    }

    /// Sends `shard`'s submission to ingress as its tenant; the answer comes back as an event.
    async fn submit(&mut self, key: &str, shard: u32) {
        let inputs = match self.shard_inputs(key, shard).await {
            Ok(inputs) => inputs,
            Err(e) => {
                let active = self.jobs.get_mut(key).expect("pumped");
                active.record.refused(shard, &format!("its inputs cannot be read: {e}"), now_ms());
                active.dirty = true;
                return;
            }
        };
        let active = self.jobs.get_mut(key).expect("pumped");
        active.submitting.insert(shard);
        let record = &active.record;
        let request = SubmitRequest {
            request_id: Some(record.request_id(shard)),
            timeout_ms: Some(record.spec.shard_timeout_ms),
            ..SubmitRequest::new(&record.spec.model, inputs)
        };
        let (nats, events, key, subject) =
            (self.nats.clone(), self.events.clone(), key.to_string(), subj::submit(&record.tenant));
        tokio::spawn(async move {
            let asked = tokio::time::timeout(Duration::from_secs(30), nats.request(subject, encode(&request).into()));
            let answer = match asked.await {
                Ok(Ok(reply)) => decode::<SubmitReply>(&reply.payload, MAX_MESSAGE_BYTES)
                    .map(|r| r.outcome)
                    .map_err(|e| e.to_string()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("ingress did not answer within 30 s".into()),
            };
            let _ = events.send(Event::Submitted { key, shard, answer }).await;
        });
    }

    /// `shard`'s rows of its part.
    async fn shard_inputs(&mut self, key: &str, shard: u32) -> Result<Vec<Tensor>, String> {
        let active = &self.jobs[key];
        let s = active.record.shards[shard as usize].clone();
        let part = match &active.part {
            Some((p, tensors)) if *p == s.part => tensors.clone(),
            _ => {
                let name = job::part_object(&active.record.tenant, &active.record.job_id, s.part);
                let bytes = self.read_object(&name).await.map_err(|e| e.to_string())?;
                let tensors: Vec<Tensor> = decode_unversioned(&bytes, MAX_MESSAGE_BYTES).map_err(|e| e.to_string())?;
                let tensors = Arc::new(tensors);
                self.jobs.get_mut(key).expect("held").part = Some((s.part, tensors.clone()));
                tensors
            }
        };
        sundara_runtime::batch::slice(&part, s.offset, s.rows).ok_or_else(|| "the part's rows do not line up".into())
    }

    /// Writes the changed records: each at most once per [`WRITE_EVERY`] (a job that ended
    /// at once), or every one with `all` (at shutdown). What is not written yet is safe to
    /// lose: a restart submits a shard again under the same request id (the same task), and
    /// reads a running shard's result back.
    async fn flush(&mut self, all: bool) {
        let due = |a: &Active| a.dirty && (all || a.record.state.is_final() || a.written.elapsed() >= WRITE_EVERY);
        let dirty: Vec<String> = self.jobs.iter().filter(|(_, a)| due(a)).map(|(k, _)| k.clone()).collect();
        for key in dirty {
            self.flush_one(&key).await;
        }
    }

    /// Writes one job's record (compare-and-set on its revision) and tells its tenant.
    async fn flush_one(&mut self, key: &str) {
        let Some(active) = self.jobs.get_mut(key) else { return };
        if !active.dirty {
            return;
        }
        match self.kv.update(key, Bytes::from(encode(&active.record)), active.revision).await {
            Ok(revision) => {
                active.revision = revision;
                active.dirty = false;
                active.written = tokio::time::Instant::now();
                let event = JobReply::new(JobAnswer::Status(active.record.status(now_ms())));
                let subject = subj::job_events(&active.record.tenant, &active.record.job_id);
                let _ = self.nats.publish(subject, encode(&event).into()).await;
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                // Another jobs service changed it: that one runs it now.
                tracing::error!(job = %key, "the job's record was changed by another jobs service; letting it go");
                self.jobs.remove(key);
                self.tasks.retain(|_, (k, _)| k != key);
            }
            Err(e) => tracing::warn!(job = %key, error = %e, "cannot write the job's record; will retry"),
        }
    }

    fn gauges(&self) {
        let mut shards = [0u64; 3];
        let mut states: HashMap<&'static str, u64> = HashMap::new();
        for active in self.jobs.values() {
            let s = active.record.status(now_ms());
            shards[0] += s.queued as u64;
            shards[1] += s.running as u64;
            shards[2] += s.verified as u64;
            *states.entry(active.record.state.as_str()).or_default() += 1;
        }
        for (label, n) in ["queued", "running", "verified"].into_iter().zip(shards) {
            metrics::gauge!("sundara_job_shards", "state" => label).set(n as f64);
        }
        metrics::gauge!("sundara_job_output_cache_bytes").set(self.recent.bytes() as f64);
        for state in [JobState::Uploading, JobState::Running] {
            let n = states.get(state.as_str()).copied().unwrap_or(0);
            metrics::gauge!("sundara_jobs", "state" => state.as_str()).set(n as f64);
        }
    }
}

/// A job's record is written at most this often while shards end (requests that change it
/// write it at once); also the service's tick.
const WRITE_EVERY: Duration = Duration::from_millis(200);

/// How long a job submits nothing after a refusal that says "later".
const LATER: Duration = Duration::from_millis(250);

/// Refusals that say "later": the shard stays queued.
fn retry_later(code: sundara_schemas::RejectCode) -> bool {
    use sundara_schemas::RejectCode;
    matches!(
        code,
        RejectCode::Overloaded | RejectCode::RateLimited | RejectCode::TooManyInFlight | RejectCode::StorageQuota
    )
}

fn answer_label(answer: &JobAnswer) -> &'static str {
    match answer {
        JobAnswer::Refused { .. } => "refused",
        _ => "ok",
    }
}
