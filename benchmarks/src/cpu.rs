//! CPU time from `/proc`, so that every result can say who used the machine's cores
//! (the load generator's share above all).

use std::time::Instant;

/// Clock ticks per second of `/proc` times; 100 on every Linux this runs on.
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU seconds (user + system) used so far by process `pid` (and its reaped children: none here).
pub fn process_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name and state.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS_PER_SECOND)
}

/// CPU seconds spent busy (not idle or waiting for I/O) by the whole machine so far.
pub fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let v: Vec<f64> = line.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    let (idle, iowait) = (*v.get(3)?, *v.get(4)?);
    Some((v.iter().take(8).sum::<f64>() - idle - iowait) / TICKS_PER_SECOND)
}

/// A window over which CPU use is accounted for a set of processes.
pub struct CpuWindow {
    started: Instant,
    machine: f64,
    processes: Vec<(String, u32, f64)>,
}

/// CPU use over a window: per named process and for the whole machine, in cores (CPU seconds per second).
#[derive(Clone, Debug, serde::Serialize)]
pub struct CpuUse {
    pub wall_s: f64,
    pub machine_cores: f64,
    pub processes: Vec<(String, f64)>,
}

impl CpuWindow {
    pub fn start(processes: &[(String, u32)]) -> CpuWindow {
        CpuWindow {
            started: Instant::now(),
            machine: machine_busy_seconds().unwrap_or(0.0),
            processes: processes
                .iter()
                .map(|(n, pid)| (n.clone(), *pid, process_seconds(*pid).unwrap_or(0.0)))
                .collect(),
        }
    }

    pub fn finish(&self) -> CpuUse {
        let wall_s = self.started.elapsed().as_secs_f64().max(1e-9);
        let machine = machine_busy_seconds().unwrap_or(self.machine) - self.machine;
        CpuUse {
            wall_s,
            machine_cores: machine / wall_s,
            processes: self
                .processes
                .iter()
                .map(|(n, pid, start)| (n.clone(), (process_seconds(*pid).unwrap_or(*start) - start) / wall_s))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cpu_time_grows_with_work() {
        let me = std::process::id();
        let before = process_seconds(me).expect("own /proc entry");
        let started = Instant::now();
        let mut x = 0u64;
        while started.elapsed().as_millis() < 150 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let after = process_seconds(me).unwrap();
        assert!(after - before >= 0.05, "spent {} s", after - before);
        assert!(machine_busy_seconds().unwrap() > 0.0);
    }
}
