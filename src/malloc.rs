//! glibc's allocator for a daemon that runs for months: two arenas, large blocks on pages of
//! their own, free pages given back.
//!
//! glibc gives a thread that allocates while another holds the heap an arena of its own, up to
//! eight per core, and an arena keeps what its threads free for their next allocations. The
//! daemon's threads come and go (blocking calls end after 10 s idle, reader threads follow the
//! readers), so a new thread lands on whichever arena is free and each arena grows, over the
//! first hour or so, to the largest working set any of its threads ever had. Under the soak's
//! load that was 14 arenas holding 6.1 MB for 3.0 MB in use, and resident memory still rising
//! by 20 to 30 KiB a minute ten minutes in; with two arenas, 4.3 MB for 3.1 MB in use. The
//! daemon allocates little and rarely at the same instant on two threads: the simulated year
//! ran its million insertions in 746 s with two arenas and 706 s without, each beside other
//! runs on two cores.
//!
//! Even then the heaps' pages stay resident once touched: malloc gives back only the free
//! space at a heap's top, while a heap profile of the soak showed the live heap flat at about
//! 2.8 MB from the first minute on. Every 10 s the daemon hands the free pages inside its heaps
//! back too (`malloc_trim`), so its resident memory follows what it uses (README, "Robustness");
//! between two releases it holds what the last few seconds freed (a card read, the answers of a
//! burst of requests), which once a minute made its samples swing by up to 600 KiB.
//!
//! A block of 128 KiB or more that no free space in the heaps can hold gets pages of its own,
//! which go back to the system when it is freed. glibc's default moves that line up to the size
//! of every such block freed, so that later blocks of that size grow the heaps instead; once
//! freed, they are split for small blocks and the next large block needs new space again. In a
//! soak that line had risen to 476 KiB by minute four (each card read then read the
//! 483,831-byte card-name list whole), and with it fixed the heaps held about 1 MB less (seed
//! 25: main heap 2,300 against 2,636 KiB and second heap 1,092 against 1,544 at minute 10).
//! `tests/allocator.rs` checks the setting, in a process of its own.
//!
//! glibc also keeps, per thread, a cache of freed blocks (up to 7 of each of 64 sizes) that no
//! other thread and no release can reach, and fills it for as long as the daemon runs into
//! sizes it has not cached yet. In the soak those caches were most of the growth after
//! minute 2 (seed 25, both with large blocks on their own pages: 31.5 KiB a minute with them,
//! 8.3 without), and the simulated year's station held 3.2 MiB more with them for 2 % more
//! speed (100,000 insertions in 59.7 against 61.0 s, three runs each). glibc reads that setting
//! only from the environment at start, so the service unit turns them off
//! (`GLIBC_TUNABLES=glibc.malloc.tcache_count=0`).
//!
//! An administrator's own `MALLOC_ARENA_MAX` and `MALLOC_MMAP_THRESHOLD_` (or the matching
//! `glibc.malloc` tunables) are left as they are. Other C libraries have their own allocators
//! and are left alone.

use std::time::Duration;

/// Arenas the daemon's allocator may use.
pub const ARENAS: i32 = 2;

/// Blocks of this size and larger that the heaps have no room for get pages of their own:
/// glibc's first threshold, fixed so that it does not rise with the blocks freed (module
/// documentation).
pub const OWN_PAGES_FROM: i32 = 128 * 1024;

/// Sets the allocator up for a daemon: [`ARENAS`] arenas, and large blocks on pages of their
/// own from [`OWN_PAGES_FROM`] whatever was freed before; each unless the environment already
/// sets it. glibc fixes the arena limit when a second thread first allocates, so this must run
/// before the daemon starts a thread.
pub fn configure() {
    let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
    let set_by_environment = |variable: &str, tunable: &str| {
        std::env::var_os(variable).is_some() || tunables.contains(tunable)
    };
    if !set_by_environment("MALLOC_ARENA_MAX", "glibc.malloc.arena_max") {
        set(Setting::ArenaMax, ARENAS);
    }
    if !set_by_environment("MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold") {
        set(Setting::OwnPagesFrom, OWN_PAGES_FROM);
    }
}

/// How often the daemon gives its heaps' free pages back.
pub const RELEASE_EVERY: Duration = Duration::from_secs(10);

/// Gives the free pages back every [`RELEASE_EVERY`] until the daemon stops. Giving back 40 MiB
/// took 1.6 ms (the test below), and 10 s of the daemon free far less, so it runs on the
/// runtime's thread.
pub async fn release_periodically(mut stopping: tokio::sync::watch::Receiver<bool>) {
    let mut every = tokio::time::interval(RELEASE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => release_free_pages(),
            _ = stopping.wait_for(|stop| *stop) => return,
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_free_pages() {
    // SAFETY: malloc_trim takes the allocator's own locks and only returns pages no
    // allocation uses; it touches no memory the caller owns.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_pages() {}

/// The allocator settings the daemon makes.
#[derive(Clone, Copy)]
enum Setting {
    ArenaMax,
    OwnPagesFrom,
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set(setting: Setting, value: i32) {
    let parameter = match setting {
        Setting::ArenaMax => libc::M_ARENA_MAX,
        Setting::OwnPagesFrom => libc::M_MMAP_THRESHOLD,
    };
    // SAFETY: mallopt takes two integers and changes an allocator setting; it does not touch
    // memory the caller owns. A refusal (0) leaves glibc's default, which is only more memory.
    unsafe {
        libc::mallopt(parameter, value);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set(_setting: Setting, _value: i32) {}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    /// This process's anonymous resident memory, in KiB.
    fn resident_anon_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("RssAnon:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    #[test]
    fn a_release_gives_back_the_free_pages_inside_a_heap() {
        // 40 MiB in small blocks, then one more that keeps the heap's top in use, so freeing
        // the others leaves free space that only a release can give back.
        let mut blocks: Vec<Box<[u8; 1024]>> = (0..40_960).map(|_| Box::new([1; 1024])).collect();
        let top = Box::new([1u8; 1024]);
        blocks.clear();
        blocks.shrink_to_fit();
        let freed = resident_anon_kib();
        super::release_free_pages();
        let released = resident_anon_kib();
        assert!(
            freed.saturating_sub(released) > 20 * 1024,
            "resident {freed} KiB with the blocks freed, {released} KiB after the release"
        );
        drop(top);
    }
}
