//! How a worker splits its devices into slices: the text form operators write
//! (`--slice cpu,threads=2,memory=1G`) and what it means. Plain parsing, no I/O.

/// The device a slice runs on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SliceDevice {
    /// A budget of CPU threads.
    Cpu,
    /// Part of a CUDA device: its sessions' memory arenas are capped at the slice's memory.
    Cuda { device_id: u32 },
    /// A MIG instance, by UUID. CUDA lets a process see one MIG instance, so a worker
    /// process has at most one MIG slice (it is then device 0 of that process).
    Mig { uuid: String },
}

/// One capacity unit a worker offers: a thread budget or a share of a GPU, with the
/// memory its loaded models may hold and the assignments it accepts at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceConfig {
    /// Unique within the worker; the slice's id in Redis is `<worker>-<name>`.
    pub name: String,
    pub device: SliceDevice,
    /// Inference threads: tasks (or batches) of this slice that run at once.
    pub threads: usize,
    /// Bytes the slice's loaded models may hold.
    pub memory: u64,
    /// Assignments accepted at once.
    pub slots: u32,
    /// Test and demo fault injection, a stand-in for a device failure (which cannot happen
    /// on a CPU): after this many inferences every inference on the slice fails.
    pub fail_after_runs: Option<u64>,
}

/// Assignments a slice accepts per inference thread by default: enough that a thread
/// always has the next one queued while outcomes and new work are in transit, and that
/// queued tasks can be batched.
pub const SLOTS_PER_THREAD: u32 = 16;

impl SliceConfig {
    /// A CPU slice with [`SLOTS_PER_THREAD`] slots per thread.
    pub fn cpu(name: &str, threads: usize, memory: u64) -> SliceConfig {
        let threads = threads.max(1);
        SliceConfig {
            name: name.to_string(),
            device: SliceDevice::Cpu,
            threads,
            memory,
            slots: threads as u32 * SLOTS_PER_THREAD,
            fail_after_runs: None,
        }
    }

    /// Parses `<device>[,key=value]...`, where device is `cpu`, `cuda:<index>` or
    /// `mig:<uuid>`, and keys are `name`, `threads`, `memory` (bytes, or with K/M/G/T),
    /// `slots` and `fail-after`. `index` numbers the slice for its default name.
    pub fn parse(text: &str, index: usize) -> Result<SliceConfig, String> {
        let mut parts = text.split(',');
        let device = match parts.next().unwrap_or("").split_once(':') {
            None if text.starts_with("cpu") => SliceDevice::Cpu,
            Some(("cuda", id)) => {
                SliceDevice::Cuda { device_id: id.parse().map_err(|_| format!("bad CUDA device index {id:?}"))? }
            }
            Some(("mig", uuid)) if !uuid.is_empty() => SliceDevice::Mig { uuid: uuid.to_string() },
            _ => return Err(format!("slice {text:?} must start with cpu, cuda:<index> or mig:<uuid>")),
        };
        let prefix = if device == SliceDevice::Cpu { "cpu" } else { "gpu" };
        let mut slice = SliceConfig::cpu(&format!("{prefix}{index}"), 1, 0);
        slice.device = device;
        let mut slots = None;
        for kv in parts {
            let (k, v) = kv.split_once('=').ok_or_else(|| format!("{kv:?} in slice {text:?} is not key=value"))?;
            let number = |v: &str| v.parse::<u64>().map_err(|_| format!("{k}={v:?} is not a number"));
            match k {
                "name" => slice.name = v.to_string(),
                "threads" => slice.threads = number(v)?.max(1) as usize,
                "memory" => slice.memory = bytes(v)?,
                "slots" => slots = Some(number(v)?.max(1) as u32),
                "fail-after" => slice.fail_after_runs = Some(number(v)?),
                other => return Err(format!("unknown slice key {other:?} (name, threads, memory, slots, fail-after)")),
            }
        }
        if !sundara_schemas::subjects::is_token(&slice.name) {
            return Err(format!("slice name {:?} must be of [A-Za-z0-9_-]", slice.name));
        }
        slice.slots = slots.unwrap_or(slice.threads as u32 * SLOTS_PER_THREAD);
        Ok(slice)
    }
}

/// `512M`, `8G`, `1048576`: a size in bytes (binary multiples).
pub fn bytes(text: &str) -> Result<u64, String> {
    let t = text.trim().trim_end_matches(['B', 'b']).trim_end_matches(['i']);
    let (digits, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        Some('T' | 't') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = digits.trim().parse().map_err(|_| format!("{text:?} is not a size (like 512M or 8G)"))?;
    n.checked_mul(1 << shift).ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_gpu_and_mig_slices() {
        let cpu = SliceConfig::parse("cpu,threads=2,memory=512M", 0).unwrap();
        assert_eq!(cpu, SliceConfig::cpu("cpu0", 2, 512 << 20));
        assert_eq!(cpu.slots, 32);
        let gpu = SliceConfig::parse("cuda:1,memory=8G,threads=2,slots=64,name=big", 3).unwrap();
        assert_eq!(gpu.device, SliceDevice::Cuda { device_id: 1 });
        assert_eq!((gpu.name.as_str(), gpu.memory, gpu.threads, gpu.slots), ("big", 8 << 30, 2, 64));
        let mig = SliceConfig::parse("mig:MIG-4f1c,memory=10GiB", 1).unwrap();
        assert_eq!(mig.device, SliceDevice::Mig { uuid: "MIG-4f1c".into() });
        assert_eq!(mig.name, "gpu1");
        assert_eq!(SliceConfig::parse("cpu,fail-after=5", 0).unwrap().fail_after_runs, Some(5));
    }

    #[test]
    fn refuses_what_it_cannot_mean() {
        for bad in ["tpu", "cuda:x", "mig:", "cpu,threads", "cpu,threads=two", "cpu,colour=red", "cpu,name=a.b"] {
            assert!(SliceConfig::parse(bad, 0).is_err(), "{bad} was accepted");
        }
        assert!(bytes("99999999T").is_err());
        assert_eq!(bytes("1k").unwrap(), 1024);
    }
}
