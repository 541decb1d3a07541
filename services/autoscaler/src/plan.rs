//! Sizing the worker fleet from demand. Plain structs, no I/O.
//!
//! Demand is measured in busy inference lanes: for each model, tasks arriving per second ×
//! replicas per task (k) × seconds of inference per task. A fleet of workers with `lanes`
//! each, kept at `target_utilisation`, needs demand ÷ (lanes × target) workers. The count
//! goes up as soon as more are needed and down one at a time, and only after fewer were
//! needed for a whole `scale_down_after` (hysteresis: a dip in load does not shed workers
//! that the next burst needs).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use sundara_common::capacity::SliceState;
use sundara_schemas::{ModelRef, subjects};

/// Tasks arriving per model, from the TASKS stream's message count per subject (so no
/// payload is read): the growth of each count over a sliding window.
pub struct Arrivals {
    window: Duration,
    /// Last count seen per subject.
    seen: HashMap<String, usize>,
    /// Arrivals counted so far per model (never decreasing).
    total: HashMap<String, u64>,
    /// (when, totals then), oldest first, spanning the window.
    history: VecDeque<(Instant, HashMap<String, u64>)>,
    started: bool,
}

/// The model of a task subject `sundara.task.<priority>.<model>`.
fn model_of(subject: &str) -> &str {
    subjects::task_model(subject).unwrap_or(subject)
}

impl Arrivals {
    pub fn new(window: Duration) -> Arrivals {
        Arrivals { window, seen: HashMap::new(), total: HashMap::new(), history: VecDeque::new(), started: false }
    }

    /// Takes the current message count of each task subject. The first call only sets the
    /// baseline (tasks stored before the autoscaler started are not arrivals now). A count
    /// that shrinks (the stream's retention removed tasks) counts nothing.
    pub fn observe(&mut self, now: Instant, counts: &[(String, usize)]) {
        for (subject, count) in counts {
            let before = self.seen.insert(subject.clone(), *count);
            let new = match before {
                Some(b) => count.saturating_sub(b),
                None if self.started => *count,
                None => 0,
            };
            *self.total.entry(model_of(subject).to_string()).or_default() += new as u64;
        }
        self.started = true;
        self.history.push_back((now, self.total.clone()));
        // Keep one sample older than the window as its baseline.
        while self.history.len() > 2 && now.duration_since(self.history[1].0) >= self.window {
            self.history.pop_front();
        }
    }

    /// Tasks per second per model over the window (empty before two observations).
    pub fn rates(&self) -> HashMap<String, f64> {
        let (Some((first_at, first)), Some((last_at, last))) = (self.history.front(), self.history.back()) else {
            return HashMap::new();
        };
        let secs = last_at.duration_since(*first_at).as_secs_f64();
        if secs <= 0.0 {
            return HashMap::new();
        }
        last.iter()
            .map(|(m, n)| (m.clone(), n.saturating_sub(first.get(m).copied().unwrap_or(0)) as f64 / secs))
            .collect()
    }
}

/// What one model asks of the fleet.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelLoad {
    pub tasks_per_s: f64,
    /// Replicas per task (the model's redundancy).
    pub k: u8,
    /// Inference time per task, in seconds.
    pub service_s: f64,
}

/// Busy lanes the load keeps busy: Σ arrival rate × k × service time.
pub fn demand_lanes<'a>(loads: impl IntoIterator<Item = &'a ModelLoad>) -> f64 {
    loads.into_iter().map(|l| l.tasks_per_s * f64::from(l.k.max(1)) * l.service_s).sum()
}

/// Copies of a model to keep loaded: enough lanes for its demand at the target
/// utilisation (a copy serves `lanes_per_copy` lanes), at least one, at most `max`.
pub fn copies_needed(load: &ModelLoad, lanes_per_copy: usize, target_utilisation: f64, max: usize) -> usize {
    let per_copy = lanes_per_copy.max(1) as f64 * target_utilisation.clamp(0.05, 1.0);
    let n = (demand_lanes([load]) / per_copy).ceil() as usize;
    n.clamp(1, max.max(1))
}

/// Whether a slice has the model (any version) loaded.
pub fn holds(slice: &SliceState, model: &str) -> bool {
    slice.loaded.iter().any(|(key, _)| ModelRef::spec_name(key) == model)
}

/// The slice for one more copy of a model: alive, without it, with room for `footprint`;
/// of those the one left with the least room after it (best fit: bin-packing by memory
/// keeps the large free spaces for large models).
pub fn place_copy<'a>(slices: &'a [SliceState], model: &str, footprint: u64) -> Option<&'a SliceState> {
    slices
        .iter()
        .filter(|s| s.state == "alive" && !holds(s, model) && s.memory_free >= footprint)
        .min_by_key(|s| (s.memory_free - footprint, s.id.clone()))
}

#[derive(Clone, Debug)]
pub struct ScalePolicy {
    pub min_workers: usize,
    pub max_workers: usize,
    /// Inference lanes of one worker the driver starts.
    pub lanes_per_worker: usize,
    /// Share of the lanes the fleet should keep busy (headroom for bursts and queues).
    pub target_utilisation: f64,
    /// How long fewer workers must be needed before one is removed.
    pub scale_down_after: Duration,
}

impl Default for ScalePolicy {
    fn default() -> ScalePolicy {
        ScalePolicy {
            min_workers: 1,
            max_workers: 8,
            lanes_per_worker: 1,
            target_utilisation: 0.7,
            scale_down_after: Duration::from_secs(60),
        }
    }
}

/// Decides the worker count, with hysteresis on the way down.
pub struct Planner {
    pub policy: ScalePolicy,
    /// Since when fewer workers than are running have been needed.
    lower_since: Option<Instant>,
}

impl Planner {
    pub fn new(policy: ScalePolicy) -> Planner {
        Planner { policy, lower_since: None }
    }

    /// Workers needed for `demand` busy lanes, within the policy's bounds.
    pub fn needed(&self, demand: f64) -> usize {
        let p = &self.policy;
        let per_worker = p.lanes_per_worker.max(1) as f64 * p.target_utilisation.clamp(0.05, 1.0);
        let n = (demand.max(0.0) / per_worker).ceil() as usize;
        n.clamp(p.min_workers, p.max_workers.max(p.min_workers))
    }

    /// The count to run now, with `running` workers running: up at once to what is
    /// needed; down by one once fewer have been needed for `scale_down_after`.
    pub fn target(&mut self, now: Instant, demand: f64, running: usize) -> usize {
        let needed = self.needed(demand);
        if needed >= running {
            self.lower_since = None;
            return needed;
        }
        let since = *self.lower_since.get_or_insert(now);
        if now.duration_since(since) >= self.policy.scale_down_after {
            self.lower_since = Some(now); // the next step waits a full period again
            return running - 1;
        }
        running
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(pairs: &[(&str, usize)]) -> Vec<(String, usize)> {
        pairs.iter().map(|(s, n)| (s.to_string(), *n)).collect()
    }

    #[test]
    fn arrivals_are_the_growth_of_the_counts_over_the_window() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut a = Arrivals::new(Duration::from_secs(10));
        // Tasks stored before the start are not arrivals.
        a.observe(t0, &counts(&[("sundara.task.normal.mlp", 500)]));
        a.observe(t0 + s, &counts(&[("sundara.task.normal.mlp", 520), ("sundara.task.high.mlp", 10)]));
        a.observe(t0 + 2 * s, &counts(&[("sundara.task.normal.mlp", 540), ("sundara.task.high.mlp", 10)]));
        let rates = a.rates();
        assert_eq!(rates["mlp"], (40.0 + 10.0) / 2.0, "a subject that appears later counts from 0");
        // Retention shrinking a count counts nothing; old samples leave the window.
        for i in 3..30 {
            a.observe(t0 + i * s, &counts(&[("sundara.task.normal.mlp", 100), ("sundara.task.high.mlp", 10)]));
        }
        assert_eq!(a.rates()["mlp"], 0.0);
        assert!(a.history.len() <= 12);
    }

    #[test]
    fn demand_is_rate_times_replicas_times_service() {
        let loads = [
            ModelLoad { tasks_per_s: 100.0, k: 2, service_s: 0.005 },
            ModelLoad { tasks_per_s: 10.0, k: 1, service_s: 0.1 },
        ];
        assert!((demand_lanes(&loads) - 2.0).abs() < 1e-9);
    }

    #[test]
    fn copies_follow_demand_and_go_where_they_fit_best() {
        let load = ModelLoad { tasks_per_s: 100.0, k: 2, service_s: 0.005 };
        assert_eq!(copies_needed(&load, 1, 0.5, 8), 2);
        assert_eq!(copies_needed(&load, 1, 0.1, 8), 8, "at most max");
        assert_eq!(copies_needed(&ModelLoad { tasks_per_s: 0.0, ..load }, 1, 0.5, 8), 1, "at least one");
        let slice = |id: &str, free_mib: u64, loaded: &[&str], state: &str| SliceState {
            id: id.into(),
            state: state.into(),
            memory_free: free_mib << 20,
            loaded: loaded.iter().map(|k| (k.to_string(), 1)).collect(),
            ..Default::default()
        };
        let slices = [
            slice("roomy", 4096, &[], "alive"),
            slice("snug", 300, &[], "alive"),
            slice("tiny", 100, &[], "alive"),
            slice("has-it", 4096, &["m@1"], "alive"),
            slice("dead", 250, &[], "dead"),
        ];
        assert_eq!(place_copy(&slices, "m", 200 << 20).unwrap().id, "snug", "the tightest fit");
        assert_eq!(place_copy(&slices, "m", 1 << 30).unwrap().id, "roomy");
        assert!(place_copy(&slices, "m", 8 << 30).is_none(), "nowhere big enough");
        assert_eq!(place_copy(&slices, "other", 50 << 20).unwrap().id, "tiny");
    }

    #[test]
    fn scales_up_at_once_and_down_one_step_per_quiet_period() {
        let policy = ScalePolicy {
            min_workers: 1,
            max_workers: 5,
            lanes_per_worker: 2,
            target_utilisation: 0.5,
            scale_down_after: Duration::from_secs(60),
        };
        let mut p = Planner::new(policy);
        let t0 = Instant::now();
        assert_eq!(p.needed(0.0), 1, "never below the minimum");
        assert_eq!(p.needed(100.0), 5, "never above the maximum");
        assert_eq!(p.target(t0, 3.5, 1), 4, "3.5 lanes at 1 busy lane per worker: 4, at once");
        // Load drops: nothing changes before the quiet period.
        let s = Duration::from_secs(1);
        assert_eq!(p.target(t0 + s, 0.5, 4), 4);
        assert_eq!(p.target(t0 + 59 * s, 0.5, 4), 4);
        assert_eq!(p.target(t0 + 61 * s, 0.5, 4), 3, "one step down after 60 s");
        assert_eq!(p.target(t0 + 62 * s, 0.5, 3), 3, "the next step waits a full period");
        // A burst in between resets the clock.
        assert_eq!(p.target(t0 + 100 * s, 2.5, 3), 3);
        assert_eq!(p.target(t0 + 130 * s, 0.5, 3), 3);
        assert_eq!(p.target(t0 + 189 * s, 0.5, 3), 3);
        assert_eq!(p.target(t0 + 191 * s, 0.5, 3), 2);
    }
}
