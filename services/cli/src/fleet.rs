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
        s.slots_in_use(),
        s.slots_total,
        mib(s.memory_in_use()),
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

/// `sundara fleet quarantined`: the quarantined operators and workers, with why and, for a
/// worker, its operator and state.
pub async fn quarantined(capacity: &Capacity) -> Result<String, sundara_common::Error> {
    let operators = capacity.quarantined_operators().await?;
    let workers = capacity.quarantined().await?;
    if operators.is_empty() && workers.is_empty() {
        return Ok("no quarantines\n".into());
    }
    let mut out = String::new();
    for (operator, why) in &operators {
        out.push_str(&format!("operator {operator:<24} {why}\n"));
    }
    let health = capacity.health(&workers.keys().cloned().collect::<Vec<_>>()).await?;
    for ((worker, why), (heartbeat, _)) in workers.iter().zip(health) {
        let operator = capacity.operator_of(worker).await?.unwrap_or_default();
        let online = if heartbeat { "online" } else { "offline" };
        out.push_str(&format!("worker   {worker:<24} operator {operator:<16} {online:<7} {why}\n"));
    }
    out.push_str("lift one with `sundara fleet release <operator or worker>`\n");
    Ok(out)
}

/// `sundara fleet release OPERATOR`: lifts the quarantine and says what it lifted.
pub async fn release(capacity: &Capacity, operator: &str) -> Result<String, sundara_common::Error> {
    let released = capacity.release_quarantine(operator).await?;
    if !released.operator && released.workers.is_empty() {
        return Ok(format!(
            "{operator}: neither an operator nor a worker under quarantine (see `sundara fleet quarantined`)"
        ));
    }
    let mut what = Vec::new();
    if released.operator {
        what.push(format!("operator {operator}"));
    }
    if !released.workers.is_empty() {
        what.push(format!("workers {}", released.workers.join(", ")));
    }
    Ok(format!(
        "released {}: they get work again from their next heartbeat. The rewarder keeps its proofs: one more \
         output proven wrong quarantines them again",
        what.join(" and ")
    ))
}
