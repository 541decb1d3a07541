//! `sundara fleet`: every slice of the fleet as Redis has it (state, slots, memory and the
//! models loaded there).

use sundara_common::Capacity;
use sundara_common::capacity::SliceState;

fn mib(bytes: u64) -> String {
    format!("{:.0}", bytes as f64 / (1u64 << 20) as f64)
}

/// One line per slice.
pub fn slice_line(s: &SliceState) -> String {
    let loaded: Vec<String> = s.loaded.iter().map(|(m, b)| format!("{m} ({} MiB)", mib(*b))).collect();
    let mut line = format!(
        "{:<16} {:<20} {:<8} {:<7} slots {:>3}/{:<3} memory {:>6}/{:<6} MiB  loads {:>3} evictions {:>3}  {}",
        s.worker,
        s.id,
        s.device,
        s.state,
        s.slots_total - s.slots_free.min(s.slots_total),
        s.slots_total,
        mib(s.memory_total - s.memory_free.min(s.memory_total)),
        mib(s.memory_total),
        s.loads,
        s.evictions,
        if loaded.is_empty() { "(nothing loaded)".to_string() } else { loaded.join(", ") },
    );
    if !s.reason.is_empty() {
        line.push_str(&format!("  reason: {}", s.reason));
    }
    line
}

/// The fleet table: a header and one line per slice of every known worker.
pub async fn table(capacity: &Capacity) -> Result<String, sundara_common::Error> {
    let mut out = format!(
        "{:<16} {:<20} {:<8} {:<7} {:<15} {:<22} {}\n",
        "worker", "slice", "device", "state", "slots in use", "memory in use", "loaded models"
    );
    for w in capacity.workers().await? {
        for s in capacity.slices_of(&w).await? {
            out.push_str(&slice_line(&s));
            out.push('\n');
        }
    }
    Ok(out)
}
