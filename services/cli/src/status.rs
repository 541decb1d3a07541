//! `sundara status`: one screen with the fleet (every slice, its slots, memory and models,
//! its worker's heartbeat), the queues, and the newest verdicts; refreshed in place.

use std::time::Duration;

use async_nats::jetstream;
use sundara_common::{Capacity, js_err};
use sundara_schemas::{MAX_MESSAGE_BYTES, Priority, Standing, Verdict, decode, subjects as subj};

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Common(#[from] sundara_common::Error),
}

/// Queue depths: tasks stored but not yet taken by a scheduler, and taken but not yet
/// dispatched, per priority; assignments queued for workers; outcomes and verdicts unread.
async fn queues(js: &jetstream::Context) -> Result<String, StatusError> {
    let depths = sundara_common::nats::queue_depths(js).await?;
    let mut out = String::from("queues:");
    for (p, (pending, waiting)) in Priority::ALL.iter().zip(depths.tasks) {
        out.push_str(&format!("  {} {pending} queued, {waiting} in scheduler;", p.as_str()));
    }
    out.push_str(&format!(
        "  assignments queued for workers {}; unread outcomes {}, verdicts {}\n",
        depths.work, depths.outcomes, depths.verdicts
    ));
    Ok(out)
}

/// One line per verdict: task, model, accepted, each miner's standing.
pub fn verdict_line(v: &Verdict) -> String {
    let miners: Vec<String> = v
        .miners
        .iter()
        .map(|m| {
            let mark = match m.standing {
                Standing::Agreed => "✓",
                Standing::Disagreed => "✗",
                Standing::Failed => "!",
                Standing::Missing => "-",
                Standing::Late => "late",
            };
            format!("{}{mark}", m.worker)
        })
        .collect();
    let check = v.reference.as_ref().map_or(String::new(), |c| format!(" [{}]", c.label()));
    let outcome = if v.accepted { "accepted" } else { "DEAD" };
    format!("  {:<34} {:<12} {outcome:<8} {}{check}\n", v.task_id, v.model.name, miners.join(" "))
}

/// The newest `n` verdicts, newest first.
async fn recent_verdicts(js: &jetstream::Context, n: u64) -> Result<String, StatusError> {
    let mut stream = js.get_stream(subj::VERDICTS_STREAM).await.map_err(js_err)?;
    let state = stream.info().await.map_err(js_err)?.state.clone();
    let mut out = format!("verdicts: {} stored; newest:\n", state.messages);
    let first = state.first_sequence.max(state.last_sequence.saturating_sub(n - 1));
    for seq in (first..=state.last_sequence).rev().filter(|s| *s > 0) {
        // A sequence may be gone (retention); skip it.
        if let Ok(raw) = stream.get_raw_message(seq).await
            && let Ok(v) = decode::<Verdict>(&raw.payload, MAX_MESSAGE_BYTES)
        {
            out.push_str(&verdict_line(&v));
        }
    }
    Ok(out)
}

/// One frame of the view.
pub async fn frame(js: &jetstream::Context, capacity: &Capacity) -> Result<String, StatusError> {
    let workers = capacity.workers().await?;
    let health = capacity.health(&workers).await?;
    let alive = health.iter().filter(|(hb, state)| *hb && state.as_deref() == Some("alive")).count();
    let mut out = format!("workers: {} known, {alive} alive with a heartbeat\n", workers.len());
    out.push_str(&crate::fleet::table(capacity).await?);
    out.push_str(&queues(js).await?);
    out.push_str(&recent_verdicts(js, 10).await?);
    Ok(out)
}

/// Redraws the frame every `every` until Ctrl-C (`once`: prints one frame and returns).
pub async fn watch(
    js: &jetstream::Context,
    capacity: &Capacity,
    every: Duration,
    once: bool,
) -> Result<(), StatusError> {
    let mut tick = tokio::time::interval(every);
    let stop = sundara_common::termination_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = tick.tick() => {}
        }
        let text = frame(js, capacity).await?;
        if once {
            print!("{text}");
            return Ok(());
        }
        // Home the cursor and clear the screen, then draw: the view refreshes in place.
        print!("\x1b[H\x1b[2J{text}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
}
