//! `sundara status`: one screen with the fleet (every slice, its slots, memory and models,
//! its worker's heartbeat), the queues, the jobs, and the newest verdicts; refreshed in place.

use std::time::Duration;

use async_nats::jetstream;
use sundara_common::capacity::SliceState;
use sundara_common::{Capacity, js_err};
use sundara_schemas::{MAX_MESSAGE_BYTES, Priority, Standing, Verdict, decode, subjects as subj};

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Common(#[from] sundara_common::Error),
}

/// Queue depths in two lines: tasks stored but not yet taken by a scheduler / taken but
/// not yet dispatched, per priority; assignments queued for workers; outcomes and verdicts
/// unread.
async fn queues(js: &jetstream::Context) -> Result<[String; 2], StatusError> {
    let depths = sundara_common::nats::queue_depths(js).await?;
    let mut tasks = String::from("tasks queued/in scheduler:");
    for (p, (pending, waiting)) in Priority::ALL.iter().zip(depths.tasks) {
        tasks.push_str(&format!("  {} {pending}/{waiting}", p.as_str()));
    }
    let rest = format!(
        "assignments for workers {}  unread outcomes {}  unread verdicts {}",
        depths.work, depths.outcomes, depths.verdicts
    );
    Ok([tasks, rest])
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
    let outcome = if v.accepted { "ok" } else { "DEAD" };
    format!("  {} {} {outcome} {}{check}", v.task_id, v.model.name, miners.join(" "))
}

/// The newest `n` verdicts, newest first, and how many are stored.
async fn recent_verdicts(js: &jetstream::Context, n: u64) -> Result<(u64, Vec<String>), StatusError> {
    let mut stream = js.get_stream(subj::VERDICTS_STREAM).await.map_err(js_err)?;
    let state = stream.info().await.map_err(js_err)?.state.clone();
    let mut lines = Vec::new();
    if n == 0 {
        return Ok((state.messages, lines));
    }
    let first = state.first_sequence.max(state.last_sequence.saturating_sub(n - 1));
    for seq in (first..=state.last_sequence).rev().filter(|s| *s > 0) {
        // A sequence may be gone (retention); skip it.
        if let Ok(raw) = stream.get_raw_message(seq).await
            && let Ok(v) = decode::<Verdict>(&raw.payload, MAX_MESSAGE_BYTES)
        {
            lines.push(verdict_line(&v));
        }
    }
    Ok((state.messages, lines))
}

/// One slice in one short line: worker/slice, device, state, slots and memory in use,
/// models loaded.
fn slice_cell(s: &SliceState) -> String {
    let mib = |b: u64| b >> 20;
    let models: Vec<&str> = s.loaded.iter().map(|(m, _)| m.as_str()).collect();
    format!(
        "{:<22} {:<6} {:<11} {:>3}/{:<3} {:>6}/{:<6} {}",
        format!("{}/{}", s.worker, s.id),
        s.device,
        s.state,
        s.slots_in_use(),
        s.slots_total,
        mib(s.memory_in_use()),
        mib(s.memory_total),
        if models.is_empty() { "-".to_string() } else { models.join(",") },
    )
}

/// Cuts a line to `width` characters (marking the cut with `…`).
fn fit(line: &str, width: usize) -> String {
    if line.chars().count() <= width {
        return line.to_string();
    }
    let mut cut: String = line.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// Lays out one frame in `rows` × `cols`: the header, as many slices as leave room for the
/// queues and a few verdicts, then the newest verdicts in what is left.
pub fn layout(
    header: String,
    slices: &[SliceState],
    queues: [String; 3],
    verdicts: (u64, Vec<String>),
    (rows, cols): (usize, usize),
) -> String {
    // Header, column titles, two queue lines, the jobs line, the verdicts title: 6 lines,
    // and one spare row so the cursor's line does not scroll the frame.
    let fixed = 7;
    let room = rows.saturating_sub(fixed);
    let min_verdicts = room.min(3);
    let slice_rows = slices.len().min(room - min_verdicts);
    let mut lines = vec![
        header,
        format!(
            "{:<22} {:<6} {:<11} {:<7} {:<13} {}",
            "worker/slice", "device", "state", "slots", "memory MiB", "models"
        ),
    ];
    let hidden = slices.len() - slice_rows;
    let shown = if hidden > 0 { slice_rows.saturating_sub(1) } else { slice_rows };
    lines.extend(slices[..shown].iter().map(slice_cell));
    if hidden > 0 {
        lines.push(format!("… {} more slices: `sundara fleet` lists every one", slices.len() - shown));
    }
    lines.extend(queues);
    let (stored, newest) = verdicts;
    lines.push(format!("verdicts: {stored} stored; newest:"));
    let left = rows.saturating_sub(lines.len() + 1);
    lines.extend(newest.into_iter().take(left));
    let mut out = String::new();
    for line in lines {
        out.push_str(&fit(&line, cols));
        out.push('\n');
    }
    out
}

/// One frame of the view, to fit `size` (rows, columns).
pub async fn frame(js: &jetstream::Context, capacity: &Capacity, size: (usize, usize)) -> Result<String, StatusError> {
    let workers = capacity.workers().await?;
    let health = capacity.health(&workers).await?;
    let alive = health.iter().filter(|(hb, state)| *hb && state.as_deref() == Some("alive")).count();
    let header = format!("workers: {} known, {alive} alive with a heartbeat", workers.len());
    let mut slices = Vec::new();
    for w in &workers {
        slices.extend(capacity.slices_of(w).await?);
    }
    let [tasks, rest] = queues(js).await?;
    let jobs = crate::server_jobs::status_lines(js, 0).await?.swap_remove(0);
    let verdicts = recent_verdicts(js, size.0 as u64).await?;
    let queues = [tasks, rest, jobs];
    Ok(layout(header, &slices, queues, verdicts, size))
}

/// The terminal's rows and columns (80 × 24 when stdout is not a terminal).
fn screen_size() -> (usize, usize) {
    let (rows, cols) = console::Term::stdout().size_checked().unwrap_or((24, 80));
    (usize::from(rows).max(10), usize::from(cols).max(40))
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
        let text = frame(js, capacity, screen_size()).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(worker: &str, id: &str) -> SliceState {
        SliceState {
            id: id.into(),
            worker: worker.into(),
            device: "cpu".into(),
            state: "serving".into(),
            reason: String::new(),
            slots_total: 16,
            slots_free: 12,
            memory_total: 8 << 30,
            memory_free: 7 << 30,
            loaded: vec![("mlp".into(), 1 << 20), ("silero-vad-with-a-long-name".into(), 2 << 20)],
            loads: 3,
            evictions: 0,
        }
    }

    /// Whatever the fleet and the verdicts, the frame fits the screen: 80 × 24 by default.
    #[test]
    fn a_frame_fits_80_by_24() {
        let verdict = "  0193f0c2a1b27c3d8e9f0a1b2c3d4e5f mlp ok miner-1✓ miner-2✓ miner-3✓ [audit_passed]".to_string();
        for n_slices in [0, 3, 30] {
            let slices: Vec<SliceState> = (0..n_slices).map(|i| slice(&format!("miner-{i}"), "cpu0")).collect();
            let queues = [
                "tasks queued/in scheduler:  high 0/0  normal 12/3  low 0/0".to_string(),
                "x".repeat(120),
                "jobs: 1 running, 0 uploading, 3 kept  shards queued 12 running 8 verified 80 retried 1".to_string(),
            ];
            let text = layout("workers: 3 known".into(), &slices, queues, (99, vec![verdict.clone(); 40]), (24, 80));
            let lines: Vec<&str> = text.lines().collect();
            assert!(lines.len() < 24, "{n_slices} slices: {} lines", lines.len());
            assert!(lines.iter().all(|l| l.chars().count() <= 80), "{text}");
            assert!(text.contains("verdicts: 99 stored"), "{text}");
            assert!(lines.iter().filter(|l| l.contains(" ok miner-1")).count() >= 3, "{text}");
            if n_slices == 30 {
                assert!(text.contains("more slices: `sundara fleet`"), "{text}");
            }
        }
    }
}
