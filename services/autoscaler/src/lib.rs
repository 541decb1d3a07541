//! Autoscaler. In this version: fleet health. A worker whose heartbeat lapses is declared
//! dead: the scheduler stops choosing its slices, its in-flight assignments fall due at once
//! (the scheduler reassigns them), and its queued assignments are purged from WORK. Its
//! consumer stays, so a worker that was only paused resumes when its heartbeat returns.

use std::time::Duration;

use async_nats::jetstream;
use sundara_common::{Capacity, Endpoints, Error as CommonError, Shutdown, js_err, nats};
use sundara_schemas::subjects as subj;

#[derive(Clone, Debug)]
pub struct Config {
    pub endpoints: Endpoints,
    /// How often heartbeats are checked.
    pub check_interval: Duration,
    pub retention: nats::Retention,
}

impl Config {
    pub fn new(endpoints: Endpoints) -> Config {
        Config { endpoints, check_interval: Duration::from_millis(250), retention: nats::Retention::default() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AutoscalerError {
    #[error(transparent)]
    Common(#[from] CommonError),
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

struct Health {
    client: async_nats::Client,
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
}

/// Runs the health loop until `shutdown`.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), AutoscalerError> {
    let client = nats::connect(&config.endpoints.nats_url, "sundara-autoscaler").await?;
    let js = jetstream::new(client.clone());
    nats::provision(&js, &config.retention).await?;
    let work = js.get_stream(subj::WORK_STREAM).await.map_err(js_err)?;
    let capacity = Capacity::connect(&config.endpoints.redis_url).await?;
    let health = Health { client: client.clone(), work, capacity };
    let mut tick = tokio::time::interval(config.check_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!("autoscaler watching fleet health");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        if let Err(e) = health.check().await {
            tracing::warn!(error = %e, "health check failed");
        }
    }
    let _ = client.flush().await;
    tracing::info!("autoscaler stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
