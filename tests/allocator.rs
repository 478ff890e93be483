//! The daemon's allocator settings (`cardbridge::malloc`), in a process of their own: where
//! glibc places a block depends on what else the process freed, so no other test runs beside.
#![cfg(all(target_os = "linux", target_env = "gnu"))]

/// Whether glibc gave `block` pages of its own: such a block spans whole pages, so the
/// allocator reports it usable to the end of its last page, where a block inside a heap ends
/// within a few bytes of the size asked for.
fn on_pages_of_its_own(block: &[u8]) -> bool {
    // SAFETY: the pointer is a live block from malloc (Rust's system allocator), which is what
    // malloc_usable_size asks for; it only reads the allocator's own bookkeeping.
    let usable = unsafe { libc::malloc_usable_size(block.as_ptr() as *mut libc::c_void) };
    usable >= block.len() + 2048
}

#[test]
fn a_large_block_gets_pages_of_its_own_after_a_larger_one_was_freed() {
    cardbridge::malloc::configure();
    drop(vec![1u8; 4 << 20]);
    let block = vec![1u8; 1 << 20];
    assert!(
        on_pages_of_its_own(&block),
        "a block of 1 MiB grew a heap after a block of 4 MiB was freed"
    );
}
