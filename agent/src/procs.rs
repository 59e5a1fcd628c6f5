//! Process-group housekeeping: what a timed-out cell or command leaves behind.

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

/// Process group of a live process, read from its `/proc/<pid>/stat` (field
/// 5, after the parenthesised command name, which may itself contain spaces
/// or parens). Zombies count as gone: they are dead and only await a reaper.
fn pgrp_of(stat: &str) -> Option<i32> {
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    fields.nth(1)?.parse().ok()
}

/// Members of process group `pgid` other than `except`.
pub fn group_members(pgid: i32, except: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != except)
        .filter(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| pgrp_of(&s))
                == Some(pgid)
        })
        .collect()
}

/// SIGKILLs every member of `pgid` except `except`, rescanning until none is
/// left (a fork bomb forks between scans) or `limit` has passed. Returns how
/// many kills were sent.
pub fn kill_group_except(pgid: i32, except: i32, limit: Duration) -> usize {
    let start = Instant::now();
    let mut sent = 0;
    loop {
        let members = group_members(pgid, except);
        if members.is_empty() || start.elapsed() > limit {
            return sent;
        }
        for pid in members {
            if kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
                sent += 1;
            }
        }
    }
}

/// SIGKILLs the whole group, repeatedly until it is empty or `limit` passed.
pub fn kill_group(pgid: i32, limit: Duration) {
    let start = Instant::now();
    while killpg(Pid::from_raw(pgid), Signal::SIGKILL).is_ok() && start.elapsed() < limit {
        if group_members(pgid, 0).is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    #[test]
    fn reads_pgrp_past_odd_command_names() {
        assert_eq!(pgrp_of("123 (a b) c) S 1 77 77 0"), Some(77));
        assert_eq!(pgrp_of("garbage"), None);
        assert_eq!(pgrp_of("123 (zombie) Z 1 77 77 0"), None);
    }

    #[test]
    fn kills_the_rest_of_a_group() {
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 100 & sleep 100 & wait"])
            .process_group(0)
            .spawn()
            .unwrap();
        let pgid = child.id() as i32;
        let deadline = Instant::now() + Duration::from_secs(5);
        while group_members(pgid, pgid).len() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(group_members(pgid, pgid).len(), 2);
        kill_group_except(pgid, pgid, Duration::from_secs(2));
        // The shell survives and its `wait` returns once both sleeps are gone.
        assert!(child.wait().unwrap().success());
    }
}
