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
/// run and up to 25% longer. Memory stays bounded by the largest batch's working set.
///
/// Kept buffers are kept per heap, and glibc gives each allocating thread its own heap (up to
/// eight per core): a batch's buffers freed on a kernel thread, the HTTP bodies on the runtime's
/// workers and the tokenizer's on the blocking pool each stayed resident in a heap of their
/// own. Serving all-MiniLM-L6-v2 under the HTTP load bench on two cores, one heap peaks at
/// 170-180 MiB against 195-201 with glibc's default, at 0-3% of throughput, so this keeps
/// one heap per four cores (at least one) unless `MALLOC_ARENA_MAX` (or `GLIBC_TUNABLES`)
/// says otherwise. Call once at start-up, before other threads allocate; a no-op off glibc.
pub fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let heaps_chosen_by_user = std::env::var_os("MALLOC_ARENA_MAX").is_some()
            || std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("arena_max"));
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        // SAFETY: mallopt only sets allocator parameters; these three are valid for any
        // positive value.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, REUSED_BUFFER_BYTES as i32);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
            if !heaps_chosen_by_user {
                libc::mallopt(libc::M_ARENA_MAX, heaps_for(cores) as i32);
            }
        }
    }
}

/// One allocator heap per four cores, at least one.
fn heaps_for(cores: usize) -> usize {
    cores.div_ceil(4)
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

#[cfg(test)]
mod tests {
    #[test]
    fn one_heap_per_four_cores() {
        let heaps: Vec<usize> = [1, 2, 4, 5, 16, 64].map(super::heaps_for).to_vec();
        assert_eq!(heaps, vec![1, 1, 1, 2, 4, 16]);
    }
}
