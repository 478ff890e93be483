//! How many heaps glibc's allocator keeps for the daemon.
//!
//! glibc gives a thread that allocates while another holds the heap an arena of its own, up to
//! eight per core, and an arena keeps what its threads free for their next allocations. The
//! daemon's threads come and go (blocking calls end after 10 s idle, reader threads follow the
//! readers), so a new thread lands on whichever arena is free and each arena grows, over the
//! first hour or so, to the largest working set any of its threads ever had. Under the soak's
//! load that was 14 arenas holding 6.1 MB for 3.0 MB in use, and resident memory still rising
//! by 20 to 30 KiB a minute ten minutes in; with two arenas, 4.3 MB for 3.1 MB in use, flat
//! from the third minute (README, "Robustness"). The daemon allocates little and rarely at the
//! same instant on two threads, so two heaps cost it no measurable speed (the simulated year
//! runs as fast).
//!
//! An administrator's own `MALLOC_ARENA_MAX` (or `glibc.malloc.arena_max` tunable) is left as
//! it is. Other C libraries have their own allocators and are left alone too.

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
