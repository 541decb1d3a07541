//! A host of its own for a miner: a network namespace joined to this one by a veth link
//! (iproute2's `ip netns`, as root), which a test cuts and restores to partition the
//! miner. Made and removed by the test itself; traffic stays on this machine.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

/// A network namespace `name` with one link to the host: the host's end has
/// [`Netns::host_ip`], the namespace's [`Netns::ns_ip`]. Removed on drop.
pub struct Netns {
    pub name: String,
    host_link: String,
    pub host_ip: IpAddr,
    pub ns_ip: IpAddr,
}

/// Why no namespace could be made (not root, no iproute2): the test says so and skips.
#[derive(Debug)]
pub struct Unavailable(pub String);

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Netns {
    /// A namespace for this process' `tag` (unique per test process and tag), its link up.
    pub fn create(tag: &str) -> Result<Netns, Unavailable> {
        // Names within IFNAMSIZ (15); a /30 per namespace from the process id and tag.
        let pid = std::process::id();
        let n = pid.wrapping_mul(31).wrapping_add(tag.bytes().map(u32::from).sum::<u32>()) % 16_000;
        let name = format!("sdr{n}{tag}");
        let host_link = format!("sdh{n}");
        let ns_link = format!("sdm{n}");
        // A /30 of 10.231.0.0/16 (16,384 of them): the host's end .1, the namespace's .2.
        let base = n * 4;
        let (third, fourth) = ((base >> 8) as u8, (base & 0xff) as u8);
        let host_ip = Ipv4Addr::new(10, 231, third, fourth + 1);
        let ns_ip = Ipv4Addr::new(10, 231, third, fourth + 2);
        let netns =
            Netns { name: name.clone(), host_link: host_link.clone(), host_ip: host_ip.into(), ns_ip: ns_ip.into() };
        let steps: [Vec<String>; 8] = [
            vec!["netns".into(), "add".into(), name.clone()],
            vec![
                "link".into(),
                "add".into(),
                host_link.clone(),
                "type".into(),
                "veth".into(),
                "peer".into(),
                "name".into(),
                ns_link.clone(),
            ],
            vec!["link".into(), "set".into(), ns_link.clone(), "netns".into(), name.clone()],
            vec!["addr".into(), "add".into(), format!("{host_ip}/30"), "dev".into(), host_link.clone()],
            vec!["link".into(), "set".into(), host_link.clone(), "up".into()],
            vec![
                "-n".into(),
                name.clone(),
                "addr".into(),
                "add".into(),
                format!("{ns_ip}/30"),
                "dev".into(),
                ns_link.clone(),
            ],
            vec!["-n".into(), name.clone(), "link".into(), "set".into(), ns_link.clone(), "up".into()],
            vec!["-n".into(), name.clone(), "link".into(), "set".into(), "lo".into(), "up".into()],
        ];
        for step in &steps {
            let args: Vec<&str> = step.iter().map(String::as_str).collect();
            ip(&args).map_err(Unavailable)?;
        }
        Ok(netns)
    }

    /// A command run inside the namespace (`ip netns exec`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Cuts the link: nothing crosses until [`Netns::restore`].
    pub fn cut(&self) {
        ip(&["link", "set", &self.host_link, "down"]).expect("the link goes down");
    }

    pub fn restore(&self) {
        ip(&["link", "set", &self.host_link, "up"]).expect("the link comes up");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // The veth pair goes with either end; processes still inside keep the namespace
        // alive until they exit (the tests kill theirs first).
        let _ = ip(&["link", "del", &self.host_link]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}
