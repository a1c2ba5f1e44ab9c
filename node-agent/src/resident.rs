//! Keeping the agent's resident set to the code it runs. Most of a
//! sidecar's RSS is file-backed: the agent binary's text and read-only data
//! and the C library's. The kernel maps a file's cached pages around each
//! one touched (fault-around), and start-up (config parsing, enrolment, TLS
//! set-up, the dynamic loader's relocation tables) touches much of them, so
//! most of the binary sits in every agent's page tables though little of it
//! runs again. Once the agent serves, it unmaps those pages: they stay in
//! the page cache, shared and not re-read, and those used again are mapped
//! back on first use. Only mappings of files that are not writable and hold
//! no private (copy-on-write) page are touched, so nothing is lost: the
//! next access maps the very same page again.

use std::io;

/// One mapping that can be dropped from the resident set.
struct Mapping {
    start: usize,
    end: usize,
}

/// The read-only file mappings of this process with no private page, from
/// `/proc/self/smaps`.
fn releasable(smaps: &str) -> Vec<Mapping> {
    let mut out = Vec::new();
    let mut current: Option<Mapping> = None;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or_default();
        if let Some((start, end)) = first.split_once('-') {
            // A mapping's header: `start-end perms offset dev inode path`.
            let perms = fields.next().unwrap_or_default();
            let path = fields.nth(3).unwrap_or_default();
            let (Ok(start), Ok(end)) = (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            ) else {
                current = None;
                continue;
            };
            current = (path.starts_with('/') && !perms.contains('w') && perms.starts_with('r'))
                .then_some(Mapping { start, end });
        } else if first == "Anonymous:" {
            let private = fields.next().is_some_and(|kib| kib != "0");
            if let Some(m) = current.take() {
                if !private {
                    out.push(m);
                }
            }
        }
    }
    out
}

/// Unmaps the process's read-only, unmodified file pages; returns the
/// bytes released from the resident set.
pub fn release_code_pages() -> io::Result<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let before = resident_kib()?;
    for m in releasable(&smaps) {
        // SAFETY: the range is a whole read-only mapping of a file with no
        // private page (see `releasable`): dropping its page-table entries
        // loses nothing, the next access maps the same page-cache page.
        let rc = unsafe {
            libc::madvise(
                m.start as *mut libc::c_void,
                m.end - m.start,
                libc::MADV_DONTNEED,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(before.saturating_sub(resident_kib()?) * 1024)
}

fn resident_kib() -> io::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0))
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_read_only_file_mappings_without_private_pages_are_released() {
        let smaps = "\
55d0c0000000-55d0c0100000 r--p 00000000 08:01 42 /usr/bin/weft-agent
Rss:                 400 kB
Anonymous:             0 kB
55d0c0100000-55d0c0900000 r-xp 00100000 08:01 42 /usr/bin/weft-agent
Anonymous:             0 kB
55d0c0900000-55d0c0a00000 r--p 00900000 08:01 42 /usr/bin/weft-agent
Anonymous:           460 kB
55d0c0a00000-55d0c0a10000 rw-p 00a00000 08:01 42 /usr/bin/weft-agent
Anonymous:            12 kB
55d0c1000000-55d0c1100000 rw-p 00000000 00:00 0 [heap]
Anonymous:           700 kB
7f0000000000-7f0000100000 r-xp 00000000 08:01 7 /usr/lib/libc.so.6
Anonymous:             0 kB
";
        let starts: Vec<usize> = super::releasable(smaps).iter().map(|m| m.start).collect();
        assert_eq!(starts, [0x55d0c0000000, 0x55d0c0100000, 0x7f0000000000]);
    }

    #[test]
    fn code_pages_are_released_and_the_code_still_runs() {
        let released = super::release_code_pages().expect("madvise");
        // The test binary keeps running code mapped back on demand.
        let again = super::release_code_pages().expect("madvise again");
        // The first call's own reading of /proc may fault in as much as it
        // released; across two, code pages leave the resident set.
        assert!(released + again > 0, "released {released}, then {again}");
    }
}
