//! One job's record and its rules, without I/O: what the service stores in KV and how a
//! request or a shard's end changes it. The service owns every record in one task and
//! writes it back after each change (`lib.rs`).

use serde::{Deserialize, Serialize};
use sundara_schemas::{JobRefusal, JobSpec, JobState, JobStatus, subjects as subj};

/// What the service allows a job (`sundara jobs serve`'s limits).
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    pub max_parts: u32,
    pub max_shards: u32,
    pub max_job_bytes: u64,
    pub max_in_flight: u32,
    pub max_attempts: u32,
    /// Longest deadline, from creation; a longer one is cut to it.
    pub max_deadline_ms: u64,
    /// Longest shard timeout; a longer one is cut to it.
    pub max_shard_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_parts: 4096,
            max_shards: 4096,
            max_job_bytes: 256 << 20,
            max_in_flight: 64,
            max_attempts: 10,
            max_deadline_ms: 24 * 3600 * 1000,
            max_shard_timeout_ms: 300_000,
        }
    }
}

/// A refused request: its code and the sentence for the tenant.
pub type Refused = (JobRefusal, String);

fn refuse(code: JobRefusal, reason: impl Into<String>) -> Refused {
    (code, reason.into())
}

/// A stored job.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct JobRecord {
    pub job_id: String,
    pub tenant: String,
    pub spec: JobSpec,
    pub state: JobState,
    pub created_ms: u64,
    pub deadline_ms: u64,
    /// Random, never shown to the tenant: part of each shard task's request id, so that the
    /// tenant cannot submit a task under a shard's id ahead of the service.
    pub salt: String,
    /// Rows of each part, once stored.
    pub parts: Vec<Option<u64>>,
    /// Bytes of each part, once stored.
    pub part_bytes: Vec<u64>,
    pub shards: Vec<Shard>,
    pub retried: u32,
    pub started_ms: Option<u64>,
    pub ended_ms: Option<u64>,
    pub reason: Option<String>,
    /// Why ingress last refused a shard for now ("later"); cleared by the next accepted.
    #[serde(default)]
    pub waiting: Option<String>,
}

/// One shard task's rows and where it stands.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Shard {
    pub part: u32,
    /// Its first row in its part.
    pub offset: u64,
    /// Its first row in the job.
    pub first_row: u64,
    pub rows: u64,
    /// Submissions accepted so far.
    pub attempts: u32,
    pub state: ShardState,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum ShardState {
    Queued,
    Running {
        task_id: String,
    },
    /// Its outputs are stored (the object is written before the record says so).
    Verified {
        task_id: String,
    },
}

/// What a shard's end did to its job.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Not this job's running task (a late result of a cancelled job, a duplicate).
    Ignored,
    Verified,
    Requeued,
    /// The shard used its last attempt: the job failed.
    JobFailed,
}

impl JobRecord {
    /// A new job in `Uploading`, its spec checked against `limits` (deadline and shard
    /// timeout cut to theirs).
    pub fn create(
        job_id: String,
        tenant: &str,
        mut spec: JobSpec,
        salt: String,
        now_ms: u64,
        limits: &Limits,
    ) -> Result<JobRecord, Refused> {
        if spec.model.is_empty() || spec.model.len() > 200 {
            return Err(refuse(JobRefusal::BadRequest, "model: 1 to 200 bytes"));
        }
        if spec.parts == 0 || spec.parts > limits.max_parts {
            return Err(refuse(JobRefusal::TooLarge, format!("parts: 1 to {}", limits.max_parts)));
        }
        if spec.shard_rows == 0 {
            return Err(refuse(JobRefusal::BadRequest, "shard_rows: at least 1"));
        }
        if spec.in_flight == 0 || spec.attempts == 0 || spec.shard_timeout_ms == 0 || spec.deadline_ms == 0 {
            return Err(refuse(
                JobRefusal::BadRequest,
                "in_flight, attempts, shard_timeout_ms, deadline_ms: at least 1",
            ));
        }
        spec.in_flight = spec.in_flight.min(limits.max_in_flight);
        spec.attempts = spec.attempts.min(limits.max_attempts);
        spec.shard_timeout_ms = spec.shard_timeout_ms.min(limits.max_shard_timeout_ms);
        spec.deadline_ms = spec.deadline_ms.min(limits.max_deadline_ms);
        let parts = spec.parts as usize;
        Ok(JobRecord {
            job_id,
            tenant: tenant.to_string(),
            deadline_ms: now_ms + spec.deadline_ms,
            spec,
            state: JobState::Uploading,
            created_ms: now_ms,
            salt,
            parts: vec![None; parts],
            part_bytes: vec![0; parts],
            shards: Vec::new(),
            retried: 0,
            started_ms: None,
            ended_ms: None,
            reason: None,
            waiting: None,
        })
    }

    /// Checks that part `part` of `rows` rows and `bytes` bytes may be stored (again: a
    /// retried put replaces the part), and counts it.
    pub fn put_part(&mut self, part: u32, rows: u64, bytes: u64, limits: &Limits) -> Result<(), Refused> {
        if self.state != JobState::Uploading {
            return Err(refuse(
                JobRefusal::WrongState,
                format!("the job is {}: parts are taken before start", self.state.as_str()),
            ));
        }
        if part as usize >= self.parts.len() {
            return Err(refuse(JobRefusal::BadRequest, format!("part {part}: the job has {} parts", self.parts.len())));
        }
        if rows == 0 {
            return Err(refuse(JobRefusal::BadRequest, format!("part {part} has no rows")));
        }
        let total: u64 = self.part_bytes.iter().sum::<u64>() - self.part_bytes[part as usize] + bytes;
        if total > limits.max_job_bytes {
            return Err(refuse(
                JobRefusal::TooLarge,
                format!("the job's parts would hold {total} bytes, over the limit of {}", limits.max_job_bytes),
            ));
        }
        self.parts[part as usize] = Some(rows);
        self.part_bytes[part as usize] = bytes;
        Ok(())
    }

    /// Cuts the stored parts into shards and starts the job.
    pub fn start(&mut self, now_ms: u64, limits: &Limits) -> Result<(), Refused> {
        if self.state != JobState::Uploading {
            return Err(refuse(JobRefusal::WrongState, format!("the job is {}", self.state.as_str())));
        }
        let missing: Vec<usize> = (0..self.parts.len()).filter(|&i| self.parts[i].is_none()).collect();
        if let Some(first) = missing.first() {
            return Err(refuse(
                JobRefusal::WrongState,
                format!("{} parts not stored yet (part {first} first)", missing.len()),
            ));
        }
        let mut shards = Vec::new();
        let mut first_row = 0;
        for (part, rows) in self.parts.iter().enumerate() {
            let rows = rows.expect("every part stored");
            let mut offset = 0;
            while offset < rows {
                let n = self.spec.shard_rows.min(rows - offset);
                shards.push(Shard {
                    part: part as u32,
                    offset,
                    first_row,
                    rows: n,
                    attempts: 0,
                    state: ShardState::Queued,
                });
                (offset, first_row) = (offset + n, first_row + n);
            }
        }
        if shards.len() > limits.max_shards as usize {
            return Err(refuse(
                JobRefusal::TooLarge,
                format!("{} shards, over the limit of {}: raise shard_rows", shards.len(), limits.max_shards),
            ));
        }
        self.shards = shards;
        self.state = JobState::Running;
        self.started_ms = Some(now_ms);
        Ok(())
    }

    /// Queued shards that may be submitted now, given the `submitting` ones whose
    /// submission is on its way: at most `in_flight` shards running or being submitted.
    pub fn to_submit(&self, submitting: &std::collections::HashSet<u32>) -> Vec<u32> {
        if self.state != JobState::Running {
            return Vec::new();
        }
        let running = self.shards.iter().filter(|s| matches!(s.state, ShardState::Running { .. })).count();
        let room = (self.spec.in_flight as usize).saturating_sub(running + submitting.len());
        (0..self.shards.len() as u32)
            .filter(|i| self.shards[*i as usize].state == ShardState::Queued && !submitting.contains(i))
            .take(room)
            .collect()
    }

    /// The request id of `shard`'s next submission: the same on a retried submission of
    /// the same attempt (after a restart), so ingress gives back the same task.
    pub fn request_id(&self, shard: u32) -> String {
        let attempt = self.shards[shard as usize].attempts + 1;
        format!("job-{}-{}-{shard}-{attempt}", self.job_id, self.salt)
    }

    /// `shard`'s submission was accepted as `task_id`.
    pub fn submitted(&mut self, shard: u32, task_id: String) {
        let s = &mut self.shards[shard as usize];
        if self.state == JobState::Running && s.state == ShardState::Queued {
            s.attempts += 1;
            s.state = ShardState::Running { task_id };
            self.waiting = None;
        }
    }

    /// Ingress refused a shard for now (`code`, `reason`); whether the record changed (a
    /// new code: the same refusal again, with other numbers, is not worth a write).
    pub fn wait(&mut self, code: &str, reason: &str) -> bool {
        let same = self.waiting.as_deref().is_some_and(|w| w.split(':').next() == Some(code));
        if !same {
            self.waiting = Some(format!("{code}: {reason}"));
        }
        !same
    }

    /// `shard`'s task `task_id` was verified and its outputs are stored.
    pub fn verified(&mut self, shard: u32, task_id: &str, now_ms: u64) -> Ended {
        if !self.runs(shard, task_id) {
            return Ended::Ignored;
        }
        self.shards[shard as usize].state = ShardState::Verified { task_id: task_id.to_string() };
        if self.shards.iter().all(|s| matches!(s.state, ShardState::Verified { .. })) {
            self.end(JobState::Done, None, now_ms);
        }
        Ended::Verified
    }

    /// `shard`'s task `task_id` ended unverified (`reason`): submitted again, or the job fails.
    pub fn failed(&mut self, shard: u32, task_id: &str, reason: &str, now_ms: u64) -> Ended {
        if !self.runs(shard, task_id) {
            return Ended::Ignored;
        }
        let s = &mut self.shards[shard as usize];
        if s.attempts >= self.spec.attempts {
            let why = format!("shard {shard} not verified after {} attempts: {reason}", s.attempts);
            self.end(JobState::Failed, Some(why), now_ms);
            return Ended::JobFailed;
        }
        s.state = ShardState::Queued;
        self.retried += 1;
        Ended::Requeued
    }

    /// Ingress refused `shard` for good.
    pub fn refused(&mut self, shard: u32, reason: &str, now_ms: u64) {
        if self.state == JobState::Running {
            self.end(JobState::Failed, Some(format!("shard {shard} refused: {reason}")), now_ms);
        }
    }

    pub fn cancel(&mut self, now_ms: u64) -> Result<(), Refused> {
        if self.state.is_final() {
            return Err(refuse(JobRefusal::WrongState, format!("the job is already {}", self.state.as_str())));
        }
        self.end(JobState::Cancelled, Some("cancelled by its tenant".into()), now_ms);
        Ok(())
    }

    /// Expires the job if its deadline has passed; whether it did.
    pub fn expire(&mut self, now_ms: u64) -> bool {
        if self.state.is_final() || now_ms < self.deadline_ms {
            return false;
        }
        let verified = self.verified_count();
        let why = format!("deadline passed with {verified} of {} shards verified", self.shards.len());
        self.end(JobState::Expired, Some(why), now_ms);
        true
    }

    fn end(&mut self, state: JobState, reason: Option<String>, now_ms: u64) {
        self.state = state;
        self.reason = reason;
        self.ended_ms = Some(now_ms);
    }

    fn runs(&self, shard: u32, task_id: &str) -> bool {
        self.state == JobState::Running
            && matches!(self.shards.get(shard as usize), Some(Shard { state: ShardState::Running { task_id: t }, .. }) if t == task_id)
    }

    /// Shards running now, with their tasks.
    pub fn running(&self) -> impl Iterator<Item = (u32, &str)> {
        self.shards.iter().enumerate().filter_map(|(i, s)| match &s.state {
            ShardState::Running { task_id } => Some((i as u32, task_id.as_str())),
            _ => None,
        })
    }

    /// Bytes of inputs stored (0 once it ends: its inputs are deleted then).
    pub fn input_bytes(&self) -> u64 {
        if self.state.is_final() { 0 } else { self.part_bytes.iter().sum() }
    }

    pub fn verified_count(&self) -> u32 {
        self.shards.iter().filter(|s| matches!(s.state, ShardState::Verified { .. })).count() as u32
    }

    /// KV key: `<tenant>.<job>` (both tokens), so a tenant's jobs share a prefix.
    pub fn key(&self) -> String {
        key(&self.tenant, &self.job_id)
    }

    /// How the tenant sees the job at `now_ms`.
    pub fn status(&self, now_ms: u64) -> JobStatus {
        let count = |f: fn(&ShardState) -> bool| self.shards.iter().filter(|s| f(&s.state)).count() as u32;
        let verified = self.verified_count();
        let prefix = self.shards.iter().take_while(|s| matches!(s.state, ShardState::Verified { .. })).count();
        let remaining = self.shards.len() as u64 - verified as u64;
        let eta_ms = match (self.state, self.started_ms) {
            (JobState::Running, Some(started)) if verified > 0 => {
                Some(now_ms.saturating_sub(started) * remaining / verified as u64)
            }
            _ => None,
        };
        JobStatus {
            job_id: self.job_id.clone(),
            model: self.spec.model.clone(),
            state: self.state,
            created_ms: self.created_ms,
            deadline_ms: self.deadline_ms,
            parts_stored: self.parts.iter().filter(|p| p.is_some()).count() as u32,
            parts: self.parts.len() as u32,
            rows: self.parts.iter().flatten().sum(),
            shards: self.shards.len() as u32,
            queued: count(|s| *s == ShardState::Queued),
            running: count(|s| matches!(s, ShardState::Running { .. })),
            verified,
            retried: self.retried,
            verified_prefix: prefix as u32,
            eta_ms,
            reason: self.reason.clone(),
            waiting: self.waiting.clone().filter(|_| self.state == JobState::Running),
        }
    }
}

/// KV key of `tenant`'s job `job_id`.
pub fn key(tenant: &str, job_id: &str) -> String {
    format!("{tenant}.{job_id}")
}

/// Object name of part `part` of a job's inputs.
pub fn part_object(tenant: &str, job_id: &str, part: u32) -> String {
    format!("{tenant}/{job_id}/in/{part}")
}

/// Object name of the verified outputs of a job's shard.
pub fn output_object(tenant: &str, job_id: &str, shard: u32) -> String {
    format!("{tenant}/{job_id}/out/{shard}")
}

/// Whether `job_id` can name a job (one subject token).
pub fn valid_id(job_id: &str) -> bool {
    subj::is_token(job_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn spec(parts: u32, shard_rows: u64) -> JobSpec {
        JobSpec {
            model: "mlp".into(),
            parts,
            shard_rows,
            in_flight: 2,
            attempts: 2,
            shard_timeout_ms: 1000,
            deadline_ms: 10_000,
        }
    }

    fn running(parts: &[u64], shard_rows: u64) -> JobRecord {
        let limits = Limits::default();
        let mut job =
            JobRecord::create("j1".into(), "acme", spec(parts.len() as u32, shard_rows), "s".into(), 0, &limits)
                .unwrap();
        for (i, rows) in parts.iter().enumerate() {
            job.put_part(i as u32, *rows, 100, &limits).unwrap();
        }
        job.start(0, &limits).unwrap();
        job
    }

    #[test]
    fn shards_never_span_parts_and_rows_follow_in_order() {
        let job = running(&[250, 30], 100);
        let cut: Vec<(u32, u64, u64, u64)> =
            job.shards.iter().map(|s| (s.part, s.offset, s.first_row, s.rows)).collect();
        assert_eq!(cut, [(0, 0, 0, 100), (0, 100, 100, 100), (0, 200, 200, 50), (1, 0, 250, 30)]);
        assert_eq!(job.status(0).rows, 280);
    }

    #[test]
    fn at_most_in_flight_shards_run_and_a_failed_one_is_retried_then_fails_the_job() {
        let mut job = running(&[400], 100);
        let mut submitting = HashSet::from([0]);
        assert_eq!(job.to_submit(&submitting), [1]);
        submitting.clear();
        assert_eq!(job.request_id(0), "job-j1-s-0-1");
        job.submitted(0, "t0".into());
        job.submitted(1, "t1".into());
        assert!(job.to_submit(&submitting).is_empty());
        assert_eq!(job.verified(1, "other", 1), Ended::Ignored);
        assert_eq!(job.verified(1, "t1", 1), Ended::Verified);
        assert_eq!(job.failed(0, "t0", "expired", 2), Ended::Requeued);
        assert_eq!(job.request_id(0), "job-j1-s-0-2", "a new attempt, a new task");
        assert_eq!(job.to_submit(&submitting), [0, 2]);
        job.submitted(0, "t0b".into());
        assert_eq!(job.failed(0, "t0b", "no consensus", 3), Ended::JobFailed);
        assert_eq!(job.state, JobState::Failed);
        assert!(job.reason.as_deref().unwrap().contains("not verified after 2 attempts: no consensus"));
        assert!(job.to_submit(&submitting).is_empty());
        assert_eq!(job.status(3).retried, 1);
    }

    #[test]
    fn every_shard_verified_is_done_and_the_prefix_says_what_reads_in_order() {
        let mut job = running(&[300], 100);
        for (shard, task) in [(0, "a"), (1, "b"), (2, "c")] {
            job.submitted(shard, task.into());
        }
        job.verified(2, "c", 10);
        assert_eq!(job.status(10).verified_prefix, 0);
        job.verified(0, "a", 20);
        let status = job.status(20);
        assert_eq!((status.verified_prefix, status.verified, status.running), (1, 2, 1));
        assert_eq!(status.eta_ms, Some(10), "20 ms for 2 shards: 10 ms for the last");
        job.verified(1, "b", 30);
        assert_eq!(job.state, JobState::Done);
        assert_eq!(job.status(30).verified_prefix, 3);
    }

    #[test]
    fn parts_are_checked_and_a_job_starts_only_whole() {
        let limits = Limits { max_job_bytes: 150, ..Limits::default() };
        let mut job = JobRecord::create("j".into(), "t", spec(2, 10), "s".into(), 0, &limits).unwrap();
        assert_eq!(job.put_part(2, 5, 10, &limits).unwrap_err().0, JobRefusal::BadRequest);
        job.put_part(0, 5, 100, &limits).unwrap();
        assert_eq!(job.start(0, &limits).unwrap_err().0, JobRefusal::WrongState);
        assert_eq!(job.put_part(1, 5, 60, &limits).unwrap_err().0, JobRefusal::TooLarge);
        job.put_part(0, 5, 90, &limits).unwrap();
        job.put_part(1, 5, 60, &limits).unwrap();
        job.start(0, &limits).unwrap();
        assert_eq!(job.put_part(0, 5, 10, &limits).unwrap_err().0, JobRefusal::WrongState);
        let tight = Limits { max_shards: 0, ..limits.clone() };
        let mut other = JobRecord::create("k".into(), "t", spec(1, 1), "s".into(), 0, &tight).unwrap();
        other.put_part(0, 3, 10, &tight).unwrap();
        assert_eq!(other.start(0, &tight).unwrap_err().0, JobRefusal::TooLarge);
    }

    #[test]
    fn a_refusal_for_now_is_shown_until_a_shard_is_accepted() {
        let mut job = running(&[200], 100);
        assert!(job.wait("storage_quota", "full: 10 bytes"));
        assert!(!job.wait("storage_quota", "full: 12 bytes"), "the same code again is no change");
        assert_eq!(job.status(0).waiting.as_deref(), Some("storage_quota: full: 10 bytes"));
        assert!(job.wait("rate_limited", "slow down"));
        job.submitted(0, "t".into());
        assert_eq!(job.status(0).waiting, None);
    }

    #[test]
    fn deadline_and_cancel_end_the_job_and_later_results_are_ignored() {
        let mut job = running(&[200], 100);
        job.submitted(0, "a".into());
        assert!(!job.expire(9_999));
        assert!(job.expire(10_000));
        assert_eq!(job.state, JobState::Expired);
        assert_eq!(job.verified(0, "a", 10_001), Ended::Ignored);
        assert_eq!(job.cancel(10_002).unwrap_err().0, JobRefusal::WrongState);
        let mut other = running(&[100], 100);
        other.cancel(5).unwrap();
        assert_eq!((other.state, other.ended_ms), (JobState::Cancelled, Some(5)));
    }

    #[test]
    fn limits_cut_what_the_tenant_asks() {
        let limits = Limits { max_in_flight: 4, max_deadline_ms: 1000, ..Limits::default() };
        let asked = JobSpec { in_flight: 100, deadline_ms: 1 << 40, ..spec(1, 1) };
        let job = JobRecord::create("j".into(), "t", asked, "s".into(), 7, &limits).unwrap();
        assert_eq!((job.spec.in_flight, job.deadline_ms), (4, 1007));
        let none = JobSpec { parts: 0, ..spec(1, 1) };
        assert_eq!(
            JobRecord::create("j".into(), "t", none, "s".into(), 0, &limits).unwrap_err().0,
            JobRefusal::TooLarge
        );
    }
}
