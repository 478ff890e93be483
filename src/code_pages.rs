//! The daemon's own code, mapped in whole at start.
//!
//! The kernel maps an executable's pages as they first run. In a daemon that runs for months
//! most code runs in the first minute, but not all: the first card with an odd applet, the first
//! garbled server answer or the first expired token runs code that never ran before, and its
//! pages then join the resident memory. Under the soak's load that was 256 to 384 KiB between
//! minutes two and four, which a memory-growth alert or the soak's slope cannot tell from a
//! leak. So the daemon asks the kernel, once, to map every page of its executable now
//! (`MADV_POPULATE_READ`, Linux 5.14): its resident memory then changes only with what it
//! allocates. That costs about 1.7 MiB more resident from the start (the release build's code
//! that the soak never runs), clean pages of the file shared with the page cache, never swapped.
//! It is start-up work: after a boot, the kernel reads whatever of the file (14 MB in the release
//! build) it has not read yet before the daemon goes on; with the file cached, the benchmark's
//! start to ready stayed under 30 ms.

/// Maps in every page of the running executable. A kernel older than 5.14 (or a sandbox that
/// hides `/proc/self`) leaves the pages to be mapped as they run; nothing else changes.
#[cfg(target_os = "linux")]
pub fn map_in() {
    let Ok(exe) = std::fs::read_link("/proc/self/exe") else {
        return;
    };
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return;
    };
    for (start, end) in executable_ranges(&maps, &exe.to_string_lossy()) {
        // SAFETY: the range is one of this process's own file mappings as the kernel listed
        // it; MADV_POPULATE_READ only faults its pages in (read access) and changes no data.
        unsafe {
            libc::madvise(
                start as *mut libc::c_void,
                end - start,
                libc::MADV_POPULATE_READ,
            );
        }
    }
}

#[cfg(not(target_os = "linux"))]
pub fn map_in() {}

/// The readable address ranges `/proc/self/maps` lists for the file at `exe`.
fn executable_ranges<'a>(maps: &'a str, exe: &'a str) -> impl Iterator<Item = (usize, usize)> + 'a {
    maps.lines().filter_map(move |line| {
        // "start-end perms offset device inode path": the path ends the line.
        let before = line.strip_suffix(exe)?;
        if !before.ends_with(char::is_whitespace) {
            return None;
        }
        let mut fields = line.split_whitespace();
        let (start, end) = fields.next()?.split_once('-')?;
        if !fields.next()?.starts_with('r') {
            return None;
        }
        let start = usize::from_str_radix(start, 16).ok()?;
        let end = usize::from_str_radix(end, 16).ok()?;
        (start < end).then_some((start, end))
    })
}

#[cfg(test)]
mod tests {
    use super::executable_ranges;

    #[test]
    fn only_the_readable_mappings_of_the_executable_are_taken() {
        let maps = "\
5581e0a00000-5581e0b00000 r--p 00000000 fe:01 1234  /usr/bin/cardbridge
5581e0b00000-5581e1400000 r-xp 00100000 fe:01 1234  /usr/bin/cardbridge
5581e1400000-5581e1410000 ---p 00a00000 fe:01 1234  /usr/bin/cardbridge
5581e1410000-5581e1420000 rw-p 00a10000 fe:01 1234  /usr/bin/cardbridge-old
7f0000000000-7f0000100000 r-xp 00000000 fe:01 99    /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000200000-7f0000300000 rw-p 00000000 00:00 0
garbage line
";
        let ranges: Vec<_> = executable_ranges(maps, "/usr/bin/cardbridge").collect();
        assert_eq!(
            ranges,
            [
                (0x5581e0a00000, 0x5581e0b00000),
                (0x5581e0b00000, 0x5581e1400000)
            ]
        );
    }

    /// Size and resident size, in KiB, of this process's readable mappings of its executable.
    fn executable_kib() -> (u64, u64) {
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let exe = exe.to_string_lossy();
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let (mut size, mut rss, mut ours) = (0, 0, false);
        for line in smaps.lines() {
            let kib = |l: &str| l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap();
            if line.starts_with("Size:") && ours {
                size += kib(line);
            } else if line.starts_with("Rss:") && ours {
                rss += kib(line);
            } else if !line.split_whitespace().next().unwrap_or(":").ends_with(':') {
                // A mapping's first line; the others start with "Key:".
                ours = executable_ranges(line, &exe).next().is_some();
            }
        }
        (size, rss)
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn every_page_of_the_executable_is_resident_after_mapping_in() {
        super::map_in();
        let (size, rss) = executable_kib();
        assert!(size > 0);
        assert_eq!(rss, size, "{rss} of {size} KiB of the executable resident");
    }
}
