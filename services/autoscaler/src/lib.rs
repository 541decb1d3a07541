//! Autoscaler: fleet health, and (when given a driver) the size of the worker fleet.
//!
//! Health: a worker whose heartbeat lapses is declared dead: the scheduler stops choosing
//! its slices, its in-flight assignments fall due at once (the scheduler reassigns them),
//! and its queued assignments are purged from WORK. Its consumer stays, so a worker that
//! was only paused resumes when its heartbeat returns.
//!
//! Scaling: every `interval` the demand in busy lanes is measured (tasks arriving per
//! model × k × measured service time, see [`plan`]), the driver's workers that Redis holds
//! as dead or quarantined are replaced, models whose demand needs more loaded copies get
//! one more (preloaded on the slice where it fits best), and the pool is sized to the
//! demand (up at once, down with hysteresis).

pub mod driver;
pub mod plan;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use sundara_common::{Capacity, Endpoints, Error as CommonError, Registry, Shutdown, js_err, nats};
use sundara_schemas::{
    Control, ControlReply, ControlRequest, ModelRef, WIRE_VERSION, decode, encode, subjects as subj,
};

use driver::{ComposeDriver, Driver, DriverError, LocalDriver, NomadDriver};
use plan::{Arrivals, ModelLoad, Planner, ScalePolicy};

/// How the worker pool is changed (`--driver`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DriverKind {
    /// Worker processes of this binary, on this machine.
    Local,
    /// The allocations of a Nomad job group.
    Nomad,
    /// The containers of a docker compose service.
    Compose,
}

/// `sundara autoscaler`'s flags: what an operator sets; [`Config::from_args`] adds the rest.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// How the worker pool is changed. Without it the autoscaler watches health only.
    #[arg(long, value_enum)]
    pub driver: Option<DriverKind>,
    /// Fewest workers the pool keeps.
    #[arg(long, default_value_t = ScalePolicy::default().min_workers)]
    pub min_workers: usize,
    /// Most workers the pool runs.
    #[arg(long, default_value_t = ScalePolicy::default().max_workers)]
    pub max_workers: usize,
    /// Inference threads of each worker the pool runs (its lanes).
    #[arg(long, default_value_t = ScalePolicy::default().lanes_per_worker)]
    pub worker_threads: usize,
    /// Share of the pool's lanes to keep busy, in [0.05, 1].
    #[arg(long, default_value_t = ScalePolicy::default().target_utilisation)]
    pub target_utilisation: f64,
    /// Seconds fewer workers must be needed before one is removed.
    #[arg(long, default_value_t = ScalePolicy::default().scale_down_after.as_secs())]
    pub scale_down_after_s: u64,
    /// Worker ids of the pool start with this (local: `<prefix>-<n>`).
    #[arg(long, default_value = "pool")]
    pub pool_prefix: String,
    /// Nomad HTTP API, `host:port` (--driver nomad).
    #[arg(long, default_value = "127.0.0.1:4646")]
    pub nomad_addr: String,
    /// The Nomad job that runs the workers (--driver nomad).
    #[arg(long, default_value = "sundara-workers")]
    pub nomad_job: String,
    /// The task group of that job whose count is the pool's size (--driver nomad).
    #[arg(long, default_value = "worker")]
    pub nomad_group: String,
    /// Nomad ACL token (--driver nomad).
    #[arg(long, env = "NOMAD_TOKEN", hide_env_values = true)]
    pub nomad_token: Option<String>,
    /// The compose file that defines the worker service (--driver compose).
    #[arg(long, default_value = "infra/compose.yaml")]
    pub compose_file: PathBuf,
    /// The compose service that runs the workers (--driver compose).
    #[arg(long, default_value = "worker")]
    pub compose_service: String,
}

impl Args {
    /// The pool's sizing, or `None` without `--driver`. `binary` is what the local driver
    /// runs (`<binary> worker …`, told `nats`' URL and TLS files).
    pub fn scaling(
        self,
        binary: impl FnOnce() -> Result<PathBuf, String>,
        nats: &nats::NatsEndpoint,
    ) -> Result<Option<ScalingConfig>, String> {
        let prefix = self.pool_prefix.clone();
        let driver = match self.driver {
            None => return Ok(None),
            Some(DriverKind::Local) => DriverConfig::Local {
                binary: binary()?,
                args: vec!["--threads".into(), self.worker_threads.to_string()],
                env: std::iter::once(("SUNDARA_NATS_URL".into(), nats.url.clone()))
                    .chain(nats.tls.iter().flat_map(|t| t.env()))
                    .collect(),
                prefix,
            },
            Some(DriverKind::Nomad) => DriverConfig::Nomad {
                addr: self.nomad_addr,
                job: self.nomad_job,
                group: self.nomad_group,
                token: self.nomad_token,
                prefix,
            },
            Some(DriverKind::Compose) => {
                DriverConfig::Compose { file: self.compose_file, service: self.compose_service, prefix }
            }
        };
        if self.min_workers > self.max_workers || !(0.05..=1.0).contains(&self.target_utilisation) {
            return Err("need --min-workers ≤ --max-workers and --target-utilisation in [0.05, 1]".into());
        }
        let mut scaling = ScalingConfig::new(driver);
        scaling.policy = ScalePolicy {
            min_workers: self.min_workers,
            max_workers: self.max_workers,
            lanes_per_worker: self.worker_threads.max(1),
            target_utilisation: self.target_utilisation,
            scale_down_after: Duration::from_secs(self.scale_down_after_s),
        };
        Ok(Some(scaling))
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub endpoints: Endpoints,
    /// How often heartbeats are checked.
    pub check_interval: Duration,
    /// How often the fleet and queue gauges are read (a Redis read per worker).
    pub gauge_interval: Duration,
    pub retention: nats::Retention,
    /// Sizing of the worker fleet; `None` watches health only.
    pub scaling: Option<ScalingConfig>,
}

impl Config {
    /// The config of `sundara autoscaler` with these flags; `binary` as for [`Args::scaling`].
    pub fn from_args(
        args: Args,
        endpoints: Endpoints,
        binary: impl FnOnce() -> Result<PathBuf, String>,
    ) -> Result<Config, String> {
        let scaling = args.scaling(binary, &endpoints.nats)?;
        let mut config = Config::new(endpoints);
        config.scaling = scaling;
        Ok(config)
    }

    /// The defaults: health only (no `--driver`).
    pub fn new(endpoints: Endpoints) -> Config {
        Config {
            endpoints,
            check_interval: Duration::from_millis(250),
            gauge_interval: Duration::from_secs(5),
            retention: nats::Retention::default(),
            scaling: None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct ScalingConfig {
    pub policy: ScalePolicy,
    pub driver: DriverConfig,
    /// How often demand is measured and the fleet adjusted.
    pub interval: Duration,
    /// Arrival rates are averaged over this window.
    pub window: Duration,
    /// Most copies of one model the autoscaler keeps loaded ahead of demand.
    pub max_model_copies: usize,
}

impl ScalingConfig {
    pub fn new(driver: DriverConfig) -> ScalingConfig {
        ScalingConfig {
            policy: ScalePolicy::default(),
            driver,
            interval: Duration::from_secs(5),
            window: Duration::from_secs(15),
            max_model_copies: 8,
        }
    }
}

/// Which driver changes the fleet, and how to reach it.
#[derive(Clone, Debug)]
pub enum DriverConfig {
    /// Worker processes of `binary` (`<binary> worker --id <prefix>-<n> <args>`).
    Local { binary: PathBuf, args: Vec<String>, env: Vec<(String, String)>, prefix: String },
    /// A Nomad job group whose allocations run `worker --id <prefix><alloc id>`.
    Nomad { addr: String, job: String, group: String, token: Option<String>, prefix: String },
    /// A docker compose service whose containers run `worker --id <prefix><hostname>`.
    Compose { file: PathBuf, service: String, prefix: String },
}

impl DriverConfig {
    fn build(&self) -> (Driver, String) {
        match self.clone() {
            DriverConfig::Local { binary, args, env, prefix } => {
                let mut d = LocalDriver::new(binary, &prefix);
                d.args = args;
                d.env = env;
                (Driver::Local(d), format!("{prefix}-"))
            }
            DriverConfig::Nomad { addr, job, group, token, prefix } => {
                let mut d = NomadDriver::new(&addr, &job, &group);
                d.token = token;
                d.prefix = prefix.clone();
                (Driver::Nomad(d), prefix)
            }
            DriverConfig::Compose { file, service, prefix } => {
                let mut d = ComposeDriver::new(file, &service);
                d.prefix = prefix.clone();
                (Driver::Compose(d), prefix)
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AutoscalerError {
    #[error(transparent)]
    Common(#[from] CommonError),
    #[error(transparent)]
    Driver(#[from] DriverError),
    /// The fleet gateway's task panicked or was cancelled.
    #[error("fleet gateway: {0}")]
    Gateway(#[from] tokio::task::JoinError),
}

/// Workers to declare dead: announced alive, heartbeat gone. Pure.
pub fn lapsed<'a>(workers: &'a [String], health: &[(bool, Option<String>)]) -> Vec<&'a str> {
    workers
        .iter()
        .zip(health)
        .filter(|(_, (heartbeat, state))| !heartbeat && state.as_deref() != Some("dead"))
        .map(|(w, _)| w.as_str())
        .collect()
}

/// The fleet as the gauges show it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FleetGauges {
    /// Heartbeating and not quarantined.
    pub alive: u64,
    /// Quarantined, alive or not.
    pub quarantined: u64,
    /// No heartbeat, or declared dead.
    pub dead: u64,
    /// Slots of the serving (`alive`) slices of alive workers, and those in use.
    pub slots: u64,
    pub slots_in_use: u64,
}

impl FleetGauges {
    /// Counts workers by state; `slices` are those of the alive workers. Pure.
    pub fn count(
        workers: &[String],
        health: &[(bool, Option<String>)],
        quarantined: &std::collections::BTreeMap<String, String>,
        slices: &[sundara_common::capacity::SliceState],
    ) -> FleetGauges {
        let mut g = FleetGauges::default();
        for (w, (heartbeat, state)) in workers.iter().zip(health) {
            if quarantined.contains_key(w) {
                g.quarantined += 1;
            } else if *heartbeat && state.as_deref() != Some("dead") {
                g.alive += 1;
            } else {
                g.dead += 1;
            }
        }
        for s in slices.iter().filter(|s| s.state == "alive") {
            g.slots += u64::from(s.slots_total);
            g.slots_in_use += u64::from(s.slots_total.saturating_sub(s.slots_free));
        }
        g
    }

    fn set(&self) {
        for (state, n) in [("alive", self.alive), ("quarantined", self.quarantined), ("dead", self.dead)] {
            metrics::gauge!("sundara_fleet_workers", "state" => state).set(n as f64);
        }
        metrics::gauge!("sundara_fleet_slots").set(self.slots as f64);
        metrics::gauge!("sundara_fleet_slots_in_use").set(self.slots_in_use as f64);
    }
}

struct Health {
    client: async_nats::Client,
    js: jetstream::Context,
    work: jetstream::stream::Stream,
    capacity: Capacity,
}

impl Health {
    async fn check(&self) -> Result<(), CommonError> {
        let workers = self.capacity.workers().await?;
        let health = self.capacity.health(&workers).await?;
        for worker in lapsed(&workers, &health) {
            let Some(due) = self.capacity.mark_dead(worker).await? else { continue };
            tracing::warn!(worker, reassigning = due, "heartbeat lapsed; worker declared dead");
            // Its queued assignments are being reassigned; nobody should run these copies.
            if let Err(e) = self.work.purge().filter(subj::work_of(worker)).await {
                tracing::warn!(worker, error = %e, "could not purge the dead worker's queue");
            }
            let _ = self.client.publish(subj::FLEET_DEAD, worker.to_string().into()).await;
        }
        Ok(())
    }

    /// Sets the fleet and queue gauges.
    async fn gauges(&self) -> Result<(), CommonError> {
        let workers = self.capacity.workers().await?;
        let health = self.capacity.health(&workers).await?;
        let quarantined = self.capacity.quarantined().await?;
        let mut slices = Vec::new();
        for (w, (heartbeat, _)) in workers.iter().zip(&health) {
            if *heartbeat && !quarantined.contains_key(w) {
                slices.extend(self.capacity.slices_of(w).await?);
            }
        }
        FleetGauges::count(&workers, &health, &quarantined, &slices).set();
        for (queue, depth) in nats::queue_depths(&self.js).await?.labelled() {
            metrics::gauge!("sundara_queue_depth", "queue" => queue).set(depth as f64);
        }
        Ok(())
    }
}

/// The fleet-sizing loop's state.
struct Scaler {
    tasks: jetstream::stream::Stream,
    capacity: Capacity,
    registry: Registry,
    driver: Driver,
    /// Worker ids of the driver's pool start with this.
    prefix: String,
    planner: Planner,
    arrivals: Arrivals,
    /// Redundancy per model, read once from the registry.
    redundancy: HashMap<String, u8>,
    /// Workers already replaced (Redis keeps listing them as dead or quarantined).
    replaced: HashSet<String>,
    client: async_nats::Client,
    max_model_copies: usize,
    /// Models with a preload under way (one at a time per model).
    preloading: std::sync::Arc<std::sync::Mutex<HashSet<String>>>,
}

/// Longest the autoscaler waits for a worker to confirm a preload.
const PRELOAD_REPLY: Duration = Duration::from_secs(70);

impl Scaler {
    /// What each model's tasks of the last window ask for.
    async fn demand(&mut self, now: Instant) -> Result<Vec<(String, ModelLoad)>, AutoscalerError> {
        let mut counts = Vec::new();
        let mut subjects = self.tasks.info_with_subjects(subj::TASK_ALL).await.map_err(js_err)?;
        while let Some(entry) = subjects.next().await {
            counts.push(entry.map_err(js_err)?);
        }
        self.arrivals.observe(now, &counts);
        let service = self.capacity.service_times().await?;
        let mut loads = Vec::new();
        for (model, tasks_per_s) in self.arrivals.rates() {
            if tasks_per_s <= 0.0 {
                continue;
            }
            let k = match self.redundancy.get(&model) {
                Some(k) => *k,
                None => {
                    let k = self.registry.latest(&model).await?.map_or(1, |m| m.policy.redundancy);
                    *self.redundancy.entry(model.clone()).or_insert(k)
                }
            };
            // Unmeasured models count as the scheduler's estimate, 10 ms a task.
            let service_s = service.get(&model).map_or(0.01, |us| *us as f64 / 1e6);
            loads.push((model, ModelLoad { tasks_per_s, k, service_s }));
        }
        Ok(loads)
    }

    /// Loads one more copy of each model whose demand needs more copies than are loaded,
    /// on the slice where it fits best (the scheduler then finds it warm).
    async fn place_models(&mut self, workers: &[String], loads: &[(String, ModelLoad)]) -> Result<(), AutoscalerError> {
        if loads.is_empty() {
            return Ok(());
        }
        let mut slices = Vec::new();
        for worker in workers {
            slices.extend(self.capacity.slices_of(worker).await?);
        }
        let footprints = self.capacity.footprints().await?;
        let policy = &self.planner.policy;
        for (model, load) in loads {
            let need =
                plan::copies_needed(load, policy.lanes_per_worker, policy.target_utilisation, self.max_model_copies);
            let have = slices.iter().filter(|s| s.state == "alive" && plan::holds(s, model)).count();
            metrics::gauge!("sundara_autoscaler_model_copies", "model" => model.clone()).set(have as f64);
            if have >= need || !self.preloading.lock().unwrap_or_else(|e| e.into_inner()).insert(model.clone()) {
                continue;
            }
            let placed = match self.registry.latest(model).await? {
                Some(meta) => {
                    let footprint =
                        footprints.get(&ModelRef::spec(&meta.name, &meta.version)).copied().unwrap_or(meta.size);
                    plan::place_copy(&slices, model, footprint)
                        .map(|s| (meta.model_ref(), s.id.clone(), s.worker.clone()))
                }
                None => None,
            };
            let Some((model_ref, slice, worker)) = placed else {
                self.preloading.lock().unwrap_or_else(|e| e.into_inner()).remove(model);
                continue;
            };
            tracing::info!(%model, %slice, have, need, "loading one more copy");
            metrics::counter!("sundara_autoscaler_preloads_total").increment(1);
            let request = ControlRequest { v: WIRE_VERSION, command: Control::Preload { model: model_ref, slice } };
            let (client, preloading, model) = (self.client.clone(), self.preloading.clone(), model.clone());
            tokio::spawn(async move {
                let asked = client.request(subj::control(&worker), encode(&request).into());
                match tokio::time::timeout(PRELOAD_REPLY, asked).await {
                    Ok(Ok(reply)) => match decode::<ControlReply>(&reply.payload, 64 << 10) {
                        Ok(r) if r.ok => {}
                        Ok(r) => tracing::warn!(%model, %worker, reason = %r.reason, "preload refused"),
                        Err(e) => tracing::warn!(%model, %worker, error = %e, "bad preload reply"),
                    },
                    Ok(Err(e)) => tracing::warn!(%model, %worker, error = %e, "preload request failed"),
                    Err(_) => tracing::warn!(%model, %worker, "no preload reply in time"),
                }
                preloading.lock().unwrap_or_else(|e| e.into_inner()).remove(&model);
            });
        }
        Ok(())
    }

    /// Replaces the pool's workers that Redis holds as dead or quarantined.
    async fn replace_unfit(&mut self, workers: &[String]) -> Result<(), AutoscalerError> {
        let running: HashSet<String> = self.driver.running().await?.into_iter().collect();
        let pool: Vec<String> = workers
            .iter()
            .filter(|w| w.starts_with(&self.prefix) && !self.replaced.contains(*w))
            .filter(|w| !matches!(self.driver, Driver::Local(_)) || running.contains(*w))
            .cloned()
            .collect();
        let health = self.capacity.health(&pool).await?;
        for (worker, (_, state)) in pool.iter().zip(health) {
            if matches!(state.as_deref(), Some("dead" | "quarantined")) {
                tracing::warn!(%worker, state = state.as_deref().unwrap_or(""), "replacing worker");
                self.driver.replace(worker).await?;
                self.replaced.insert(worker.clone());
                metrics::counter!("sundara_autoscaler_replaced_total").increment(1);
            }
        }
        Ok(())
    }

    async fn step(&mut self) -> Result<(), AutoscalerError> {
        let now = Instant::now();
        let loads = self.demand(now).await?;
        let demand = plan::demand_lanes(loads.iter().map(|(_, l)| l));
        let workers = self.capacity.workers().await?;
        self.replace_unfit(&workers).await?;
        self.place_models(&workers, &loads).await?;
        let running = self.driver.running().await?.len();
        let target = self.planner.target(now, demand, running);
        if target != running {
            tracing::info!(demand_lanes = demand, running, target, "scaling the worker fleet");
        }
        self.driver.scale_to(target).await?;
        metrics::gauge!("sundara_autoscaler_demand_lanes").set(demand);
        metrics::gauge!("sundara_autoscaler_target_workers").set(target as f64);
        Ok(())
    }
}

/// Runs fleet sizing until `shutdown`; a local pool is stopped with it.
async fn scale(config: ScalingConfig, mut scaler: Scaler, shutdown: Shutdown) {
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(policy = ?config.policy, "autoscaler sizing the worker fleet");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        if let Err(e) = scaler.step().await {
            tracing::warn!(error = %e, "scaling step failed");
        }
    }
    if let Driver::Local(_) = scaler.driver
        && let Err(e) = scaler.driver.scale_to(0).await
    {
        tracing::warn!(error = %e, "stopping the local workers");
    }
}

/// Runs the health loop (and fleet sizing, when configured) until `shutdown`.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), AutoscalerError> {
    let grace = sundara_common::SHUTDOWN_GRACE;
    sundara_common::stop_within("autoscaler", &shutdown.clone(), grace, run_until_stopped(config, shutdown)).await
}

async fn run_until_stopped(config: Config, shutdown: Shutdown) -> Result<(), AutoscalerError> {
    let client = nats::connect(&config.endpoints.nats, "sundara-autoscaler").await?;
    let js = jetstream::new(client.clone());
    nats::provision(&js, &config.retention).await?;
    let work = js.get_stream(subj::WORK_STREAM).await.map_err(js_err)?;
    let capacity = Capacity::open(&config.endpoints).await?;
    let scaling = match config.scaling.clone() {
        Some(scaling) => {
            let (driver, prefix) = scaling.driver.build();
            let scaler = Scaler {
                tasks: js.get_stream(subj::TASKS_STREAM).await.map_err(js_err)?,
                capacity: capacity.clone(),
                registry: Registry::open(&js).await?,
                driver,
                prefix,
                planner: Planner::new(scaling.policy.clone()),
                arrivals: Arrivals::new(scaling.window),
                redundancy: HashMap::new(),
                replaced: HashSet::new(),
                client: client.clone(),
                max_model_copies: scaling.max_model_copies,
                preloading: Default::default(),
            };
            Some(scale(scaling, scaler, shutdown.clone()))
        }
        None => None,
    };
    // A second fleet gateway beside the scheduler's: heartbeats reach Redis while either restarts.
    let gateway = std::sync::Arc::new(sundara_common::gateway::Gateway::open(capacity.clone(), &js).await?);
    let reports = tokio::spawn(sundara_common::gateway::serve(client.clone(), gateway, shutdown.clone(), 64));
    let health = Health { client: client.clone(), js, work, capacity };
    let watch = async {
        let mut tick = tokio::time::interval(config.check_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut gauges = tokio::time::interval(config.gauge_interval);
        gauges.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tracing::info!("autoscaler watching fleet health");
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {
                    if let Err(e) = health.check().await {
                        tracing::warn!(error = %e, "health check failed");
                    }
                }
                _ = gauges.tick() => {
                    if let Err(e) = health.gauges().await {
                        tracing::warn!(error = %e, "could not read the fleet gauges");
                    }
                }
            }
        }
    };
    tokio::join!(watch, async {
        if let Some(scaling) = scaling {
            scaling.await;
        }
    });
    let served = reports.await?;
    let _ = client.flush().await;
    tracing::info!("autoscaler stopped");
    served.map_err(AutoscalerError::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_gauges_count_each_worker_once_and_only_live_slots() {
        let workers: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        let health = [(true, Some("alive".into())), (false, None), (true, Some("dead".into())), (true, None)];
        let quarantined = [("d".to_string(), "liar".to_string())].into();
        let slice = |state: &str, total, free| sundara_common::capacity::SliceState {
            state: state.into(),
            slots_total: total,
            slots_free: free,
            ..Default::default()
        };
        let slices = [slice("alive", 16, 10), slice("alive", 4, 4), slice("failed", 8, 8)];
        let g = FleetGauges::count(&workers, &health, &quarantined, &slices);
        assert_eq!(g, FleetGauges { alive: 1, quarantined: 1, dead: 2, slots: 20, slots_in_use: 6 });
    }

    #[test]
    fn only_alive_workers_without_heartbeat_lapse() {
        let workers = vec!["a".to_string(), "b".into(), "c".into(), "d".into()];
        let health = vec![
            (true, Some("alive".into())),
            (false, Some("alive".into())),
            (false, Some("dead".into())),
            (false, None),
        ];
        assert_eq!(lapsed(&workers, &health), vec!["b", "d"]);
    }
}
