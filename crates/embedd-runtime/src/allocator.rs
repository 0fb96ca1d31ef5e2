//! Allocator settings for inference: a forward pass allocates and frees buffers of megabytes per
//! layer (a batch's hidden states, its products, its attention context).

/// The largest buffer the allocator keeps for reuse once freed: glibc maps anything larger
/// afresh on every allocation (it takes no threshold above 32 MiB), so a layer whose buffers
/// pass this faults every page of them in again. Layers that can work in row chunks keep their
/// buffers under it.
pub const REUSED_BUFFER_BYTES: usize = 32 << 20;

/// Keeps freed buffers (up to 32 MiB each, and up to 128 MiB of free memory per heap) for the
/// next layer instead of returning them to the system. glibc's defaults map each buffer over
/// 128 KiB afresh (or trim the heap it came from) and unmap it when freed, so the next layer
/// faulted the same pages in again; how often depended on its adaptive threshold, which made a
/// bfloat16 forward pass of 8 medium sentences take from 1x to 10x as many page faults run to
/// run and up to 25% longer. Memory stays bounded by the largest batch's working set. Call
/// once at start-up; a no-op off glibc.
pub fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; these two are valid for any value.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, REUSED_BUFFER_BYTES as i32);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
    }
}

/// Returns the allocator's free memory to the system (every glibc arena's free pages), so a
/// large request's buffers do not stay resident once it is done. Costs a walk over the heaps:
/// call it when the server is idle. A no-op off glibc.
pub fn return_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap memory; it is thread-safe and has no
    // preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
