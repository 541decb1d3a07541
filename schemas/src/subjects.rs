//! NATS subjects, stream, bucket and header names.
//!
//! Every variable token (model, worker, tenant, task id) must pass [`is_token`], so that a
//! name can never inject a wildcard or an extra subject level.

/// Every tenant's submissions: what ingress serves.
pub const SUBMIT_ALL: &str = "sundara.submit.*";
pub const TASKS_STREAM: &str = "TASKS";
pub const WORK_STREAM: &str = "WORK";
pub const OUTCOMES_STREAM: &str = "OUTCOMES";
pub const RESULTS_STREAM: &str = "RESULTS";
pub const VERDICTS_STREAM: &str = "VERDICTS";
pub const REWARDS_STREAM: &str = "REWARDS";
pub const DEAD_STREAM: &str = "DEAD";
pub const MODELS_BUCKET: &str = "models";
pub const MODEL_BLOBS: &str = "model-blobs";
pub const REWARDS_BUCKET: &str = "rewards";
/// The validator side's own KV bucket (no miner or tenant reads it).
pub const VALIDATOR_BUCKET: &str = "validator";
/// Key of [`VALIDATOR_BUCKET`] that holds the key id of the validator secret the stack
/// signs tickets with: the first scheduler or verifier to start writes it, and any later
/// one with another secret refuses to start.
pub const SECRET_KEY_ID: &str = "secret.key_id";
/// Every task, whatever its priority and model: the TASKS stream's subjects.
pub const TASK_ALL: &str = "sundara.task.>";
/// Every assignment, whatever its model and worker: the WORK stream's subjects.
pub const WORK_ALL: &str = "sundara.work.>";
/// Every outcome, whatever its task and worker: the OUTCOMES stream's subjects.
pub const OUTCOME_ALL: &str = "sundara.outcome.>";
/// Every result, whatever its tenant and task: the RESULTS stream's subjects.
pub const RESULT_ALL: &str = "sundara.result.>";
/// Every verdict: the VERDICTS stream's subjects.
pub const VERDICT_ALL: &str = "sundara.verdict.>";
/// Every reward message (per task and per epoch): the REWARDS stream's subjects.
pub const REWARD_ALL: &str = "sundara.reward.>";
/// Every dead task: the DEAD stream's subjects.
pub const DEAD_ALL: &str = "sundara.dead.>";
/// Every dead task's copy ([`dead_task`]), also in stream DEAD.
pub const DEAD_TASK_ALL: &str = "sundara.deadtask.>";
/// Published by the autoscaler when a worker is declared dead.
pub const FLEET_DEAD: &str = "sundara.fleet.dead";
/// Epoch weights.
pub const REWARD_EPOCH: &str = "sundara.reward.epoch";
/// Any core-NATS message here closes the rewarder's epoch now; a request gets the encoded
/// epoch weights back. Deliberately outside `sundara.reward.>`: the REWARDS stream captures
/// that space and would store the request and answer it with its own publish ack first.
pub const REWARDER_CLOSE: &str = "sundara.rewarder.close";

/// W3C trace context header carried on every message of a task.
pub const TRACEPARENT: &str = "traceparent";
/// Header of a WORK message that carries several assignments ([`crate::Assignments`]):
/// their count.
pub const ASSIGNMENTS: &str = "Sundara-Assignments";

/// Where `tenant` submits. Its credentials allow it to publish here and nowhere else under
/// `sundara.submit`, so ingress takes the tenant from the subject.
pub fn submit(tenant: &str) -> String {
    format!("sundara.submit.{tenant}")
}
/// The tenant token of a submit subject.
pub fn submit_tenant(subject: &str) -> Option<&str> {
    subject.strip_prefix("sundara.submit.").filter(|t| is_token(t))
}
/// Where `worker` reports its capacity and heartbeats (see [`crate::FleetRequest`]).
pub fn report(worker: &str) -> String {
    format!("sundara.report.{worker}")
}
/// Every worker's reports: what the fleet gateway serves.
pub const REPORT_ALL: &str = "sundara.report.*";
/// The worker token of a report subject.
pub fn report_worker(subject: &str) -> Option<&str> {
    subject.strip_prefix("sundara.report.").filter(|t| is_token(t))
}
pub fn task(priority: crate::Priority, model: &str) -> String {
    format!("sundara.task.{}.{model}", priority.as_str())
}
/// The model token of a task subject (`sundara.task.<priority>.<model>`).
pub fn task_model(subject: &str) -> Option<&str> {
    let (_priority, model) = subject.strip_prefix("sundara.task.")?.split_once('.')?;
    is_token(model).then_some(model)
}
/// Tasks of one priority class, whatever the model.
pub fn tasks_of(priority: crate::Priority) -> String {
    format!("sundara.task.{}.>", priority.as_str())
}
pub fn work(model: &str, worker: &str) -> String {
    format!("sundara.work.{model}.{worker}")
}
/// All assignments of one worker, whatever the model.
pub fn work_of(worker: &str) -> String {
    format!("sundara.work.*.{worker}")
}
/// Commands to one worker (core NATS request/reply).
pub fn control(worker: &str) -> String {
    format!("sundara.control.{worker}")
}
pub fn outcome(task: &str, worker: &str) -> String {
    format!("sundara.outcome.{task}.{worker}")
}
/// The worker token of an outcome subject (task ids and worker ids hold no dots).
pub fn outcome_worker(subject: &str) -> Option<&str> {
    let mut parts = subject.strip_prefix("sundara.outcome.")?.split('.');
    let (_task, worker) = (parts.next()?, parts.next()?);
    (parts.next().is_none() && is_token(worker)).then_some(worker)
}
pub fn result(tenant: &str, task: &str) -> String {
    format!("sundara.result.{tenant}.{task}")
}
/// The tenant and task of a result subject.
pub fn result_parts(subject: &str) -> Option<(&str, &str)> {
    let (tenant, task) = subject.strip_prefix("sundara.result.")?.split_once('.')?;
    (is_token(tenant) && is_token(task)).then_some((tenant, task))
}
pub fn results_of(tenant: &str) -> String {
    format!("sundara.result.{tenant}.>")
}
pub fn verdict(task: &str) -> String {
    format!("sundara.verdict.{task}")
}
pub fn reward_task(task: &str) -> String {
    format!("sundara.reward.task.{task}")
}

/// The reward traces of one rewarder flush, named by the first trace's verdict sequence
/// ([`crate::RewardTraces`]; a task's own subject, [`reward_task`], is what rewarders
/// before 2026-12 wrote, one message per task).
pub fn reward_traces(first_verdict_seq: u64) -> String {
    format!("sundara.reward.traces.{first_verdict_seq}")
}

/// Whether a REWARDS subject holds a flush's traces ([`reward_traces`]).
pub fn is_reward_traces(subject: &str) -> bool {
    subject.starts_with("sundara.reward.traces.")
}

/// Whether a REWARDS subject holds one task's trace ([`reward_task`]).
pub fn is_reward_task(subject: &str) -> bool {
    subject.starts_with("sundara.reward.task.")
}
pub fn dead(task: &str) -> String {
    format!("sundara.dead.{task}")
}
/// A dead task's own message, copied from TASKS when it is dead-lettered (stream DEAD), so
/// that it can be resubmitted after TASKS has let it go.
pub fn dead_task(task: &str) -> String {
    format!("sundara.deadtask.{task}")
}

/// Every tenant's job requests: what the jobs service serves.
pub const JOBS_ALL: &str = "sundara.jobs.*.*";
/// The jobs service's records (validator side only; tenants reach them through requests).
pub const JOBS_BUCKET: &str = "jobs";
/// Job inputs and verified shard outputs, per tenant and job (validator side only).
pub const JOB_DATA: &str = "job-data";

/// Where `tenant` asks `op` of its jobs (`create`, `put`, `start`, `show`, `list`,
/// `cancel`, `fetch`). Its credentials allow `sundara.jobs.<tenant>.*` and nothing else of
/// the family, so the jobs service takes the tenant from the subject.
pub fn jobs(tenant: &str, op: &str) -> String {
    format!("sundara.jobs.{tenant}.{op}")
}
/// The tenant token of a job request's subject.
pub fn jobs_tenant(subject: &str) -> Option<&str> {
    let (tenant, _op) = subject.strip_prefix("sundara.jobs.")?.split_once('.')?;
    is_token(tenant).then_some(tenant)
}
/// Where the jobs service tells `tenant` that `job` moved (a core NATS wake-up, the
/// [`crate::JobStatus`] after the change; the status itself is always asked with `show`).
pub fn job_events(tenant: &str, job: &str) -> String {
    format!("sundara.jobevent.{tenant}.{job}")
}
/// Every tenant's job events.
pub const JOB_EVENTS_ALL: &str = "sundara.jobevent.>";
/// Every job event of one tenant.
pub fn job_events_of(tenant: &str) -> String {
    format!("sundara.jobevent.{tenant}.>")
}

/// A name usable as one subject token: 1 to 64 of `[A-Za-z0-9_-]`.
pub fn is_token(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_cannot_inject_subject_levels() {
        assert!(is_token("mlp"));
        assert!(is_token("worker-1_a"));
        for bad in ["", "a.b", "*", ">", "a b", &"x".repeat(65)] {
            assert!(!is_token(bad), "{bad:?}");
        }
    }

    #[test]
    fn outcome_subjects_name_their_worker() {
        assert_eq!(outcome_worker(&outcome("0192f0c4", "miner-1")), Some("miner-1"));
        assert_eq!(outcome_worker("sundara.outcome.t"), None);
        assert_eq!(outcome_worker("sundara.outcome.t.w.extra"), None);
        assert_eq!(outcome_worker("sundara.result.t.w"), None);
    }

    /// Each `*_ALL` filter is its family's subjects with the variable tokens replaced by `>`,
    /// and takes in every subject the family's functions build.
    #[test]
    fn stream_filters_cover_their_subjects() {
        let covers = |filter: &str, subject: &str| {
            let prefix = filter.strip_suffix('>').expect("a `>` filter");
            subject.starts_with(prefix) && subject.len() > prefix.len()
        };
        let families = [
            (TASK_ALL, task(crate::Priority::High, "mlp")),
            (TASK_ALL, tasks_of(crate::Priority::Normal)),
            (WORK_ALL, work("mlp", "m1")),
            (WORK_ALL, work_of("m1")),
            (OUTCOME_ALL, outcome("t1", "m1")),
            (RESULT_ALL, result("acme", "t1")),
            (RESULT_ALL, results_of("acme")),
            (VERDICT_ALL, verdict("t1")),
            (REWARD_ALL, reward_task("t1")),
            (REWARD_ALL, reward_traces(7)),
            (REWARD_ALL, REWARD_EPOCH.to_string()),
            (DEAD_ALL, dead("t1")),
        ];
        for (filter, subject) in families {
            assert!(covers(filter, &subject), "{filter} misses {subject}");
        }
        assert_eq!(
            [TASK_ALL, WORK_ALL, OUTCOME_ALL, RESULT_ALL, VERDICT_ALL, REWARD_ALL, DEAD_ALL],
            [
                "sundara.task.>",
                "sundara.work.>",
                "sundara.outcome.>",
                "sundara.result.>",
                "sundara.verdict.>",
                "sundara.reward.>",
                "sundara.dead.>"
            ]
        );
        assert!(!covers(OUTCOME_ALL, &result("acme", "t1")));
    }

    #[test]
    fn identities_come_from_the_subject_token() {
        assert_eq!(submit_tenant(&submit("acme")), Some("acme"));
        assert_eq!(submit_tenant("sundara.submit.a.b"), None);
        assert_eq!(submit_tenant("sundara.submit."), None);
        assert_eq!(report_worker(&report("m-1")), Some("m-1"));
        assert_eq!(report_worker("sundara.report.m.x"), None);
        assert_eq!(result_parts(&result("acme", "t1")), Some(("acme", "t1")));
        assert_eq!(result_parts("sundara.result.acme.t1.x"), None);
        assert_eq!(task_model(&task(crate::Priority::Low, "mlp")), Some("mlp"));
        assert_eq!(task_model("sundara.task.low"), None);
        assert_eq!(task_model("sundara.work.low.mlp"), None);
    }
}
