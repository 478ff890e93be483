//! glibc's allocator for a daemon that runs for months: two arenas, free pages given back.
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
//! glibc also keeps, per thread, a cache of freed blocks (up to 7 of each of 64 sizes) that no
//! other thread and no release can reach. With the daemon's dozen threads those caches filled for
//! the whole of a ten-minute soak: the heap in use (`mallinfo2`, every 10 s), averaged over
//! minutes 2–4 and 10–12, went from 2.79 to 3.04 MB with them and from 2.19 to 2.24 MB without.
//! glibc reads that setting only from the environment at start
//! (`GLIBC_TUNABLES=glibc.malloc.tcache_count=0`). Without the caches `GET /v1/cards` under wrk
//! answered 3 to 10 % fewer requests a second and the simulated year's station ran 8 % slower
//! (100,000 insertions in 95 s instead of 87 s) while holding 3.3 MiB less. The year must fit
//! in 15 minutes, so the service unit leaves the caches on and names the line that turns them
//! off.
//!
//! An administrator's own `MALLOC_ARENA_MAX` (or `glibc.malloc.arena_max` tunable) is left as
//! it is. Other C libraries have their own allocators and are left alone.

use std::time::Duration;

/// Arenas the daemon's allocator may use.
pub const ARENAS: i32 = 2;

/// Limits glibc's arenas to [`ARENAS`], unless the environment already sets a limit. glibc
/// fixes the limit when a second thread first allocates, so this must run before the daemon
/// starts a thread.
pub fn limit_arenas() {
    let set_by_environment = std::env::var_os("MALLOC_ARENA_MAX").is_some()
        || std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc.arena_max"));
    if !set_by_environment {
        set_arena_max(ARENAS);
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

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_arena_max(arenas: i32) {
    // SAFETY: mallopt takes two integers and changes an allocator setting; it does not touch
    // memory the caller owns. A refusal (0) leaves glibc's default, which is only more memory.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, arenas);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_arena_max(_arenas: i32) {}

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
